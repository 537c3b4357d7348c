//! The ledger's invariants, checked against the whole database.
//!
//! Each invariant is one query that returns the rows violating it, so a
//! healthy ledger returns nothing. docs/LEDGER.md says why each one holds.

use serde::Serialize;
use sqlx::AssertSqlSafe;

use crate::error::LedgerError;
use crate::ledger::Ledger;

/// How many violating rows of one invariant a report quotes.
const MAX_QUOTED_VIOLATIONS: i64 = 20;

/// One broken invariant, with a few of the rows that break it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The invariant's name, as in docs/LEDGER.md.
    pub invariant: &'static str,
    /// Descriptions of (up to 20) offending rows.
    pub rows: Vec<String>,
}

/// The result of checking every invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// The invariants that were checked, in order.
    pub checked: Vec<&'static str>,
    /// The ones that do not hold; empty for a healthy ledger.
    pub violations: Vec<Violation>,
    /// Counts of accounts, transfers and channels, for the record.
    pub accounts: i64,
    /// How many transfers there are.
    pub transfers: i64,
    /// How many channels there are.
    pub channels: i64,
}

impl CheckReport {
    /// Whether every invariant holds.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Each invariant and the query that lists its violations as text.
const INVARIANTS: &[(&str, &str)] = &[
    (
        "every transfer references an existing operation, accounts and channel",
        "SELECT 'transfer ' || t.id || ' references a missing '
                || CASE WHEN o.id IS NULL THEN 'operation' WHEN d.id IS NULL OR c.id IS NULL THEN 'account'
                        ELSE 'channel' END
         FROM transfers t
         LEFT JOIN operations o ON o.id = t.operation_id
         LEFT JOIN accounts d ON d.id = t.debit_account
         LEFT JOIN accounts c ON c.id = t.credit_account
         LEFT JOIN channels ch ON ch.id = t.channel_id
         WHERE o.id IS NULL OR d.id IS NULL OR c.id IS NULL OR (t.channel_id IS NOT NULL AND ch.id IS NULL)",
    ),
    (
        "every transfer moves a positive amount between two different accounts",
        "SELECT 'transfer ' || id || ': ' || amount || ' from ' || debit_account || ' to ' || credit_account
         FROM transfers WHERE amount <= 0 OR debit_account = credit_account",
    ),
    (
        "each account's balance equals its credits minus its debits",
        "SELECT 'account ' || a.id || ' (' || a.kind || '): cached ' || a.balance || ', transfers say '
                || (coalesce(c.total, 0) - coalesce(d.total, 0))
         FROM accounts a
         LEFT JOIN (SELECT credit_account AS id, sum(amount) AS total FROM transfers GROUP BY 1) c USING (id)
         LEFT JOIN (SELECT debit_account AS id, sum(amount) AS total FROM transfers GROUP BY 1) d USING (id)
         WHERE a.balance <> coalesce(c.total, 0) - coalesce(d.total, 0)",
    ),
    (
        "each transfer's recorded balances-after equal the running sums",
        "WITH legs AS (
             SELECT id, debit_account AS account, -amount AS change, debit_balance_after AS after FROM transfers
             UNION ALL
             SELECT id, credit_account, amount, credit_balance_after FROM transfers
         ), running AS (
             SELECT id, account, after, sum(change) OVER (PARTITION BY account ORDER BY id) AS total FROM legs
         )
         SELECT 'transfer ' || id || ', account ' || account || ': recorded ' || after || ', running ' || total
         FROM running WHERE after <> total",
    ),
    (
        "the sum of all balances is zero",
        "SELECT 'sum of balances is ' || sum(balance) FROM accounts HAVING sum(balance) <> 0",
    ),
    (
        "no account but the outside world is negative, and the world is not positive",
        "SELECT 'account ' || id || ' (' || kind || '): ' || balance FROM accounts
         WHERE (kind <> 'world' AND balance < 0) OR (kind = 'world' AND balance > 0)",
    ),
    (
        "each channel's escrow equals deposited minus settled minus refunded",
        "SELECT 'channel ' || encode(c.id, 'hex') || ': escrow ' || a.balance || ', expected '
                || (c.deposited - c.settled - c.refunded)
         FROM channels c JOIN accounts a ON a.id = c.escrow_account
         WHERE a.balance <> c.deposited - c.settled - c.refunded",
    ),
    (
        "each channel's totals equal its transfers",
        "SELECT 'channel ' || encode(c.id, 'hex') || ': deposited ' || c.deposited || '/' || coalesce(t.funded, 0)
                || ', settled ' || c.settled || '/' || coalesce(t.paid, 0)
                || ', refunded ' || c.refunded || '/' || coalesce(t.refunded, 0)
         FROM channels c
         LEFT JOIN (SELECT channel_id,
                           sum(amount) FILTER (WHERE kind = 'funding') AS funded,
                           sum(amount) FILTER (WHERE kind IN ('settlement', 'fee')) AS paid,
                           sum(amount) FILTER (WHERE kind = 'refund') AS refunded
                    FROM transfers WHERE channel_id IS NOT NULL GROUP BY channel_id) t ON t.channel_id = c.id
         WHERE c.deposited <> coalesce(t.funded, 0) OR c.settled <> coalesce(t.paid, 0)
            OR c.refunded <> coalesce(t.refunded, 0)",
    ),
    (
        "settled never exceeds deposited, and a closed channel's escrow is empty",
        "SELECT 'channel ' || encode(c.id, 'hex') || ' (' || c.state || '): deposited ' || c.deposited
                || ', settled ' || c.settled || ', escrow ' || a.balance
         FROM channels c JOIN accounts a ON a.id = c.escrow_account
         WHERE c.settled > c.deposited OR (c.state = 'closed' AND a.balance <> 0)",
    ),
    (
        "channel money moves only through the channel's own escrow",
        "SELECT 'transfer ' || t.id || ' (' || t.kind || ') of channel ' || encode(t.channel_id, 'hex')
         FROM transfers t JOIN channels c ON c.id = t.channel_id
         WHERE c.escrow_account NOT IN (t.debit_account, t.credit_account)",
    ),
    (
        "every finished operation has a stored response",
        "SELECT 'operation ' || id || ' (' || kind || ', key ' || idempotency_key || ')'
         FROM operations WHERE response IS NULL",
    ),
];

impl Ledger {
    /// Checks every invariant in one consistent snapshot (a REPEATABLE READ,
    /// read-only transaction), so a check under load never sees half an
    /// operation.
    pub async fn check(&self) -> Result<CheckReport, LedgerError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let mut violations = Vec::new();
        for (invariant, query) in INVARIANTS {
            let rows: Vec<String> =
                // Every part of this string is a constant of this file.
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT * FROM ({query}) AS v LIMIT $1")))
                    .bind(MAX_QUOTED_VIOLATIONS)
                    .fetch_all(&mut *tx)
                    .await?;
            if !rows.is_empty() {
                violations.push(Violation { invariant, rows });
            }
        }
        let (accounts, transfers, channels): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM transfers), \
                    (SELECT count(*) FROM channels)",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(CheckReport {
            checked: INVARIANTS.iter().map(|(name, _)| *name).collect(),
            violations,
            accounts,
            transfers,
            channels,
        })
    }
}
