//! The double-entry ledger of ferry, with payment channels, on Postgres.
//!
//! Money lives in accounts: the outside world, the registry's treasury, one
//! account per ed25519 key (a "holder", used both as a client and as a relay)
//! and one escrow account per payment channel. Money only moves by immutable
//! transfers from one account to another; each account caches its balance, and
//! [`Ledger::check`] proves at any time that the caches equal the transfers and
//! that the invariants in `docs/LEDGER.md` hold.
//!
//! Every operation is idempotent: it is named by an [`IdempotencyKey`] in the
//! namespace of the key it acts for, and repeating it returns the first answer
//! without moving money again.
//!
//! # Locking
//!
//! Every operation runs in one READ COMMITTED transaction that takes row locks
//! in one global order: its operations row, then channels by id, then accounts
//! by id, each with `SELECT … FOR UPDATE`. No transaction waits for a lock
//! that sorts before one it holds, so transactions cannot deadlock, and each
//! decision is made on locked, current rows.

mod check;
pub mod embedded;
mod error;
mod ledger;
mod model;
mod postings;
mod settle;
pub mod testing;

pub use check::{CheckReport, Violation};
pub use error::LedgerError;
pub use ledger::{
    Ledger, LedgerConfig, MAX_CHANNELS_LISTED, MAX_DISPUTE_WINDOW, MAX_SETTLEMENT_BATCH,
    MAX_STATEMENT_PAGE,
};
pub use model::{
    AccountKind, AccountRef, BalanceSummary, ChannelInfo, ChannelState, IdempotencyKey,
    IdempotencyKeyError, Rejection, Settlement, SettlementOutcome, Statement, StatementEntry,
    TransferKind, TransferReceipt,
};

/// The database migrations, embedded in the binary and applied on start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
