//! Double-entry postings: money moved between locked accounts in memory,
//! then written in one batch.
//!
//! An operation locks every account it touches (in id order), moves money
//! between them here with every bound checked, and only then writes the
//! transfers and new balances. A failed check therefore writes nothing.

use std::collections::HashMap;

use ferry_proto::{Amount, Balance, ChannelId};
use sqlx::{PgConnection, Row};

use crate::error::LedgerError;
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

/// Accounts locked by the current transaction and the transfers between them.
pub(crate) struct Postings {
    accounts: HashMap<i64, LockedAccount>,
    transfers: Vec<NewTransfer>,
}

impl Postings {
    /// Locks `ids` (`SELECT … FOR UPDATE`, in id order) and reads their balances.
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
            return Err(LedgerError::Corrupt(format!("missing accounts among {ids:?}")));
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
    /// would go below zero (only the world may) or a holder would go above the
    /// maximum amount.
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
        let to = self.account(credit)?;
        let credit_after = to.balance.checked_add(amount)?;
        if to.kind == AccountKind::Holder && credit_after > Balance::from(Amount::MAX) {
            return Err(LedgerError::BalanceLimit);
        }
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

    /// Writes the transfers (attributed to `operation_id`) and the new
    /// balances, and returns the new transfers' ids in order.
    pub(crate) async fn write(
        self,
        conn: &mut PgConnection,
        operation_id: i64,
    ) -> Result<Vec<i64>, LedgerError> {
        if self.transfers.is_empty() {
            return Ok(Vec::new());
        }
        let count = self.transfers.len();
        let mut kinds = Vec::with_capacity(count);
        let mut debits = Vec::with_capacity(count);
        let mut credits = Vec::with_capacity(count);
        let mut amounts = Vec::with_capacity(count);
        let mut debit_afters = Vec::with_capacity(count);
        let mut credit_afters = Vec::with_capacity(count);
        let mut channels: Vec<Option<Vec<u8>>> = Vec::with_capacity(count);
        for transfer in &self.transfers {
            kinds.push(transfer.kind.as_str());
            debits.push(transfer.debit);
            credits.push(transfer.credit);
            amounts.push(transfer.amount.to_string());
            debit_afters.push(transfer.debit_after.to_string());
            credit_afters.push(transfer.credit_after.to_string());
            channels.push(transfer.channel.map(|id| id.as_bytes().to_vec()));
        }
        let ids: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO transfers (operation_id, kind, debit_account, credit_account, amount, \
                                    debit_balance_after, credit_balance_after, channel_id) \
             SELECT $1, kind, debit, credit, amount::numeric, debit_after::numeric, \
                    credit_after::numeric, channel \
             FROM unnest($2::text[], $3::int8[], $4::int8[], $5::text[], $6::text[], $7::text[], \
                         $8::bytea[]) WITH ORDINALITY \
                  AS t(kind, debit, credit, amount, debit_after, credit_after, channel, position) \
             ORDER BY position \
             RETURNING id",
        )
        .bind(operation_id)
        .bind(&kinds)
        .bind(&debits)
        .bind(&credits)
        .bind(&amounts)
        .bind(&debit_afters)
        .bind(&credit_afters)
        .bind(&channels)
        .fetch_all(&mut *conn)
        .await?;

        let (account_ids, balances): (Vec<i64>, Vec<String>) =
            self.accounts.iter().map(|(id, account)| (*id, account.balance.to_string())).unzip();
        sqlx::query(
            "UPDATE accounts SET balance = u.balance::numeric \
             FROM unnest($1::int8[], $2::text[]) AS u(id, balance) WHERE accounts.id = u.id",
        )
        .bind(&account_ids)
        .bind(&balances)
        .execute(&mut *conn)
        .await?;
        Ok(ids)
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
