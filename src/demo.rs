//! `ferry demo`: the marketplace's money at work, narrated, on a private
//! throwaway Postgres.
//!
//! Today it runs the ledger: deposits, payment channels, vouchers for bytes
//! carried at each relay's price, batched settlement with the registry's fee,
//! refused forgeries, both ways of closing, a withdrawal, every statement and
//! the invariant check.

use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_ledger::embedded::EmbeddedOptions;
use ferry_ledger::{
    AccountRef, CheckReport, IdempotencyKey, Ledger, LedgerConfig, SettlementOutcome,
};
use ferry_proto::{BYTES_PER_GIB, PricePerByte, PublicKey, SecretKey, Voucher, cost};

use crate::db::Database;

/// The registry's fee in the demo: 2.5%.
const DEMO_FEE_BASIS_POINTS: u16 = 250;
/// Short, so the demo can show a dispute window passing.
const DEMO_DISPUTE_WINDOW: Duration = Duration::from_secs(2);

struct Party {
    name: &'static str,
    key: SecretKey,
}

impl Party {
    fn new(name: &'static str) -> anyhow::Result<Party> {
        Ok(Party { name, key: SecretKey::generate().context("generating a key")? })
    }

    fn public(&self) -> PublicKey {
        self.key.public()
    }
}

/// Runs the demo from start to end.
pub async fn run() -> anyhow::Result<()> {
    println!("ferry demo: the ledger of a marketplace of paid relays\n");
    let started = Instant::now();
    let options = EmbeddedOptions::ephemeral("ferry-demo-pg", true)?;
    println!("▸ starting a private PostgreSQL cluster in {}", options.dir.display());
    let db = Database::embedded(options).await?;
    println!("  ready after {:.1} s (Unix socket only, fsync on)", started.elapsed().as_secs_f64());
    let config = LedgerConfig {
        fee_basis_points: DEMO_FEE_BASIS_POINTS,
        dispute_window: DEMO_DISPUTE_WINDOW,
        ..LedgerConfig::default()
    };
    let ledger = Ledger::connect(db.options().clone(), config).await?;
    println!(
        "  ledger migrated; registry fee {} basis points ({}%), dispute window {} s\n",
        DEMO_FEE_BASIS_POINTS,
        f64::from(DEMO_FEE_BASIS_POINTS) / 100.0,
        DEMO_DISPUTE_WINDOW.as_secs()
    );
    let outcome = scenario(&ledger).await;
    ledger.close().await;
    let closed = db.close().await;
    outcome?;
    closed?;
    println!(
        "\n▸ stopped the cluster and removed its directory; demo took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn scenario(ledger: &Ledger) -> anyhow::Result<()> {
    let alice = Party::new("alice")?;
    let bob = Party::new("bob")?;
    let relay_eu = Party::new("relay-eu")?;
    let relay_us = Party::new("relay-us")?;
    let mallory = Party::new("mallory")?;
    let eu_price: PricePerByte = "0.00000000005".parse()?;
    let us_price: PricePerByte = "0.00000000003".parse()?;
    println!("▸ participants (every one is an ed25519 key)");
    for (party, role) in [
        (&alice, "client".to_owned()),
        (&bob, "client".to_owned()),
        (&relay_eu, format!("relay, {eu_price} per byte = {} per GiB", eu_price.per_gib())),
        (&relay_us, format!("relay, {us_price} per byte = {} per GiB", us_price.per_gib())),
        (&mallory, "a forger".to_owned()),
    ] {
        println!("  {:<9} {}  {role}", party.name, party.public());
    }

    println!("\n▸ the registry operator deposits money (minted from the outside world)");
    for (party, amount) in [(&alice, "50"), (&bob, "20")] {
        let receipt = ledger
            .deposit(&op(&format!("deposit-{}", party.name))?, &party.public(), amount.parse()?)
            .await?;
        println!("  {:<9} +{amount:<4} balance {}", party.name, receipt.balance);
    }

    println!("\n▸ clients open payment channels (escrow moves from their balance)");
    let alice_channel = ledger
        .open_channel(
            &op("open-alice")?,
            &alice.public(),
            &relay_eu.public(),
            nonce()?,
            "10".parse()?,
        )
        .await?;
    let bob_channel = ledger
        .open_channel(&op("open-bob")?, &bob.public(), &relay_us.public(), nonce()?, "5".parse()?)
        .await?;
    for (who, relay, channel) in
        [(&alice, &relay_eu, &alice_channel), (&bob, &relay_us, &bob_channel)]
    {
        println!(
            "  {} → {}: channel {}… escrow {}",
            who.name,
            relay.name,
            short(&channel.id.to_string()),
            channel.escrow
        );
    }

    println!("\n▸ relay-eu carries alice's bytes; alice signs a cumulative voucher per GiB");
    let mut vouchers = Vec::new();
    for gib in 1..=4u64 {
        let owed = cost(gib * BYTES_PER_GIB, eu_price)?;
        let voucher =
            Voucher { channel: alice_channel.id, sequence: gib, cumulative: owed }.sign(&alice.key);
        println!("  voucher #{gib}: {gib} GiB × {eu_price} = {owed}");
        vouchers.push(voucher);
    }

    println!("\n▸ relay-eu settles a batch; each voucher gets its own outcome");
    let forged = Voucher { channel: alice_channel.id, sequence: 9, cumulative: "10".parse()? }
        .sign(&mallory.key);
    let greedy = Voucher { channel: alice_channel.id, sequence: 10, cumulative: "10.5".parse()? }
        .sign(&alice.key);
    let batch = [vouchers[1], vouchers[3], forged, greedy];
    let labels = ["voucher #2", "voucher #4", "mallory's forgery", "alice's over-escrow voucher"];
    let outcomes = ledger.settle(&op("settle-eu-1")?, &relay_eu.public(), &batch).await?;
    for (label, outcome) in labels.iter().zip(&outcomes) {
        println!("  {label:<28} {}", describe(outcome));
    }
    let again = ledger.settle(&op("settle-eu-2")?, &relay_eu.public(), &[vouchers[3]]).await?;
    println!("  {:<28} {}", "voucher #4 again", describe(&again[0]));
    let before = ledger.balance(&relay_eu.public()).await?;
    let retry = ledger.settle(&op("settle-eu-1")?, &relay_eu.public(), &batch).await?;
    let after = ledger.balance(&relay_eu.public()).await?;
    println!(
        "  {:<28} same answer as the first time: {}; relay-eu's balance {}",
        "the first batch, retried",
        if retry == outcomes { "yes" } else { "NO" },
        if after == before { "unchanged" } else { "CHANGED" }
    );

    println!("\n▸ bob asks to close; relay-us may settle during the dispute window");
    let bob_cost = cost(10 * BYTES_PER_GIB, us_price)?;
    let bob_voucher =
        Voucher { channel: bob_channel.id, sequence: 1, cumulative: bob_cost }.sign(&bob.key);
    let closing = ledger.request_close(&op("close-bob")?, &bob.public(), &bob_channel.id).await?;
    let deadline = closing.dispute_deadline.context("a closing channel has a deadline")?;
    println!(
        "  channel is {}; dispute deadline {}",
        closing.state,
        deadline.format("%H:%M:%S%.3f")
    );
    let outcome = ledger.settle(&op("settle-us-1")?, &relay_us.public(), &[bob_voucher]).await?;
    println!("  relay-us settles 10 GiB × {us_price} = {bob_cost}: {}", describe(&outcome[0]));
    match ledger.finalize(&op("finalize-bob-early")?, &bob.public(), &bob_channel.id).await {
        Err(error) => println!("  finalize now: refused ({error})"),
        Ok(_) => println!("  finalize now: accepted (unexpected)"),
    }
    wait_until(deadline).await;
    let closed = ledger.finalize(&op("finalize-bob")?, &bob.public(), &bob_channel.id).await?;
    println!("  after the window: {}; {} refunded to bob", closed.state, closed.refunded);

    println!("\n▸ relay-eu closes alice's channel at once with her newest voucher (5 GiB)");
    let final_cost = cost(5 * BYTES_PER_GIB, eu_price)?;
    let final_voucher =
        Voucher { channel: alice_channel.id, sequence: 5, cumulative: final_cost }.sign(&alice.key);
    let closed = ledger
        .close_by_relay(
            &op("close-alice")?,
            &relay_eu.public(),
            &alice_channel.id,
            Some(&final_voucher),
        )
        .await?;
    println!(
        "  {}: settled {} in total, {} refunded to alice",
        closed.state, closed.settled, closed.refunded
    );

    println!("\n▸ relay-eu withdraws its earnings");
    let earned = ledger.balance(&relay_eu.public()).await?.earned.to_amount()?;
    let receipt = ledger.withdraw(&op("withdraw-eu")?, &relay_eu.public(), earned).await?;
    println!("  withdrew {earned}; balance now {}", receipt.balance);

    println!("\n▸ balances");
    println!("  {:<9} {:>22} {:>22} {:>22}", "", "available", "in escrow", "earned as relay");
    for party in [&alice, &bob, &relay_eu, &relay_us] {
        let money = ledger.balance(&party.public()).await?;
        println!(
            "  {:<9} {:>22} {:>22} {:>22}",
            party.name, money.available, money.in_escrow, money.earned
        );
    }

    println!("\n▸ statements (oldest first)");
    let accounts = [
        (alice.name, AccountRef::Holder { key: alice.public() }),
        (bob.name, AccountRef::Holder { key: bob.public() }),
        (relay_eu.name, AccountRef::Holder { key: relay_eu.public() }),
        (relay_us.name, AccountRef::Holder { key: relay_us.public() }),
        ("treasury", AccountRef::Treasury),
        ("world", AccountRef::World),
    ];
    let names = [&alice, &bob, &relay_eu, &relay_us, &mallory];
    for (name, account) in accounts {
        let statement = ledger.statement(account, None, ferry_ledger::MAX_STATEMENT_PAGE).await?;
        println!("  {name} (balance {})", statement.balance);
        for entry in statement.entries.iter().rev() {
            let counterparty = match entry.counterparty {
                AccountRef::Holder { key } => names
                    .iter()
                    .find(|p| p.public() == key)
                    .map_or("someone", |p| p.name)
                    .to_owned(),
                AccountRef::Escrow { channel } => {
                    format!("channel {}…", short(&channel.to_string()))
                }
                other => other.to_string(),
            };
            println!(
                "    #{:<3} {:<10} {:>24} → {:>22}   {}",
                entry.transfer_id,
                entry.kind.as_str(),
                entry.change,
                entry.balance_after,
                counterparty
            );
        }
    }

    println!("\n▸ ledger invariant check");
    let report = ledger.check().await?;
    print_check(&report);
    anyhow::ensure!(report.is_ok(), "the ledger check failed");
    Ok(())
}

/// Prints an invariant check report for people.
pub fn print_check(report: &CheckReport) {
    for invariant in &report.checked {
        match report.violations.iter().find(|v| v.invariant == *invariant) {
            None => println!("  ✓ {invariant}"),
            Some(violation) => {
                println!("  ✗ {invariant}");
                for row in &violation.rows {
                    println!("      {row}");
                }
            }
        }
    }
    println!(
        "  {} accounts, {} transfers, {} channels: {}",
        report.accounts,
        report.transfers,
        report.channels,
        if report.is_ok() { "all invariants hold" } else { "INVARIANTS VIOLATED" }
    );
}

fn describe(outcome: &SettlementOutcome) -> String {
    match outcome {
        SettlementOutcome::Settled { paid, fee, .. } => {
            format!("settled: relay paid {paid}, fee {fee}")
        }
        SettlementOutcome::AlreadySettled { .. } => "already settled: nothing paid".into(),
        SettlementOutcome::Rejected { reason, .. } => format!("rejected: {reason}"),
    }
}

fn op(name: &str) -> anyhow::Result<IdempotencyKey> {
    Ok(name.parse()?)
}

fn nonce() -> anyhow::Result<u64> {
    let seed = SecretKey::generate().context("generating a nonce")?.seed();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&seed[..8]);
    Ok(u64::from_be_bytes(bytes))
}

fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
}

async fn wait_until(deadline: chrono::DateTime<chrono::Utc>) {
    let remaining = (deadline - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO);
    println!("  waiting {:.1} s for the dispute window to pass…", remaining.as_secs_f64());
    // The deadline is compared with the database's clock; a little slack
    // covers the difference between the two clocks on one machine.
    tokio::time::sleep(remaining + Duration::from_millis(50)).await;
}
