//! The ledger's vocabulary: the values its operations take and return.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use ferry_proto::{Amount, Balance, ChannelId, PublicKey};
use serde::{Deserialize, Serialize};

/// The longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 64;

/// Names one logical request so that retries of it happen once. Keys live in
/// the namespace of the ed25519 key the request acts for, so two users can
/// never collide. 1 to 64 characters from `A-Z a-z 0-9 . _ : -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdempotencyKey(String);

/// Why a string is not an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters from A-Z a-z 0-9 . _ : -")]
pub struct IdempotencyKeyError;

impl IdempotencyKey {
    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for IdempotencyKey {
    type Err = IdempotencyKeyError;

    fn from_str(text: &str) -> Result<IdempotencyKey, IdempotencyKeyError> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
        if text.is_empty() || text.len() > MAX_IDEMPOTENCY_KEY_LEN || !text.bytes().all(allowed) {
            return Err(IdempotencyKeyError);
        }
        Ok(IdempotencyKey(text.to_owned()))
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = IdempotencyKeyError;

    fn try_from(text: String) -> Result<IdempotencyKey, IdempotencyKeyError> {
        text.parse()
    }
}

impl From<IdempotencyKey> for String {
    fn from(key: IdempotencyKey) -> String {
        key.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Implements `as_str`, `Display` and `FromStr` for a fieldless enum from one
/// table of names, which are also the names stored in the database.
macro_rules! named_enum {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// The name used in the database, in JSON and in messages.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = String;

            fn from_str(text: &str) -> Result<$ty, String> {
                match text {
                    $($name => Ok($ty::$variant),)+
                    other => Err(format!("unknown {} {other:?}", stringify!($ty))),
                }
            }
        }
    };
}

/// Where a channel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ChannelState {
    /// Vouchers can be settled and the client can top up.
    Open,
    /// The client asked to close; the relay may still settle until the
    /// dispute deadline, after which anyone may finalize.
    Closing,
    /// Settled and refunded; nothing more can happen.
    Closed,
}

named_enum!(ChannelState { Open => "open", Closing => "closing", Closed => "closed" });

/// Why money moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    /// From the outside world into a holder's account.
    Deposit,
    /// From a holder's account to the outside world.
    Withdrawal,
    /// From a client's account into a channel's escrow (opening or topping up).
    Funding,
    /// From a channel's escrow to its relay, for a voucher.
    Settlement,
    /// From a channel's escrow to the treasury: the registry's fee on a voucher.
    Fee,
    /// From a closed channel's escrow back to its client.
    Refund,
}

named_enum!(TransferKind {
    Deposit => "deposit",
    Withdrawal => "withdrawal",
    Funding => "funding",
    Settlement => "settlement",
    Fee => "fee",
    Refund => "refund",
});

/// The kinds of account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    /// The outside world: minus all money deposited and not withdrawn.
    World,
    /// The registry's fees.
    Treasury,
    /// A key's own money.
    Holder,
    /// A channel's escrow.
    Escrow,
}

named_enum!(AccountKind {
    World => "world",
    Treasury => "treasury",
    Holder => "holder",
    Escrow => "escrow",
});

/// Names one account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AccountRef {
    /// The outside world.
    World,
    /// The registry's fee treasury.
    Treasury,
    /// The account of a key.
    Holder {
        /// The key.
        key: PublicKey,
    },
    /// The escrow of a channel.
    Escrow {
        /// The channel.
        channel: ChannelId,
    },
}

impl fmt::Display for AccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountRef::World => f.write_str("world"),
            AccountRef::Treasury => f.write_str("treasury"),
            AccountRef::Holder { key } => write!(f, "holder {key}"),
            AccountRef::Escrow { channel } => write!(f, "escrow {channel}"),
        }
    }
}

/// A payment channel as the ledger sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChannelInfo {
    /// The channel id.
    pub id: ChannelId,
    /// The paying client.
    pub client: PublicKey,
    /// The paid relay.
    pub relay: PublicKey,
    /// The client's nonce, part of the id.
    pub nonce: u64,
    /// Where the channel is in its life.
    pub state: ChannelState,
    /// Everything the client put in.
    pub deposited: Amount,
    /// Everything paid out for vouchers, fees included.
    pub settled: Amount,
    /// What went back to the client on closing.
    pub refunded: Amount,
    /// What the escrow still holds: deposited - settled - refunded.
    pub escrow: Amount,
    /// The sequence of the newest settled voucher (0 before any).
    pub last_sequence: u64,
    /// When the channel was opened.
    pub opened_at: DateTime<Utc>,
    /// When the client asked to close.
    pub close_requested_at: Option<DateTime<Utc>>,
    /// Until when the relay may still settle after a close request.
    pub dispute_deadline: Option<DateTime<Utc>>,
    /// When the channel closed.
    pub closed_at: Option<DateTime<Utc>>,
}

/// What a settlement batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// One outcome per voucher, in the order given.
    pub outcomes: Vec<SettlementOutcome>,
    /// Whether this was a retry of a batch settled before under the same
    /// idempotency key: the outcomes are the first answer's, and nothing
    /// moved this time.
    pub replayed: bool,
}

/// What one voucher of a settlement batch did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum SettlementOutcome {
    /// The voucher was newer than any settled: the relay was paid the
    /// difference, minus the fee.
    Settled {
        /// The channel.
        channel: ChannelId,
        /// The voucher's sequence.
        sequence: u64,
        /// What the relay received.
        paid: Amount,
        /// What the treasury received.
        fee: Amount,
    },
    /// This exact voucher was settled before; nothing was paid now.
    AlreadySettled {
        /// The channel.
        channel: ChannelId,
        /// The voucher's sequence.
        sequence: u64,
    },
    /// The voucher was refused; nothing was paid.
    Rejected {
        /// The channel the voucher named.
        channel: ChannelId,
        /// The voucher's sequence.
        sequence: u64,
        /// Why.
        reason: Rejection,
    },
}

impl SettlementOutcome {
    /// What the relay received for this voucher.
    pub fn paid(&self) -> Amount {
        match self {
            SettlementOutcome::Settled { paid, .. } => *paid,
            _ => Amount::ZERO,
        }
    }
}

/// Why a voucher was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Rejection {
    /// No channel has this id.
    #[error("unknown channel")]
    UnknownChannel,
    /// The channel belongs to another relay.
    #[error("the channel belongs to another relay")]
    WrongRelay,
    /// The signature is not the channel client's.
    #[error("the signature is not the channel client's")]
    BadSignature,
    /// The sequence is not above the last settled one (and this is not the
    /// same voucher again).
    #[error("sequence {sequence} is not above the last settled sequence {last}")]
    StaleSequence {
        /// The voucher's sequence.
        sequence: u64,
        /// The last settled sequence.
        last: u64,
    },
    /// The sequence is 0 or above 2^63 - 1: sequences start at 1, and the
    /// ledger stores them as signed 64-bit integers.
    #[error("sequence must be from 1 to 2^63 - 1")]
    SequenceOutOfRange,
    /// The cumulative amount is below what was already settled.
    #[error("cumulative amount {cumulative} is below the {settled} already settled")]
    AmountDecreased {
        /// The voucher's amount.
        cumulative: Amount,
        /// Already settled.
        settled: Amount,
    },
    /// The cumulative amount is more than the client deposited.
    #[error("cumulative amount {cumulative} exceeds the {deposited} deposited")]
    ExceedsEscrow {
        /// The voucher's amount.
        cumulative: Amount,
        /// What the channel holds in total.
        deposited: Amount,
    },
    /// The channel is closed.
    #[error("the channel is closed")]
    ChannelClosed,
    /// The client asked to close and the dispute window has passed.
    #[error("the dispute window is over")]
    DisputeWindowOver,
}

/// The result of a deposit or withdrawal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TransferReceipt {
    /// The ledger's record of the request (its operation).
    pub operation_id: i64,
    /// The holder's balance right after it.
    pub balance: Balance,
}

/// One line of a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatementEntry {
    /// The transfer.
    pub transfer_id: i64,
    /// Why the money moved.
    pub kind: TransferKind,
    /// Positive when money came in, negative when it went out.
    pub change: Balance,
    /// The account's balance right after the transfer.
    pub balance_after: Balance,
    /// The account on the other side.
    pub counterparty: AccountRef,
    /// When it happened.
    pub at: DateTime<Utc>,
}

/// A page of an account's transfers, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Statement {
    /// Whose statement.
    pub account: AccountRef,
    /// The balance now.
    pub balance: Balance,
    /// Transfers, newest first.
    pub entries: Vec<StatementEntry>,
    /// Pass as `before` to get the next (older) page; `None` on the last page.
    pub next_before: Option<i64>,
}

/// A key's money at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalanceSummary {
    /// Free to spend or withdraw (never negative).
    pub available: Balance,
    /// Locked in this key's channels as a client (not yet settled or refunded).
    pub in_escrow: Balance,
    /// Received as a relay from settled vouchers, all time.
    pub earned: Balance,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_bounded_and_plain() {
        assert!("retry-1:abc_DEF.2".parse::<IdempotencyKey>().is_ok());
        assert!("a".repeat(64).parse::<IdempotencyKey>().is_ok());
        for bad in ["", "has space", "ü", "semi;colon", &"a".repeat(65)] {
            assert_eq!(bad.parse::<IdempotencyKey>(), Err(IdempotencyKeyError), "{bad:?}");
        }
    }

    #[test]
    fn names_round_trip() {
        for state in [ChannelState::Open, ChannelState::Closing, ChannelState::Closed] {
            assert_eq!(state.as_str().parse::<ChannelState>(), Ok(state));
        }
        assert!("settled".parse::<ChannelState>().is_err());
    }
}
