//! The ledger's errors: each bad input has its own variant, and none of them
//! carries database details to the caller.

use ferry_proto::{Amount, AmountError, Balance, ChannelId};

use crate::model::{ChannelState, Rejection};

/// Why a ledger operation did not happen. An operation that returns an error
/// moved no money and recorded nothing, except that it may have created an
/// empty account for a relay it names.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// An amount that must be positive was zero.
    #[error("the amount must be greater than zero")]
    ZeroAmount,
    /// An amount was malformed, negative, too precise or too large.
    #[error("invalid amount: {0}")]
    Amount(#[from] AmountError),
    /// The account does not hold enough money.
    #[error("insufficient balance: {available} available, {needed} needed")]
    InsufficientBalance {
        /// What the account holds.
        available: Balance,
        /// What the operation needs.
        needed: Amount,
    },
    /// The idempotency key was already used, in this key's namespace, for a
    /// request with a different body.
    #[error("idempotency key {0:?} was already used for a different request")]
    IdempotencyConflict(String),
    /// No channel has this id.
    #[error("unknown channel {0}")]
    UnknownChannel(ChannelId),
    /// A channel with this id (the same client, relay and nonce) already exists.
    #[error("channel {0} already exists; choose another nonce")]
    ChannelExists(ChannelId),
    /// The acting key is not the channel's client (or relay, for relay actions).
    #[error("this key is not the channel's {role}")]
    NotParticipant {
        /// The role the operation needs: "client" or "relay".
        role: &'static str,
    },
    /// The channel is not in a state that allows the operation.
    #[error("channel {channel} is {state}, which does not allow this")]
    WrongState {
        /// The channel.
        channel: ChannelId,
        /// Its current state.
        state: ChannelState,
    },
    /// Finalizing before the dispute window has passed.
    #[error("the dispute window is open until {deadline}; finalize after it")]
    DisputeWindowOpen {
        /// When the window closes.
        deadline: chrono::DateTime<chrono::Utc>,
    },
    /// A client and a relay must be different keys.
    #[error("a channel's client and relay must be different keys")]
    SameKey,
    /// A batch of vouchers larger than [`crate::MAX_SETTLEMENT_BATCH`].
    #[error("{got} vouchers in one batch; at most {max} are allowed")]
    BatchTooLarge {
        /// How many were sent.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A statement page larger than [`crate::MAX_STATEMENT_PAGE`] (or zero).
    #[error("page size {got} is out of range 1..={max}")]
    PageSize {
        /// What was asked for.
        got: u32,
        /// The limit.
        max: u32,
    },
    /// The final voucher given with a relay's close was not accepted.
    #[error("the final voucher was rejected: {0}")]
    VoucherRejected(Rejection),
    /// The ledger's configuration is out of range.
    #[error("invalid ledger configuration: {0}")]
    InvalidConfig(String),
    /// Postgres failed or is unreachable. The detail is for logs only.
    #[error("the ledger database is unavailable")]
    Database(#[source] sqlx::Error),
    /// The database holds something ferry never writes: a bug or tampering.
    #[error("the ledger database holds invalid data: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for LedgerError {
    fn from(error: sqlx::Error) -> LedgerError {
        LedgerError::Database(error)
    }
}
