//! Settling vouchers: in batches, and as part of a relay's close.
//!
//! The transaction locks the batch's channels in id order, verifies every
//! signature against the locked rows' client keys (on all cores for a large
//! batch), judges every voucher in the order given, and writes all transfers,
//! balances and channel updates with a fixed handful of set-based statements,
//! whatever the batch size. Only the submitting relay's own channels are
//! locked, so verifying under the locks costs nothing in contention: a
//! channel has one relay, and only that relay settles it.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use ferry_proto::{Amount, ChannelId, PublicKey, SignedVoucher};

use crate::error::LedgerError;
use crate::ledger::{
    ChannelRow, Claim, Ledger, MAX_SETTLEMENT_BATCH, begin, channel_id_from_db, load_channel,
    select_channels,
};
use crate::model::{
    ChannelInfo, ChannelState, IdempotencyKey, Rejection, Settlement, SettlementOutcome,
    TransferKind,
};
use crate::postings::Postings;

/// Below this many vouchers, signatures are verified on the calling thread.
const PARALLEL_VERIFY_MIN: usize = 64;

/// What a valid voucher does to its channel.
enum Verdict {
    /// Pay this much more (the increase over what was settled).
    Pay(Amount),
    /// The same voucher was settled before.
    AlreadySettled,
}

impl Ledger {
    /// Settles a batch of vouchers for `relay`. Each voucher gets its own
    /// outcome, in the order given; a rejected voucher does not affect the
    /// others. Vouchers for one channel may repeat: each is judged against the
    /// channel as the earlier ones left it.
    pub async fn settle(
        &self,
        key: &IdempotencyKey,
        relay: &PublicKey,
        vouchers: &[SignedVoucher],
    ) -> Result<Settlement, LedgerError> {
        if vouchers.len() > MAX_SETTLEMENT_BATCH {
            return Err(LedgerError::BatchTooLarge {
                got: vouchers.len(),
                max: MAX_SETTLEMENT_BATCH,
            });
        }
        let request = ("settle", relay, vouchers);
        let mut op = match begin(&self.pool, "settle", relay, key, &request).await? {
            Claim::New(op) => op,
            Claim::Replay(outcomes) => return Ok(Settlement { outcomes, replayed: true }),
        };
        let mut ids: Vec<&[u8]> =
            vouchers.iter().map(|v| v.voucher.channel.as_bytes().as_slice()).collect();
        ids.sort_unstable();
        ids.dedup();
        // Only this relay's channels are locked: naming other relays'
        // channels must not let anyone hold their locks.
        let rows = sqlx::query(select_channels!(
            "WHERE c.id = ANY($1) AND c.relay_key = $2 ORDER BY c.id FOR UPDATE OF c"
        ))
        .bind(&ids)
        .bind(relay.as_bytes().as_slice())
        .fetch_all(&mut *op.tx)
        .await?;
        let mut channels = HashMap::with_capacity(rows.len());
        for row in &rows {
            let row = ChannelRow::from_row(row)?;
            channels.insert(row.id, row);
        }
        let foreign = foreign_channels(&mut op.tx, &ids, &channels).await?;
        let signature_ok = verify_signatures(&channels, vouchers).await?;

        let mut outcomes = Vec::with_capacity(vouchers.len());
        let mut payments: Vec<(ChannelId, Amount)> = Vec::new();
        for (voucher, signature_ok) in vouchers.iter().zip(&signature_ok) {
            let channel = voucher.voucher.channel;
            let sequence = voucher.voucher.sequence;
            let verdict = match channels.get(&channel) {
                Some(row) => judge(row, relay, voucher, *signature_ok, op.now),
                None if foreign.contains(&channel) => Err(Rejection::WrongRelay),
                None => Err(Rejection::UnknownChannel),
            };
            outcomes.push(match verdict {
                Err(reason) => SettlementOutcome::Rejected { channel, sequence, reason },
                Ok(Verdict::AlreadySettled) => {
                    SettlementOutcome::AlreadySettled { channel, sequence }
                }
                Ok(Verdict::Pay(increase)) => {
                    let row = channels
                        .get_mut(&channel)
                        .ok_or_else(|| LedgerError::Corrupt("judged channel vanished".into()))?;
                    row.settled = voucher.voucher.cumulative;
                    row.last_sequence = sequence;
                    payments.push((channel, increase));
                    let (paid, fee) = self.split_fee(increase)?;
                    SettlementOutcome::Settled { channel, sequence, paid, fee }
                }
            });
        }

        let committed = if !payments.is_empty() {
            let mut accounts = vec![self.treasury];
            for (channel, _) in &payments {
                let row = channel_row(&channels, channel)?;
                accounts.extend([row.escrow_account, row.relay_account]);
            }
            let mut postings = Postings::lock(&mut op.tx, &accounts).await?;
            for (channel, increase) in &payments {
                self.pay(&mut postings, channel_row(&channels, channel)?, *increase)?;
            }
            let mut paid: Vec<&ChannelRow> = payments
                .iter()
                .map(|(channel, _)| channel_row(&channels, channel))
                .collect::<Result<_, _>>()?;
            paid.sort_unstable_by_key(|row| row.id);
            paid.dedup_by_key(|row| row.id);
            op.commit(postings, &paid, outcomes).await
        } else {
            op.commit(Postings::none(), &[], outcomes).await
        };
        committed.map(|outcomes| Settlement { outcomes, replayed: false })
    }

    /// The relay closes a channel at once: it settles `final_voucher` (if
    /// any) and the rest of the escrow goes back to the client. A final
    /// voucher that is rejected fails the whole close, which changes nothing.
    pub async fn close_by_relay(
        &self,
        key: &IdempotencyKey,
        relay: &PublicKey,
        channel: &ChannelId,
        final_voucher: Option<&SignedVoucher>,
    ) -> Result<ChannelInfo, LedgerError> {
        if final_voucher.is_some_and(|voucher| voucher.voucher.channel != *channel) {
            return Err(LedgerError::VoucherRejected(Rejection::UnknownChannel));
        }
        let request = ("close_by_relay", relay, channel, final_voucher);
        let mut op = match begin(&self.pool, "close_by_relay", relay, key, &request).await? {
            Claim::New(op) => op,
            Claim::Replay(info) => return Ok(info),
        };
        let mut row = load_channel(&mut op.tx, channel, true).await?;
        if row.relay != *relay {
            return Err(LedgerError::NotParticipant { role: "relay" });
        }
        if row.state == ChannelState::Closed {
            return Err(LedgerError::WrongState { channel: *channel, state: row.state });
        }
        let increase = match final_voucher {
            None => Amount::ZERO,
            Some(voucher) => {
                let signature_ok = voucher.verify(&row.client).is_ok();
                match judge(&row, relay, voucher, signature_ok, op.now) {
                    Ok(Verdict::Pay(increase)) => {
                        row.settled = voucher.voucher.cumulative;
                        row.last_sequence = voucher.voucher.sequence;
                        increase
                    }
                    Ok(Verdict::AlreadySettled) => Amount::ZERO,
                    Err(reason) => return Err(LedgerError::VoucherRejected(reason)),
                }
            }
        };
        let accounts = [self.treasury, row.escrow_account, row.relay_account, row.client_account];
        let mut postings = Postings::lock(&mut op.tx, &accounts).await?;
        self.pay(&mut postings, &row, increase)?;
        self.refund_and_close(&mut postings, &mut row, op.now)?;
        let info = row.clone().into_info()?;
        op.commit(postings, &[&row], info).await
    }

    /// Splits a voucher's `increase` into what the relay is paid and the
    /// registry's fee; the two always add up to `increase`.
    fn split_fee(&self, increase: Amount) -> Result<(Amount, Amount), LedgerError> {
        let fee = increase.basis_points(self.config.fee_basis_points);
        Ok((increase.checked_sub(fee)?, fee))
    }

    /// Pays `increase` out of a channel's escrow: the fee to the treasury and
    /// the rest to the relay.
    fn pay(
        &self,
        postings: &mut Postings,
        row: &ChannelRow,
        increase: Amount,
    ) -> Result<(), LedgerError> {
        let (paid, fee) = self.split_fee(increase)?;
        let (escrow, channel) = (row.escrow_account, Some(row.id));
        postings.transfer(TransferKind::Settlement, escrow, row.relay_account, paid, channel)?;
        postings.transfer(TransferKind::Fee, escrow, self.treasury, fee, channel)
    }
}

/// The ids among `ids` that name existing channels of other relays (not in
/// `own`), read without locking them, so their vouchers are rejected as
/// `wrong_relay` rather than `unknown_channel`.
async fn foreign_channels(
    conn: &mut sqlx::PgConnection,
    ids: &[&[u8]],
    own: &HashMap<ChannelId, ChannelRow>,
) -> Result<HashSet<ChannelId>, LedgerError> {
    if own.len() == ids.len() {
        return Ok(HashSet::new());
    }
    let others: Vec<&[u8]> = ids
        .iter()
        .copied()
        .filter(|id| {
            <[u8; 32]>::try_from(*id).is_ok_and(|id| !own.contains_key(&ChannelId::from_bytes(id)))
        })
        .collect();
    let found: Vec<Vec<u8>> = sqlx::query_scalar("SELECT id FROM channels WHERE id = ANY($1)")
        .bind(&others)
        .fetch_all(conn)
        .await?;
    found.iter().map(|id| channel_id_from_db(Some(id))).collect()
}

/// Whether each voucher carries its channel client's signature, checked
/// against the locked channel rows. Vouchers for unknown channels count as
/// unsigned; they are rejected as unknown later.
async fn verify_signatures(
    channels: &HashMap<ChannelId, ChannelRow>,
    vouchers: &[SignedVoucher],
) -> Result<Vec<bool>, LedgerError> {
    let clients: HashMap<ChannelId, PublicKey> =
        channels.iter().map(|(id, row)| (*id, row.client)).collect();
    if vouchers.len() < PARALLEL_VERIFY_MIN {
        return Ok(verify_chunk(vouchers, &clients));
    }
    let vouchers = vouchers.to_vec();
    let expected = vouchers.len();
    let verified = tokio::task::spawn_blocking(move || {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let chunk = vouchers.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = vouchers
                .chunks(chunk)
                .map(|part| scope.spawn(|| verify_chunk(part, &clients)))
                .collect();
            // A panicked thread yields no results, which the length check catches.
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect::<Vec<_>>()
        })
    })
    .await
    .map_err(|error| LedgerError::Corrupt(format!("signature verification failed: {error}")))?;
    if verified.len() != expected {
        return Err(LedgerError::Corrupt("signature verification lost results".into()));
    }
    Ok(verified)
}

fn verify_chunk(vouchers: &[SignedVoucher], clients: &HashMap<ChannelId, PublicKey>) -> Vec<bool> {
    vouchers
        .iter()
        .map(|voucher| {
            clients
                .get(&voucher.voucher.channel)
                .is_some_and(|client| voucher.verify(client).is_ok())
        })
        .collect()
}

fn channel_row<'a>(
    channels: &'a HashMap<ChannelId, ChannelRow>,
    channel: &ChannelId,
) -> Result<&'a ChannelRow, LedgerError> {
    channels
        .get(channel)
        .ok_or_else(|| LedgerError::Corrupt(format!("channel {channel} not locked")))
}

/// Decides what a voucher does to the locked channel `row`, in a fixed order
/// of checks documented in docs/LEDGER.md.
fn judge(
    row: &ChannelRow,
    relay: &PublicKey,
    voucher: &SignedVoucher,
    signature_ok: bool,
    now: DateTime<Utc>,
) -> Result<Verdict, Rejection> {
    let SignedVoucher { voucher, .. } = voucher;
    if row.relay != *relay {
        return Err(Rejection::WrongRelay);
    }
    if !signature_ok {
        return Err(Rejection::BadSignature);
    }
    if voucher.check_fields().is_err() {
        return Err(Rejection::SequenceOutOfRange);
    }
    if voucher.sequence == row.last_sequence && voucher.cumulative == row.settled {
        return Ok(Verdict::AlreadySettled);
    }
    match row.state {
        ChannelState::Closed => return Err(Rejection::ChannelClosed),
        ChannelState::Closing if row.dispute_deadline.is_some_and(|deadline| now > deadline) => {
            return Err(Rejection::DisputeWindowOver);
        }
        _ => {}
    }
    if voucher.sequence <= row.last_sequence {
        return Err(Rejection::StaleSequence {
            sequence: voucher.sequence,
            last: row.last_sequence,
        });
    }
    if voucher.cumulative > row.deposited {
        return Err(Rejection::ExceedsEscrow {
            cumulative: voucher.cumulative,
            deposited: row.deposited,
        });
    }
    voucher.cumulative.checked_sub(row.settled).map(Verdict::Pay).map_err(|_| {
        Rejection::AmountDecreased { cumulative: voucher.cumulative, settled: row.settled }
    })
}
