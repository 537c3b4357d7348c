//! The ferry relay: carries bytes between clients that reach each other by
//! public key, meters every byte, and is paid through the ledger's channels,
//! never carrying more unpaid than the credit window it advertised.
//!
//! A relay is [`Relay::start`]ed with its key, its configuration, a registry
//! client and a voucher store, then [`Relay::serve`]s a listener until a
//! shutdown future completes; [`Relay::shutdown`] ends the sessions and
//! settles every stored voucher. The protocol is in docs/PROTOCOL.md
//! ("Relay protocol"); operating a relay is in docs/OPERATING.md.

mod config;
mod data;
mod debts;
mod lookups;
mod market;
mod meter;
pub mod metrics;
mod server;
mod session;
mod settle;
mod store;
mod tunnel;

pub use config::{Limits, PricingPolicy, RelayConfig};
pub use data::{DataDir, DataDirError};
pub use debts::{DEBT_SNAPSHOT_INTERVAL, DebtBookError};
pub use lookups::KNOWN_LOOKUP_WAIT;
pub use meter::MAX_UNSYNCED_BYTES;
pub use metrics::Metrics;
pub use server::Relay;
pub use settle::SettleReport;
pub use store::{STORE_QUEUE, SYNC_INTERVAL, StoreError, Stored, VoucherStore};
pub use tunnel::COPY_BUFFER;
