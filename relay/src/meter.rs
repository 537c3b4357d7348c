//! The payment meter of one client key: what the key's channel has paid for,
//! what the relay carried for the key across all its sessions and tunnels,
//! and how many more bytes it may carry. The relay never carries more than
//! the credit window unpaid for one key:
//!
//! `debt + carried - paid bytes <= min(credit window, remaining escrow)`
//!
//! A voucher counts once verified, before it is on disk (see
//! [`crate::store`]); the meter carries no more than
//! [`MAX_UNSYNCED_BYTES`] paid by vouchers not yet synced, so a crash costs
//! a key at most that beyond its window.
//!
//! Every tunnel of the key reserves bytes here before it reads them, so the
//! bound holds across all of the key's tunnels and both directions. A key
//! keeps one meter for as long as it owes anything (see [`crate::debts`]):
//! a new session, even on another channel, starts from the same debt, so a
//! client cannot buy a fresh window by reconnecting.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_proto::{Amount, ChannelId, PricePerByte, PublicKey, cost};
use tokio::sync::Notify;

/// The most bytes a key is carried on the strength of vouchers that are
/// verified but not yet synced to the voucher log: what a crash can lose
/// per key beyond the credit window. At [`crate::store::SYNC_INTERVAL`]
/// between syncs it holds one tunnel back only above 8 GiB/s.
pub const MAX_UNSYNCED_BYTES: u64 = 16 << 20;

/// The client key's payment state at one relay.
#[derive(Debug)]
pub struct Meter {
    /// The key that signs the vouchers.
    pub client: PublicKey,
    /// The advertised window: bytes carried ahead of payment for this key.
    pub credit_window_bytes: u64,
    state: Mutex<MeterState>,
    paid_more: Notify,
}

/// The channel a session of the key pays through, as the session opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// The paying channel.
    pub channel: ChannelId,
    /// The session's price.
    pub price: PricePerByte,
    /// The newest voucher's amount and sequence when the session opened:
    /// bytes of earlier sessions are not billed again (their unpaid part is
    /// the key's debt).
    pub paid: Amount,
    /// That voucher's sequence.
    pub sequence: u64,
    /// Everything the client has put in the channel, as last seen.
    pub deposited: Amount,
}

#[derive(Debug, Clone, Copy)]
struct MeterState {
    binding: Binding,
    /// Bytes carried for the key in earlier bindings and never paid.
    debt_bytes: u64,
    /// The channel's cumulative amount when this binding began.
    base: Amount,
    /// The newest accepted voucher's amount and sequence.
    paid: Amount,
    sequence: u64,
    /// The amount and sequence of the newest accepted voucher that is
    /// synced to disk (amounts may go down: a voucher may hand back
    /// prepayment).
    synced: Amount,
    synced_sequence: u64,
    /// Set once the channel is closing: nothing more is carried on credit.
    closing: bool,
    /// Bytes carried in this binding.
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
    /// The channel billed.
    pub channel: ChannelId,
    /// Bytes carried in this session.
    pub carried_bytes: u64,
    /// The channel's cumulative amount a voucher should carry.
    pub amount: Amount,
}

impl MeterState {
    /// Bytes the binding's vouchers paid for.
    fn paid_bytes(&self) -> u64 {
        self.bytes_worth(self.paid)
    }

    /// Bytes the binding's vouchers up to cumulative `amount` paid for.
    fn bytes_worth(&self, amount: Amount) -> u64 {
        let price = self.binding.price.attos();
        if price == 0 {
            return u64::MAX;
        }
        let paid_attos = amount.attos().saturating_sub(self.base.attos());
        u64::try_from(paid_attos / price).unwrap_or(u64::MAX)
    }

    /// The channel's cumulative amount, in attos, once `bytes` more than
    /// the binding's start are paid for (saturating).
    fn worth_attos(&self, bytes: u64) -> u128 {
        let price = self.binding.price.attos();
        self.base.attos().saturating_add(u128::from(bytes).saturating_mul(price))
    }

    /// Bytes the meter may carry on payment: what was paid, but no more
    /// than [`MAX_UNSYNCED_BYTES`] beyond what is synced.
    fn payable_bytes(&self) -> u64 {
        self.paid_bytes().min(self.bytes_worth(self.synced).saturating_add(MAX_UNSYNCED_BYTES))
    }

    /// Bytes carried (or reserved) for the key and not paid for.
    fn unpaid_bytes(&self) -> u64 {
        self.debt_bytes
            .saturating_add(self.carried_bytes)
            .saturating_add(self.reserved_bytes)
            .saturating_sub(self.paid_bytes())
    }

    /// How far the relay may carry beyond what was paid: the advertised
    /// window, but no more than the channel's escrow left after the newest
    /// voucher can pay, and nothing once the channel is closing.
    fn window_bytes(&self, credit_window_bytes: u64) -> u64 {
        let price = self.binding.price.attos();
        if self.closing || price == 0 {
            return 0;
        }
        let escrow_attos = self.binding.deposited.attos().saturating_sub(self.paid.attos());
        let escrow_bytes = u64::try_from(escrow_attos / price).unwrap_or(u64::MAX);
        credit_window_bytes.min(escrow_bytes)
    }
}

impl Meter {
    /// A meter for `client`, bound to its first session's channel, owing
    /// `debt_bytes` from before (recovered from the debt book).
    pub fn new(
        client: PublicKey,
        credit_window_bytes: u64,
        binding: Binding,
        debt_bytes: u64,
    ) -> Meter {
        Meter {
            client,
            credit_window_bytes,
            state: Mutex::new(MeterState {
                binding,
                debt_bytes,
                base: binding.paid,
                paid: binding.paid,
                sequence: binding.sequence,
                synced: binding.paid,
                synced_sequence: binding.sequence,
                closing: false,
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

    /// Binds the key's new session to `binding`: what the key left unpaid
    /// so far becomes its debt, and the new session is billed only for its
    /// own bytes. Payment beyond the bytes carried is not carried over: a
    /// client hands back what it paid ahead before it leaves, with a
    /// voucher down to [`Meter::floor`].
    pub fn rebind(&self, binding: Binding) {
        let mut state = self.lock();
        // Reads still in progress commit into the new binding's count.
        let reserved = state.reserved_bytes;
        state.reserved_bytes = 0;
        state.debt_bytes = state.unpaid_bytes();
        state.binding = binding;
        state.base = binding.paid;
        state.paid = binding.paid;
        state.sequence = binding.sequence;
        state.synced = binding.paid;
        state.synced_sequence = binding.sequence;
        state.closing = false;
        state.carried_bytes = 0;
        state.reserved_bytes = reserved;
        state.invoiced_bytes = 0;
        state.unpaid_invoice = None;
    }

    /// The session's channel and terms.
    pub fn binding(&self) -> Binding {
        self.lock().binding
    }

    /// The least cumulative amount a voucher may carry on this binding:
    /// what leaves the key's unpaid bytes (owed, carried and reserved)
    /// within the credit window, or within nothing once the channel is
    /// closing. A voucher may lower the newest amount down to it, handing
    /// back prepayment the relay has not carried: the relay's risk stays
    /// the window.
    pub fn floor(&self) -> Amount {
        let state = self.lock();
        let window = if state.closing { 0 } else { self.credit_window_bytes };
        let owed_bytes = state
            .debt_bytes
            .saturating_add(state.carried_bytes)
            .saturating_add(state.reserved_bytes)
            .saturating_sub(window);
        Amount::from_attos(state.worth_attos(owed_bytes)).unwrap_or(Amount::MAX)
    }

    /// While the newest voucher pays for more than the key was carried (on
    /// a channel that is not closing): what the carried bytes are worth,
    /// the most a settlement should take now, since the client may still
    /// hand the rest back ([`Meter::floor`]).
    pub fn earned(&self) -> Option<Amount> {
        let state = self.lock();
        if state.closing || state.binding.price.attos() == 0 {
            return None;
        }
        let worth = state.worth_attos(state.debt_bytes.saturating_add(state.carried_bytes));
        (state.paid.attos() > worth).then(|| Amount::from_attos(worth)).and_then(Result::ok)
    }

    /// The newest accepted voucher's amount and sequence.
    pub fn paid(&self) -> (Amount, u64) {
        let state = self.lock();
        (state.paid, state.sequence)
    }

    /// Bytes carried for the key and not paid for: what the relay risks on
    /// it now. Never above the credit window.
    pub fn unpaid_bytes(&self) -> u64 {
        self.lock().unpaid_bytes()
    }

    /// Whether what the channel's escrow can pay, rather than the window,
    /// holds the key back: a top-up would let it carry more.
    pub fn escrow_bound(&self) -> bool {
        let state = self.lock();
        !state.closing && state.window_bytes(self.credit_window_bytes) < self.credit_window_bytes
    }

    /// Bytes the key may still be carried: paid-for bytes plus the window,
    /// minus what was carried and what it owes. Free relays have no limit.
    fn allowance(&self, state: &MeterState) -> u64 {
        if state.binding.price.attos() == 0 {
            return u64::MAX;
        }
        let limit =
            state.payable_bytes().saturating_add(state.window_bytes(self.credit_window_bytes));
        limit
            .saturating_sub(state.debt_bytes)
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
        // The promise: what a key is carried unpaid never passes the window.
        debug_assert!(granted == 0 || state.unpaid_bytes() <= self.credit_window_bytes);
        granted
    }

    /// Ends a reservation of `reserved` bytes of which `carried` were
    /// carried; the rest is available again. Returns whether enough is
    /// uninvoiced (half the window) that an invoice should go out.
    pub fn commit(&self, reserved: u64, carried: u64) -> bool {
        debug_assert!(carried <= reserved, "carried more than reserved");
        let mut state = self.lock();
        state.reserved_bytes = state.reserved_bytes.saturating_sub(reserved);
        state.carried_bytes += carried.min(reserved);
        let half_window = (state.window_bytes(self.credit_window_bytes) / 2).max(1);
        state.binding.price.attos() > 0 && state.carried_bytes - state.invoiced_bytes >= half_window
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
        if state.binding.price.attos() == 0 {
            return None;
        }
        let carried = cost(state.carried_bytes, state.binding.price).ok()?;
        let amount = state.base.checked_add(carried).ok()?;
        // Nothing is owed on bytes already paid for (ahead, say).
        if state.paid >= amount {
            state.invoiced_bytes = state.carried_bytes;
            return None;
        }
        state.invoiced_bytes = state.carried_bytes;
        if state.unpaid_invoice.is_none() {
            state.unpaid_invoice = Some((amount, Instant::now()));
        }
        Some(Due { channel: state.binding.channel, carried_bytes: state.carried_bytes, amount })
    }

    /// Counts a verified voucher on `channel` (submitted to the store) and wakes
    /// waiting tunnels; a voucher of a channel the key no longer pays
    /// through still settles, but raises nothing here. Returns the payment
    /// round trip when the voucher pays the oldest unpaid invoice.
    pub fn accept(
        &self,
        channel: &ChannelId,
        cumulative: Amount,
        sequence: u64,
    ) -> Option<Duration> {
        let round_trip = {
            let mut state = self.lock();
            if state.binding.channel != *channel || sequence <= state.sequence {
                return None;
            }
            state.sequence = sequence;
            // A lower amount (the session checked it against the floor)
            // hands prepayment back: the allowance shrinks with it.
            state.paid = cumulative;
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

    /// Records that the voucher `sequence` paying cumulative `amount` on
    /// `channel` is synced, and wakes tunnels the unsynced bound held back.
    pub fn synced(&self, channel: &ChannelId, sequence: u64, amount: Amount) {
        {
            let mut state = self.lock();
            if state.binding.channel != *channel || sequence <= state.synced_sequence {
                return;
            }
            state.synced = amount;
            state.synced_sequence = sequence;
        }
        self.paid_more.notify_waiters();
    }

    /// Records the channel as the registry now shows it: a top-up raises
    /// what the escrow can pay for; a close request ends carrying on credit.
    pub fn observe_channel(&self, channel: &ChannelId, deposited: Amount, open: bool) {
        {
            let mut state = self.lock();
            if state.binding.channel != *channel {
                return;
            }
            state.binding.deposited = state.binding.deposited.max(deposited);
            state.closing |= !open;
        }
        self.paid_more.notify_waiters();
    }

    /// Bytes carried in this binding.
    #[cfg(test)]
    pub fn carried_bytes(&self) -> u64 {
        self.lock().carried_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;

    fn channel() -> ChannelId {
        ChannelId::from_bytes([1; 32])
    }

    fn binding(price_attos: u128, deposited_attos: u128) -> Binding {
        Binding {
            channel: channel(),
            price: PricePerByte::from_attos(price_attos).unwrap(),
            paid: Amount::from_attos(5_000).unwrap(),
            sequence: 3,
            deposited: Amount::from_attos(deposited_attos).unwrap(),
        }
    }

    fn meter(price_attos: u128, window: u64) -> Meter {
        let client = SecretKey::from_seed(&[1; 32]).public();
        Meter::new(client, window, binding(price_attos, u128::from(u64::MAX)), 0)
    }

    fn attos(value: u128) -> Amount {
        Amount::from_attos(value).unwrap()
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
        assert_eq!(meter.unpaid_bytes(), 1000);
    }

    #[test]
    fn unsynced_payment_carries_at_most_its_bound() {
        let meter = meter(1, 1000);
        let base = 5_000u128;
        // Paid far ahead, nothing synced: the window plus the unsynced bound.
        let paid = attos(base + u128::from(4 * MAX_UNSYNCED_BYTES));
        meter.accept(&channel(), paid, 4);
        let unsynced_limit = MAX_UNSYNCED_BYTES + 1000;
        assert_eq!(meter.reserve(u64::MAX), unsynced_limit);
        meter.commit(unsynced_limit, unsynced_limit);
        assert_eq!(meter.reserve(1), 0, "held back until a sync");
        // Another channel's sync, or an older voucher's, raises nothing.
        meter.synced(&ChannelId::from_bytes([2; 32]), 4, paid);
        meter.synced(&channel(), 3, paid);
        assert_eq!(meter.reserve(1), 0);
        // The sync of a voucher frees what it paid, and the bound again.
        meter.synced(&channel(), 4, attos(base + u128::from(MAX_UNSYNCED_BYTES)));
        assert_eq!(meter.reserve(u64::MAX), MAX_UNSYNCED_BYTES);
        meter.commit(MAX_UNSYNCED_BYTES, MAX_UNSYNCED_BYTES);
        // Synced beyond what is paid counts only what is paid.
        meter.accept(&channel(), paid, 5);
        meter.synced(&channel(), 5, Amount::MAX);
        let left = 4 * MAX_UNSYNCED_BYTES + 1000 - unsynced_limit - MAX_UNSYNCED_BYTES;
        assert_eq!(meter.reserve(u64::MAX), left);
    }

    #[test]
    fn vouchers_raise_the_allowance_by_what_they_pay() {
        let meter = meter(10, 1000);
        assert_eq!(meter.reserve(5000), 1000);
        assert!(meter.commit(1000, 1000), "half the window is uninvoiced");
        let due = meter.invoice().unwrap();
        assert_eq!(due, Due { channel: channel(), carried_bytes: 1000, amount: attos(15_000) });
        assert_eq!(meter.invoice(), Some(due), "a reminder while unpaid");
        assert!(meter.accept(&channel(), due.amount, 4).is_some(), "it pays the invoice");
        assert_eq!(meter.invoice(), None, "nothing new to invoice");
        assert_eq!(meter.reserve(5000), 1000, "paid 1000 bytes: another window's worth");
        meter.commit(1000, 1000);
        // Replays and other channels change nothing.
        assert_eq!(meter.accept(&channel(), attos(99_000), 4), None);
        assert_eq!(meter.accept(&ChannelId::from_bytes([2; 32]), attos(99_000), 9), None);
        assert_eq!(meter.reserve(1), 0);
        assert_eq!(meter.paid(), (due.amount, 4));
    }

    #[test]
    fn a_voucher_may_hand_back_prepayment_down_to_the_floor() {
        let meter = meter(10, 1000);
        let worth = |bytes: u128| attos(5_000 + 10 * bytes);
        meter.accept(&channel(), worth(5_000), 4);
        assert_eq!(meter.floor(), worth(0), "nothing carried: all of it may go back");
        assert_eq!(meter.reserve(3_000), 3_000);
        meter.commit(3_000, 2_500);
        // 2,500 carried: the floor leaves the relay at most the window unpaid.
        assert_eq!(meter.floor(), worth(1_500));
        meter.accept(&channel(), worth(1_500), 5);
        assert_eq!(meter.paid(), (worth(1_500), 5), "a lower amount counts");
        assert_eq!(meter.unpaid_bytes(), 1_000);
        assert_eq!(meter.reserve(1), 0, "the window is used up");
        // A closing channel carries nothing on credit: the floor is all of it.
        meter.observe_channel(&channel(), attos(u128::from(u64::MAX)), false);
        assert_eq!(meter.floor(), worth(2_500));
    }

    #[test]
    fn a_new_session_inherits_the_keys_debt() {
        let meter = meter(10, 1000);
        assert_eq!(meter.reserve(700), 700);
        meter.commit(700, 700);
        // The client reconnects, on the same channel or another: what it
        // left unpaid stays owed, and only the rest of the window is left.
        meter.rebind(binding(10, u128::from(u64::MAX)));
        assert_eq!(meter.unpaid_bytes(), 700);
        assert_eq!(meter.reserve(5000), 300);
        meter.commit(300, 300);
        meter.rebind(Binding { channel: ChannelId::from_bytes([2; 32]), ..binding(10, 1 << 60) });
        assert_eq!(meter.reserve(1), 0, "twenty sessions still share one window");
        // Paying for more than the new session carried pays the debt off.
        let paid = attos(5_000 + 10 * 400);
        meter.accept(&ChannelId::from_bytes([2; 32]), paid, 4);
        assert_eq!(meter.unpaid_bytes(), 600);
        assert_eq!(meter.reserve(5000), 400);
    }

    #[test]
    fn the_window_shrinks_to_what_the_escrow_can_pay() {
        let client = SecretKey::from_seed(&[1; 32]).public();
        // 5,000 paid of 5,001 deposited: one atto left pays for no byte.
        let meter = Meter::new(client, 1000, binding(10, 5_001), 0);
        assert_eq!(meter.reserve(1000), 0);
        // A top-up of 3,000 attos pays for 300 bytes.
        meter.observe_channel(&channel(), attos(8_001), true);
        assert_eq!(meter.reserve(1000), 300);
        meter.commit(300, 300);
        // Paying for them uses the escrow: nothing more on credit.
        meter.accept(&channel(), attos(8_000), 4);
        assert_eq!(meter.reserve(1000), 0);
    }

    #[test]
    fn a_closing_channel_carries_only_what_was_paid() {
        let meter = meter(10, 1000);
        meter.accept(&channel(), attos(7_000), 4);
        meter.observe_channel(&channel(), attos(1 << 60), false);
        assert_eq!(meter.reserve(5000), 200, "the 200 bytes paid for, no credit");
        meter.commit(200, 200);
        assert_eq!(meter.reserve(1), 0);
        meter.observe_channel(&channel(), attos(1 << 61), true);
        assert_eq!(meter.reserve(1), 0, "a closing channel does not reopen");
    }

    #[test]
    fn overflowing_amounts_saturate_on_the_safe_side() {
        let client = SecretKey::from_seed(&[1; 32]).public();
        let meter = Meter::new(client, u64::MAX, binding(1, u128::from(u64::MAX) * 4), u64::MAX);
        assert_eq!(meter.reserve(u64::MAX), 0, "a key owing u64::MAX bytes gets nothing");
        let meter = Meter::new(client, 1000, binding(1, u128::from(u64::MAX) * 4), 0);
        meter.accept(&channel(), attos(u128::from(u64::MAX) * 3), 4);
        meter.synced(&channel(), 4, attos(u128::from(u64::MAX) * 3));
        assert_eq!(meter.reserve(u64::MAX), u64::MAX, "paid beyond u64 bytes: capped, no wrap");
        meter.commit(u64::MAX, u64::MAX);
        assert_eq!(meter.unpaid_bytes(), 0);
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
        meter.accept(&channel(), attos(6_000), 4);
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
        meter.accept(&channel(), attos(6_000), 4);
        assert_eq!(meter.reserve(1000), 100);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "woken with nothing to carry, it waits on");
        meter.accept(&channel(), attos(7_000), 5);
        assert!(tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap());
    }

    #[test]
    fn a_free_relay_never_limits_nor_bills() {
        let meter = meter(0, 0);
        assert_eq!(meter.reserve(u64::MAX / 2), u64::MAX / 2);
        assert!(!meter.commit(u64::MAX / 2, u64::MAX / 2));
        assert_eq!(meter.invoice(), None);
        assert_eq!(meter.unpaid_bytes(), 0);
    }
}
