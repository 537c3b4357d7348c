//! The payment meter of one client session: how many bytes the client's
//! channel has paid for, how many the relay carried, and how many more it may
//! carry. The relay never carries more than `paid + credit window`.
//!
//! Every tunnel of the client reserves bytes here before it reads them, so
//! the bound holds across all of the client's tunnels and both directions.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_proto::{Amount, ChannelId, PricePerByte, PublicKey, cost};
use tokio::sync::Notify;

/// What the client has paid and what was carried, in one session.
#[derive(Debug)]
pub struct Meter {
    /// The paying channel.
    pub channel: ChannelId,
    /// The channel's client, who signs its vouchers.
    pub client: PublicKey,
    /// The session's price.
    pub price: PricePerByte,
    /// Bytes carried ahead of payment.
    pub credit_window_bytes: u64,
    state: Mutex<MeterState>,
    paid_more: Notify,
}

#[derive(Debug, Clone, Copy)]
struct MeterState {
    /// The channel's cumulative amount when the session began: bytes of
    /// earlier sessions are not billed again.
    base: Amount,
    /// The newest accepted voucher's amount and sequence.
    paid: Amount,
    sequence: u64,
    /// Bytes carried in this session.
    carried_bytes: u64,
    /// Bytes reserved by reads in progress: not carried (nor billed) yet,
    /// but no longer available to other reads.
    reserved_bytes: u64,
    /// Bytes covered by the last invoice.
    invoiced_bytes: u64,
    /// The oldest invoice not yet paid (its amount, and when it was
    /// made), to time the payment round trip.
    unpaid_invoice: Option<(Amount, Instant)>,
}

/// An invoice to send: the cumulative amount due for `carried_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// Bytes carried in this session.
    pub carried_bytes: u64,
    /// The channel's cumulative amount a voucher should carry.
    pub amount: Amount,
}

impl Meter {
    /// A meter for a session whose channel already has a voucher for
    /// `paid` with `sequence` (zero for none).
    pub fn new(
        channel: ChannelId,
        client: PublicKey,
        price: PricePerByte,
        credit_window_bytes: u64,
        paid: Amount,
        sequence: u64,
    ) -> Meter {
        Meter {
            channel,
            client,
            price,
            credit_window_bytes,
            state: Mutex::new(MeterState {
                base: paid,
                paid,
                sequence,
                carried_bytes: 0,
                reserved_bytes: 0,
                invoiced_bytes: 0,
                unpaid_invoice: None,
            }),
            paid_more: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MeterState> {
        // Every update is a few field assignments with no panics between.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The newest accepted voucher's amount and sequence.
    pub fn paid(&self) -> (Amount, u64) {
        let state = self.lock();
        (state.paid, state.sequence)
    }

    /// Bytes the client may still be carried: paid-for bytes plus the credit
    /// window, minus what was carried. Free relays have no limit.
    fn allowance(&self, state: &MeterState) -> u64 {
        if self.price.attos() == 0 {
            return u64::MAX;
        }
        let paid_attos = state.paid.attos().saturating_sub(state.base.attos());
        let paid_bytes = u64::try_from(paid_attos / self.price.attos()).unwrap_or(u64::MAX);
        paid_bytes
            .saturating_add(self.credit_window_bytes)
            .saturating_sub(state.carried_bytes)
            .saturating_sub(state.reserved_bytes)
    }

    /// Reserves up to `wanted` bytes for a read; returns how many (zero when
    /// the allowance is used up). The caller then reports what it carried
    /// with [`Meter::commit`].
    pub fn reserve(&self, wanted: u64) -> u64 {
        let mut state = self.lock();
        let granted = wanted.min(self.allowance(&state));
        state.reserved_bytes += granted;
        granted
    }

    /// Ends a reservation of `reserved` bytes of which `carried` were
    /// carried; the rest is available again. Returns whether enough is
    /// uninvoiced (half the credit window) that an invoice should go out.
    pub fn commit(&self, reserved: u64, carried: u64) -> bool {
        debug_assert!(carried <= reserved, "carried more than reserved");
        let mut state = self.lock();
        state.reserved_bytes = state.reserved_bytes.saturating_sub(reserved);
        state.carried_bytes += carried.min(reserved);
        self.price.attos() > 0
            && state.carried_bytes - state.invoiced_bytes >= (self.credit_window_bytes / 2).max(1)
    }

    /// Waits up to `grace` for an allowance: true once there is one, false
    /// if no voucher raised it in time.
    pub async fn wait_for_allowance(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.paid_more.notified();
            tokio::pin!(notified);
            // Registered before the check, so a voucher accepted in between
            // still wakes this waiter.
            notified.as_mut().enable();
            if self.allowance(&self.lock()) > 0 {
                return true;
            }
            // A wake-up that left nothing to carry (another tunnel of the
            // client took the allowance first, or a voucher raised nothing)
            // waits on: only the grace ends the wait.
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// The invoice to send now: when bytes were carried since the last
    /// one, or the last one is not fully paid (a reminder: a client pays
    /// only for the bytes it has counted, which may lag the relay's count).
    pub fn invoice(&self) -> Option<Due> {
        let mut state = self.lock();
        // A free relay bills nothing.
        if self.price.attos() == 0 {
            return None;
        }
        let carried = cost(state.carried_bytes, self.price).ok()?;
        let amount = state.base.checked_add(carried).ok()?;
        if state.carried_bytes == state.invoiced_bytes && state.paid >= amount {
            return None;
        }
        state.invoiced_bytes = state.carried_bytes;
        if state.unpaid_invoice.is_none() {
            state.unpaid_invoice = Some((amount, Instant::now()));
        }
        Some(Due { carried_bytes: state.carried_bytes, amount })
    }

    /// Counts an accepted (already stored) voucher and wakes waiting
    /// tunnels. Returns the payment round trip when the voucher pays the
    /// oldest unpaid invoice: from that invoice to now.
    pub fn accept(&self, cumulative: Amount, sequence: u64) -> Option<Duration> {
        let round_trip = {
            let mut state = self.lock();
            if sequence <= state.sequence || cumulative < state.paid {
                return None;
            }
            state.paid = cumulative;
            state.sequence = sequence;
            match state.unpaid_invoice {
                Some((amount, invoiced_at)) if cumulative >= amount => {
                    state.unpaid_invoice = None;
                    Some(invoiced_at.elapsed())
                }
                _ => None,
            }
        };
        self.paid_more.notify_waiters();
        round_trip
    }

    /// Bytes carried in this session.
    #[cfg(test)]
    pub fn carried_bytes(&self) -> u64 {
        self.lock().carried_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;

    fn meter(price_attos: u128, window: u64) -> Meter {
        Meter::new(
            ChannelId::from_bytes([1; 32]),
            SecretKey::from_seed(&[1; 32]).public(),
            PricePerByte::from_attos(price_attos).unwrap(),
            window,
            Amount::from_attos(5_000).unwrap(),
            3,
        )
    }

    #[test]
    fn an_unpaying_client_gets_exactly_the_window() {
        let meter = meter(10, 1000);
        assert_eq!(meter.reserve(600), 600);
        assert_eq!(meter.reserve(600), 400);
        assert_eq!(meter.reserve(1), 0);
        meter.commit(600, 500);
        assert_eq!(meter.carried_bytes(), 500, "only what was carried counts");
        assert_eq!(meter.reserve(500), 100);
        meter.commit(400, 400);
        meter.commit(100, 100);
        assert_eq!(meter.carried_bytes(), 1000);
        assert_eq!(meter.reserve(1), 0);
    }

    #[test]
    fn vouchers_raise_the_allowance_by_what_they_pay() {
        let meter = meter(10, 1000);
        assert_eq!(meter.reserve(5000), 1000);
        assert!(meter.commit(1000, 1000), "half the window is uninvoiced");
        let due = meter.invoice().unwrap();
        assert_eq!(due, Due { carried_bytes: 1000, amount: Amount::from_attos(15_000).unwrap() });
        assert_eq!(meter.invoice(), Some(due), "a reminder while unpaid");
        assert!(meter.accept(due.amount, 4).is_some(), "it pays the invoice: a round trip");
        assert_eq!(meter.invoice(), None, "nothing new to invoice");
        assert_eq!(meter.reserve(5000), 1000, "paid 1000 bytes: another window's worth");
        meter.commit(1000, 1000);
        // Replays and decreases change nothing.
        assert_eq!(meter.accept(Amount::from_attos(99_000).unwrap(), 4), None);
        assert_eq!(meter.accept(Amount::from_attos(1).unwrap(), 9), None);
        assert_eq!(meter.reserve(1), 0);
        assert_eq!(meter.paid(), (due.amount, 4));
    }

    #[test]
    fn a_little_carried_asks_for_no_invoice_yet() {
        let meter = meter(10, 1000);
        assert_eq!(meter.reserve(100), 100);
        assert!(!meter.commit(100, 100));
        assert_eq!(meter.invoice().unwrap().carried_bytes, 100, "the timer still bills it");
    }

    #[tokio::test]
    async fn a_waiting_tunnel_wakes_when_paid_and_gives_up_after_the_grace() {
        let meter = std::sync::Arc::new(meter(10, 1000));
        assert_eq!(meter.reserve(5000), 1000);
        meter.commit(1000, 1000);
        assert!(!meter.wait_for_allowance(Duration::from_millis(20)).await);
        let waiter = {
            let meter = std::sync::Arc::clone(&meter);
            tokio::spawn(async move { meter.wait_for_allowance(Duration::from_secs(30)).await })
        };
        meter.accept(Amount::from_attos(6_000).unwrap(), 4);
        assert!(tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap());
        assert_eq!(meter.reserve(5000), 100);
    }

    #[tokio::test]
    async fn a_wake_up_that_leaves_nothing_to_carry_keeps_the_tunnel_waiting() {
        let meter = std::sync::Arc::new(meter(10, 1000));
        assert_eq!(meter.reserve(1000), 1000);
        meter.commit(1000, 1000);
        let waiter = {
            let meter = std::sync::Arc::clone(&meter);
            tokio::spawn(async move { meter.wait_for_allowance(Duration::from_secs(30)).await })
        };
        // This test runs on one thread: the waiter runs only when it yields.
        tokio::task::yield_now().await;
        // A voucher pays for 100 bytes, and another tunnel of the client
        // takes them before the waiter looks.
        meter.accept(Amount::from_attos(6_000).unwrap(), 4);
        assert_eq!(meter.reserve(1000), 100);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "woken with nothing to carry, it waits on");
        meter.accept(Amount::from_attos(7_000).unwrap(), 5);
        assert!(tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap());
    }

    #[test]
    fn a_free_relay_never_limits_nor_bills() {
        let meter = meter(0, 0);
        assert_eq!(meter.reserve(u64::MAX / 2), u64::MAX / 2);
        assert!(!meter.commit(u64::MAX / 2, u64::MAX / 2));
        assert_eq!(meter.invoice(), None);
    }
}
