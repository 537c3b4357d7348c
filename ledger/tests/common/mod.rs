//! Shared helpers for the ledger's tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use ferry_ledger::{IdempotencyKey, Ledger, LedgerConfig};
use ferry_proto::{Amount, Balance, ChannelId, PublicKey, SecretKey, SignedVoucher, Voucher};

/// A fee of 2.5%, so fees are visible in every scenario.
pub const FEE_BPS: u16 = 250;

pub fn config(dispute_window: Duration) -> LedgerConfig {
    LedgerConfig { max_connections: 8, fee_basis_points: FEE_BPS, dispute_window }
}

/// A ledger on a fresh database.
pub async fn ledger(config: LedgerConfig) -> Ledger {
    let options = ferry_ledger::testing::fresh_database().await.expect("test database");
    Ledger::connect(options, config).await.expect("open ledger")
}

/// A second ledger instance (its own pool) on the same database, as a second
/// registry process would have.
pub async fn twin(ledger: &Ledger) -> Ledger {
    let options = ledger.pool().connect_options().as_ref().clone();
    Ledger::connect(options, ledger.config()).await.unwrap()
}

/// The deposit gateway's key: the signer of every deposit in these tests.
pub fn gateway() -> PublicKey {
    key(0xee).public()
}

pub fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed(&[seed; 32])
}

pub fn amount(text: &str) -> Amount {
    text.parse().unwrap()
}

pub fn money(text: &str) -> Balance {
    text.parse().unwrap()
}

pub fn idem(text: &str) -> IdempotencyKey {
    text.parse().unwrap()
}

pub fn voucher(
    client: &SecretKey,
    channel: ChannelId,
    sequence: u64,
    cumulative: &str,
) -> SignedVoucher {
    Voucher { channel, sequence, cumulative: amount(cumulative) }.sign(client)
}

/// Asserts every ledger invariant, printing the violations if any.
pub async fn assert_invariants(ledger: &Ledger) {
    let report = ledger.check().await.expect("check runs");
    assert!(report.is_ok(), "ledger invariants violated: {:#?}", report.violations);
}

/// A client with `funds` deposited and a channel of `escrow` to `relay`.
pub async fn funded_channel(
    ledger: &Ledger,
    client: &SecretKey,
    relay: &SecretKey,
    nonce: u64,
    funds: &str,
    escrow: &str,
) -> ChannelId {
    ledger
        .deposit(&idem(&format!("fund-{nonce}")), &gateway(), &client.public(), amount(funds))
        .await
        .unwrap();
    let channel = ledger
        .open_channel(
            &idem(&format!("open-{nonce}")),
            &client.public(),
            &relay.public(),
            nonce,
            amount(escrow),
        )
        .await
        .unwrap();
    channel.id
}
