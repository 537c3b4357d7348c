//! The settlement worker: submits the newest stored voucher of every channel
//! to the registry in batches, on a timer and at shutdown. Each batch's
//! idempotency key is the hash of its vouchers, so a retry (after a timeout,
//! or after a crash and restart) pays nothing twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_client::RegistryError;
use ferry_proto::{Amount, ChannelId, SignedVoucher};

use crate::server::{Shared, lock};

/// The most vouchers one settlement request carries.
pub const SETTLEMENT_BATCH: usize = 1000;
/// The pause between attempts of the final settlement at shutdown.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// What one settlement round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SettleReport {
    /// Vouchers submitted.
    pub submitted: usize,
    /// Vouchers the ledger paid now.
    pub settled: usize,
    /// Vouchers the ledger had already paid (a retry).
    pub already_settled: usize,
    /// Vouchers the ledger refused; they are not submitted again.
    pub rejected: usize,
    /// Whether vouchers remain unsubmitted because the registry failed.
    pub incomplete: bool,
}

/// Per channel: the newest voucher the ledger answered for (settled, or
/// refused for good: either way not submitted again), and the cumulative
/// amount the ledger paid on it, which refused vouchers do not raise.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    channels: Mutex<HashMap<ChannelId, (u64, Amount)>>,
}

impl Settled {
    fn sequence(&self, channel: &ChannelId) -> u64 {
        lock(&self.channels).get(channel).map_or(0, |(sequence, _)| *sequence)
    }

    fn mark(&self, voucher: &SignedVoucher, paid: bool) {
        let mut channels = lock(&self.channels);
        let entry = channels.entry(voucher.voucher.channel).or_insert((0, Amount::ZERO));
        entry.0 = entry.0.max(voucher.voucher.sequence);
        if paid {
            entry.1 = entry.1.max(voucher.voucher.cumulative);
        }
    }

    fn total(&self) -> u128 {
        lock(&self.channels).values().map(|(_, amount)| amount.attos()).sum()
    }
}

/// Settles on the relay's timer until shutdown.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut timer = tokio::time::interval(shared.config.settle_interval);
    timer.tick().await;
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = timer.tick() => {}
            () = shared.settle_now.notified() => {}
            _ = shutdown.changed() => return,
        }
        let report = round(&shared, false).await;
        if report.incomplete {
            tracing::warn!("settlement round incomplete; the vouchers wait for the next round");
        }
    }
}

/// The last round at shutdown: retried until everything is submitted or
/// `deadline` passes.
pub(crate) async fn final_round(shared: &Shared, deadline: Duration) -> SettleReport {
    let until = Instant::now() + deadline;
    let mut total = SettleReport::default();
    loop {
        let report = round(shared, true).await;
        total.submitted += report.submitted;
        total.settled += report.settled;
        total.already_settled += report.already_settled;
        total.rejected += report.rejected;
        total.incomplete = report.incomplete;
        if !report.incomplete || Instant::now() + RETRY_PAUSE >= until {
            return total;
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Submits every stored voucher newer than what was settled, once they are
/// synced: the log never holds less than the ledger paid. For a channel
/// whose session is live and paid ahead of what it was carried, that is the
/// newest voucher the relay has earned, not the newest: its client may
/// still hand the prepayment back (docs/PROTOCOL.md, "Paying ahead"),
/// which it could not once the ledger paid it. The `last` round, at
/// shutdown, settles the newest of every channel.
pub(crate) async fn round(shared: &Shared, last: bool) -> SettleReport {
    if let Err(error) = shared.store.sync().await {
        tracing::error!(%error, "cannot sync the voucher log; not settling");
        return SettleReport { incomplete: true, ..SettleReport::default() };
    }
    let mut earned = HashMap::new();
    if !last {
        for session in lock(&shared.sessions).values() {
            if let Some(meter) = &session.meter
                && let Some(worth) = meter.earned()
            {
                earned.insert(meter.binding().channel, worth);
            }
        }
    }
    let received: u128 =
        shared.store.all_latest().iter().map(|v| v.voucher.cumulative.attos()).sum();
    let mut due: Vec<SignedVoucher> = shared
        .store
        .to_settle(&earned)
        .into_iter()
        .filter(|v| v.voucher.sequence > shared.settled.sequence(&v.voucher.channel))
        .collect();
    due.sort_by_key(|v| v.voucher.channel);
    let mut report = SettleReport::default();
    for batch in due.chunks(SETTLEMENT_BATCH) {
        match submit(shared, batch, &mut report).await {
            Ok(()) => {}
            Err(error) => {
                tracing::warn!(%error, vouchers = batch.len(), "settlement batch failed");
                report.incomplete = true;
            }
        }
    }
    shared.metrics.revenue(received, shared.settled.total());
    report
}

async fn submit(
    shared: &Shared,
    batch: &[SignedVoucher],
    report: &mut SettleReport,
) -> Result<(), RegistryError> {
    let mut hasher = blake3::Hasher::new();
    for voucher in batch {
        hasher.update(&voucher.encode());
    }
    let key = format!("settle-{}", &hasher.finalize().to_hex()[..40]);
    let answer = shared.registry.settle(batch, &key).await?;
    let outcomes =
        answer["outcomes"].as_array().filter(|outcomes| outcomes.len() == batch.len()).ok_or_else(
            || RegistryError::Unexpected("a settlement without one outcome per voucher".into()),
        )?;
    report.submitted += batch.len();
    for (voucher, outcome) in batch.iter().zip(outcomes) {
        let paid = match outcome["outcome"].as_str() {
            Some("settled") => {
                report.settled += 1;
                true
            }
            Some("already_settled") => {
                report.already_settled += 1;
                true
            }
            _ => {
                report.rejected += 1;
                tracing::warn!(channel = %voucher.voucher.channel, %outcome, "the ledger refused a voucher");
                false
            }
        };
        shared.settled.mark(voucher, paid);
    }
    Ok(())
}
