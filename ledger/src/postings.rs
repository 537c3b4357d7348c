//! Double-entry postings: money moved between locked accounts in memory,
//! then written, with everything else the operation decided, in one statement.
//!
//! An operation locks every account it touches (in id order), moves money
//! between them here with every bound checked, and only then writes. A failed
//! check therefore writes nothing.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use ferry_proto::{Amount, Balance, ChannelId};
use sqlx::{PgConnection, Row};

use crate::error::LedgerError;
use crate::ledger::ChannelRow;
use crate::model::{AccountKind, TransferKind};

struct LockedAccount {
    kind: AccountKind,
    balance: Balance,
}

struct NewTransfer {
    kind: TransferKind,
    debit: i64,
    credit: i64,
    amount: Amount,
    debit_after: Balance,
    credit_after: Balance,
    channel: Option<ChannelId>,
}

/// Channel rows as columns, for one `unnest`.
struct ChannelStates {
    ids: Vec<Vec<u8>>,
    states: Vec<&'static str>,
    deposited: Vec<String>,
    settled: Vec<String>,
    refunded: Vec<String>,
    last_sequences: Vec<i64>,
    close_requested_at: Vec<Option<DateTime<Utc>>>,
    dispute_deadlines: Vec<Option<DateTime<Utc>>>,
    closed_at: Vec<Option<DateTime<Utc>>>,
}

impl ChannelStates {
    fn of(rows: &[&ChannelRow]) -> Result<ChannelStates, LedgerError> {
        let mut columns = ChannelStates {
            ids: Vec::with_capacity(rows.len()),
            states: Vec::with_capacity(rows.len()),
            deposited: Vec::with_capacity(rows.len()),
            settled: Vec::with_capacity(rows.len()),
            refunded: Vec::with_capacity(rows.len()),
            last_sequences: Vec::with_capacity(rows.len()),
            close_requested_at: Vec::with_capacity(rows.len()),
            dispute_deadlines: Vec::with_capacity(rows.len()),
            closed_at: Vec::with_capacity(rows.len()),
        };
        for row in rows {
            columns.ids.push(row.id.as_bytes().to_vec());
            columns.states.push(row.state.as_str());
            columns.deposited.push(row.deposited.to_string());
            columns.settled.push(row.settled.to_string());
            columns.refunded.push(row.refunded.to_string());
            columns.last_sequences.push(
                i64::try_from(row.last_sequence)
                    .map_err(|_| LedgerError::Corrupt("sequence above 2^63 - 1".into()))?,
            );
            columns.close_requested_at.push(row.close_requested_at);
            columns.dispute_deadlines.push(row.dispute_deadline);
            columns.closed_at.push(row.closed_at);
        }
        Ok(columns)
    }
}

/// Accounts locked by the current transaction and the transfers between them.
pub(crate) struct Postings {
    accounts: HashMap<i64, LockedAccount>,
    transfers: Vec<NewTransfer>,
}

impl Postings {
    /// Postings that lock and move nothing, for operations that only change
    /// a channel's state.
    pub(crate) fn none() -> Postings {
        Postings { accounts: HashMap::new(), transfers: Vec::new() }
    }

    /// Locks the accounts `ids` (`SELECT … FOR UPDATE`, in id order) and
    /// reads their balances. Every one of them must exist.
    pub(crate) async fn lock(
        conn: &mut PgConnection,
        ids: &[i64],
    ) -> Result<Postings, LedgerError> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let rows = sqlx::query(
            "SELECT id, kind, balance::text AS balance FROM accounts \
             WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?;
        if rows.len() != ids.len() {
            return Err(LedgerError::Corrupt(format!(
                "accounts to lock are missing among {ids:?}"
            )));
        }
        let mut accounts = HashMap::with_capacity(rows.len());
        for row in rows {
            let kind: String = row.try_get("kind")?;
            let balance: String = row.try_get("balance")?;
            accounts.insert(
                row.try_get::<i64, _>("id")?,
                LockedAccount {
                    kind: kind.parse().map_err(LedgerError::Corrupt)?,
                    balance: parse_db(&balance)?,
                },
            );
        }
        Ok(Postings { accounts, transfers: Vec::new() })
    }

    /// The balance of a locked account, including the transfers so far.
    pub(crate) fn balance(&self, id: i64) -> Result<Balance, LedgerError> {
        self.account(id).map(|account| account.balance)
    }

    /// Moves `amount` from `debit` to `credit`. A zero amount moves nothing and
    /// records nothing. Errors, and changes nothing, if the debited account
    /// would go below zero (only the world may).
    pub(crate) fn transfer(
        &mut self,
        kind: TransferKind,
        debit: i64,
        credit: i64,
        amount: Amount,
        channel: Option<ChannelId>,
    ) -> Result<(), LedgerError> {
        if amount.is_zero() {
            return Ok(());
        }
        if debit == credit {
            return Err(LedgerError::Corrupt(format!("transfer from account {debit} to itself")));
        }
        let from = self.account(debit)?;
        let debit_after = from.balance.checked_sub(amount)?;
        if from.kind != AccountKind::World && debit_after < Balance::ZERO {
            return Err(LedgerError::InsufficientBalance {
                available: from.balance,
                needed: amount,
            });
        }
        let credit_after = self.account(credit)?.balance.checked_add(amount)?;
        self.account_mut(debit)?.balance = debit_after;
        self.account_mut(credit)?.balance = credit_after;
        self.transfers.push(NewTransfer {
            kind,
            debit,
            credit,
            amount,
            debit_after,
            credit_after,
            channel,
        });
        Ok(())
    }

    /// Writes everything the operation decided, in one statement: the
    /// transfers (attributed to `operation_id`), the accounts' new balances,
    /// the new state of `channels`, and the operation's `response` for
    /// replays. One statement per operation keeps settlement's round trips
    /// fewer than a pgbench transaction's.
    pub(crate) async fn write(
        self,
        conn: &mut PgConnection,
        operation_id: i64,
        channels: &[&ChannelRow],
        response: &impl Serialize,
    ) -> Result<(), LedgerError> {
        let response = serde_json::to_value(response)
            .map_err(|error| LedgerError::Corrupt(format!("encoding a response: {error}")))?;
        let count = self.transfers.len();
        let mut kinds = Vec::with_capacity(count);
        let mut debits = Vec::with_capacity(count);
        let mut credits = Vec::with_capacity(count);
        let mut amounts = Vec::with_capacity(count);
        let mut debit_afters = Vec::with_capacity(count);
        let mut credit_afters = Vec::with_capacity(count);
        let mut transfer_channels: Vec<Option<Vec<u8>>> = Vec::with_capacity(count);
        for transfer in &self.transfers {
            kinds.push(transfer.kind.as_str());
            debits.push(transfer.debit);
            credits.push(transfer.credit);
            amounts.push(transfer.amount.to_string());
            debit_afters.push(transfer.debit_after.to_string());
            credit_afters.push(transfer.credit_after.to_string());
            transfer_channels.push(transfer.channel.map(|id| id.as_bytes().to_vec()));
        }
        let (account_ids, balances): (Vec<i64>, Vec<String>) =
            self.accounts.iter().map(|(id, account)| (*id, account.balance.to_string())).unzip();
        let states = ChannelStates::of(channels)?;
        sqlx::query(
            "WITH new_balances AS ( \
                 UPDATE accounts SET balance = u.balance::numeric \
                 FROM unnest($9::int8[], $10::text[]) AS u(id, balance) WHERE accounts.id = u.id \
             ), new_channel_states AS ( \
                 UPDATE channels SET state = u.state, deposited = u.deposited::numeric, \
                     settled = u.settled::numeric, refunded = u.refunded::numeric, \
                     last_sequence = u.last_sequence, close_requested_at = u.close_requested_at, \
                     dispute_deadline = u.dispute_deadline, closed_at = u.closed_at \
                 FROM unnest($11::bytea[], $12::text[], $13::text[], $14::text[], $15::text[], \
                             $16::int8[], $17::timestamptz[], $18::timestamptz[], $19::timestamptz[]) \
                      AS u(id, state, deposited, settled, refunded, last_sequence, \
                           close_requested_at, dispute_deadline, closed_at) \
                 WHERE channels.id = u.id \
             ), finished AS ( \
                 UPDATE operations SET response = $20 WHERE id = $1 \
             ) \
             INSERT INTO transfers (operation_id, kind, debit_account, credit_account, amount, \
                                    debit_balance_after, credit_balance_after, channel_id) \
             SELECT $1, kind, debit, credit, amount::numeric, debit_after::numeric, \
                    credit_after::numeric, channel \
             FROM unnest($2::text[], $3::int8[], $4::int8[], $5::text[], $6::text[], $7::text[], \
                         $8::bytea[]) WITH ORDINALITY \
                  AS t(kind, debit, credit, amount, debit_after, credit_after, channel, position) \
             ORDER BY position",
        )
        .bind(operation_id)
        .bind(&kinds)
        .bind(&debits)
        .bind(&credits)
        .bind(&amounts)
        .bind(&debit_afters)
        .bind(&credit_afters)
        .bind(&transfer_channels)
        .bind(&account_ids)
        .bind(&balances)
        .bind(&states.ids)
        .bind(&states.states)
        .bind(&states.deposited)
        .bind(&states.settled)
        .bind(&states.refunded)
        .bind(&states.last_sequences)
        .bind(&states.close_requested_at)
        .bind(&states.dispute_deadlines)
        .bind(&states.closed_at)
        .bind(response)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    fn account(&self, id: i64) -> Result<&LockedAccount, LedgerError> {
        self.accounts
            .get(&id)
            .ok_or_else(|| LedgerError::Corrupt(format!("account {id} was not locked")))
    }

    fn account_mut(&mut self, id: i64) -> Result<&mut LockedAccount, LedgerError> {
        self.accounts
            .get_mut(&id)
            .ok_or_else(|| LedgerError::Corrupt(format!("account {id} was not locked")))
    }
}

/// Parses a money column read as text (`column::text`).
pub(crate) fn parse_db<T: std::str::FromStr>(text: &str) -> Result<T, LedgerError>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(|error| LedgerError::Corrupt(format!("money value {text:?}: {error}")))
}
