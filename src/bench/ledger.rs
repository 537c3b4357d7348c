//! Ledger settlement is measured against pgbench's default TPC-B-like script
//! on the same private, durable (fsync on) cluster: batched vouchers per
//! second against pgbench transactions per second, and a single voucher's
//! settlement latency against one pgbench transaction's.

use std::ops::RangeInclusive;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use ferry_ledger::embedded::{EmbeddedOptions, EmbeddedPostgres};
use ferry_ledger::{Ledger, LedgerConfig, SettlementOutcome};
use ferry_proto::{Amount, ChannelId, SecretKey, SignedVoucher, Voucher};
use tokio::task::JoinSet;

use super::{BenchArgs, Table, idempotency, mean, percentile};
use crate::db::Database;

/// Concurrent clients of the pgbench throughput baseline.
const PGBENCH_CLIENTS: u32 = 8;
/// Concurrent operations while opening the benchmark's channels.
const SETUP_CONCURRENCY: usize = 16;

struct PgbenchResult {
    tps: f64,
    latency_ms: f64,
}

/// Runs the ledger benchmark on a private durable cluster.
pub async fn run(args: &BenchArgs) -> anyhow::Result<Table> {
    anyhow::ensure!(
        args.relays > 0 && args.batch > 0 && args.rounds > 0 && args.singles > 0,
        "counts must be positive"
    );
    anyhow::ensure!(
        args.batch <= ferry_ledger::MAX_SETTLEMENT_BATCH,
        "batch is above the ledger's limit"
    );
    let db = Database::embedded(EmbeddedOptions::ephemeral("ferry-bench-pg", true)?).await?;
    let result = run_on(&db, args).await;
    db.close().await?;
    result
}

async fn run_on(db: &Database, args: &BenchArgs) -> anyhow::Result<Table> {
    let cluster = db.cluster().context("the benchmark needs its own cluster")?;
    println!("ferry bench: ledger settlement against pgbench on the same cluster (fsync on)");

    // Each ferry figure is measured right after its baseline, so both see
    // the same machine load and the same state of the cluster.
    println!("▸ pgbench: initialising (scale 10)");
    pgbench(cluster, &["-i", "-q", "-s", "10"])?;
    let ledger = Ledger::connect(db.options().clone(), LedgerConfig::default()).await?;
    println!(
        "▸ ledger: opening {} channels for {} relays",
        args.relays * args.batch + 1,
        args.relays + 1
    );
    let market = Market::open(&ledger, args.relays, args.batch).await?;

    println!("▸ pgbench, 1 client, {} s", args.seconds);
    let pg_single = pgbench_run(cluster, 1, args.seconds)?;
    println!("▸ ledger: {} single-voucher settlements, one after another", args.singles);
    let singles = market.settle_singles(&ledger, args.singles).await?;
    let round_trip_ms = round_trip(&ledger, args.singles).await?;

    println!("▸ pgbench, {PGBENCH_CLIENTS} clients, {} s", args.seconds);
    let pg_many = pgbench_run(cluster, PGBENCH_CLIENTS, args.seconds)?;
    println!(
        "▸ ledger: {} rounds of {} concurrent batches of {} vouchers",
        args.rounds, args.relays, args.batch
    );
    let (batched_rate, batch_p99_ms) = market.settle_batches(&ledger, 1..=args.rounds).await?;

    let report = ledger.check().await?;
    anyhow::ensure!(
        report.is_ok(),
        "ledger invariants violated after the benchmark: {:?}",
        report.violations
    );

    let single_mean = mean(&singles);
    let mut table = Table::new("ferry");
    table.row(format!(
        "| settlement, batched ({} relays × {} vouchers) | {:.0} vouchers/s | pgbench TPC-B, {PGBENCH_CLIENTS} clients: {:.0} tx/s | {:.2}× |",
        args.relays,
        args.batch,
        batched_rate,
        pg_many.tps,
        batched_rate / pg_many.tps
    ));
    table.row(format!(
        "| settlement, one voucher per call: mean latency | {:.2} ms | pgbench TPC-B, 1 client: {:.2} ms | {:.2}× |",
        single_mean,
        pg_single.latency_ms,
        single_mean / pg_single.latency_ms
    ));
    table.row(format!(
        "| settlement, one voucher per call: p99 latency | {:.2} ms | | |",
        percentile(&singles, 0.99)
    ));
    table.row(format!("| settlement, batched: p99 batch latency | {batch_p99_ms:.1} ms | | |"));
    table.row(format!(
        "| one round trip (`SELECT 1`) on the same pool, for scale | {round_trip_ms:.3} ms | | settlement takes {:.0}× as long |",
        single_mean / round_trip_ms
    ));
    table.row(format!(
        "| settlement, one voucher per call: rate | {:.0} vouchers/s | pgbench TPC-B, 1 client: {:.0} tx/s | {:.2}× |",
        1000.0 / single_mean,
        pg_single.tps,
        (1000.0 / single_mean) / pg_single.tps
    ));
    table.note(format!(
        "ledger check after the run: all invariants hold ({} transfers)",
        report.transfers
    ));
    ledger.close().await;
    Ok(table)
}

/// A channel and the key of its client, who signs its vouchers.
#[derive(Clone)]
pub(super) struct BenchChannel {
    pub(super) client: SecretKey,
    pub(super) id: ChannelId,
}

/// Relays, each with `batch` channels from distinct clients, and one more
/// channel for the single-voucher run.
pub(super) struct Market {
    pub(super) relays: Vec<(SecretKey, Vec<BenchChannel>)>,
    single: (SecretKey, BenchChannel),
}

impl Market {
    pub(super) async fn open(
        ledger: &Ledger,
        relays: usize,
        batch: usize,
    ) -> anyhow::Result<Market> {
        let mut relay_keys = Vec::with_capacity(relays);
        for _ in 0..relays {
            relay_keys.push(SecretKey::generate()?);
        }
        let mut tasks = JoinSet::new();
        let mut plan = Vec::with_capacity(relays * batch);
        for (r, relay) in relay_keys.iter().enumerate() {
            for c in 0..batch {
                plan.push((r, c, relay.public()));
            }
        }
        let mut channels: Vec<Vec<BenchChannel>> = vec![Vec::with_capacity(batch); relays];
        let mut opened = Vec::with_capacity(plan.len());
        for (r, c, relay) in plan {
            if tasks.len() >= SETUP_CONCURRENCY {
                opened.push(tasks.join_next().await.context("setup task")???);
            }
            let ledger = ledger.clone();
            tasks.spawn(async move {
                let client = SecretKey::generate()?;
                let id = fund(&ledger, &client, &relay, &format!("{r}-{c}")).await?;
                anyhow::Ok((r, client, id))
            });
        }
        while let Some(result) = tasks.join_next().await {
            opened.push(result??);
        }
        for (r, client, id) in opened {
            channels[r].push(BenchChannel { client, id });
        }
        let single_relay = SecretKey::generate()?;
        let single_client = SecretKey::generate()?;
        let single_id = fund(ledger, &single_client, &single_relay.public(), "single").await?;
        Ok(Market {
            relays: relay_keys.into_iter().zip(channels).collect(),
            single: (single_relay, BenchChannel { client: single_client, id: single_id }),
        })
    }

    /// Every relay's vouchers for `rounds` (round r is sequence r, for r
    /// micro-units), signed beforehand: signing is the clients' work.
    pub(super) fn vouchers(&self, rounds: RangeInclusive<u64>) -> Vec<Vec<Vec<SignedVoucher>>> {
        rounds
            .map(|round| {
                self.relays
                    .iter()
                    .map(|(_, channels)| {
                        channels
                            .iter()
                            .map(|channel| micro_voucher(&channel.client, channel.id, round))
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// Settles `rounds` rounds, each relay's batch concurrently; returns
    /// vouchers per second and the p99 of one batch's latency in ms.
    pub(super) async fn settle_batches(
        &self,
        ledger: &Ledger,
        rounds: RangeInclusive<u64>,
    ) -> anyhow::Result<(f64, f64)> {
        let signed = self.vouchers(rounds);
        let mut batch_ms = Vec::new();
        let mut settled = 0usize;
        let started = Instant::now();
        for (round, per_relay) in signed.into_iter().enumerate() {
            let mut tasks = JoinSet::new();
            for ((relay, _), vouchers) in self.relays.iter().zip(per_relay) {
                let (ledger, relay) = (ledger.clone(), relay.public());
                let key = idempotency(&format!("batch-{round}-{relay}"))?;
                tasks.spawn(async move {
                    let begun = Instant::now();
                    let outcomes = ledger.settle(&key, &relay, &vouchers).await?.outcomes;
                    anyhow::Ok((begun.elapsed(), outcomes))
                });
            }
            while let Some(result) = tasks.join_next().await {
                let (elapsed, outcomes) = result??;
                batch_ms.push(elapsed.as_secs_f64() * 1000.0);
                settled += count_settled(&outcomes)?;
            }
        }
        let rate = settled as f64 / started.elapsed().as_secs_f64();
        Ok((rate, percentile(&batch_ms, 0.99)))
    }

    /// Settles one voucher per call, `count` times; returns each latency in ms.
    async fn settle_singles(&self, ledger: &Ledger, count: usize) -> anyhow::Result<Vec<f64>> {
        let (relay, channel) = &self.single;
        let mut latencies = Vec::with_capacity(count);
        for sequence in 1..=count as u64 {
            let voucher = micro_voucher(&channel.client, channel.id, sequence);
            let key = idempotency(&format!("single-{sequence}"))?;
            let begun = Instant::now();
            let outcomes = ledger.settle(&key, &relay.public(), &[voucher]).await?.outcomes;
            latencies.push(begun.elapsed().as_secs_f64() * 1000.0);
            count_settled(&outcomes)?;
        }
        Ok(latencies)
    }
}

/// The mean time of one `SELECT 1` through the ledger's pool, in ms: the
/// floor under every statement a settlement sends.
async fn round_trip(ledger: &Ledger, count: usize) -> anyhow::Result<f64> {
    let mut conn = ledger.pool().acquire().await?;
    let begun = Instant::now();
    for _ in 0..count {
        sqlx::query("SELECT 1").execute(&mut *conn).await?;
    }
    Ok(begun.elapsed().as_secs_f64() * 1000.0 / count as f64)
}

async fn fund(
    ledger: &Ledger,
    client: &SecretKey,
    relay: &ferry_proto::PublicKey,
    tag: &str,
) -> anyhow::Result<ChannelId> {
    let amount: Amount = "1".parse()?;
    ledger
        .deposit(
            &idempotency(&format!("deposit-{tag}"))?,
            &client.public(),
            &client.public(),
            amount,
        )
        .await?;
    let channel = ledger
        .open_channel(&idempotency(&format!("open-{tag}"))?, &client.public(), relay, 1, amount)
        .await?;
    Ok(channel.id)
}

/// A voucher for `sequence` millionths of a unit.
pub(super) fn micro_voucher(
    client: &SecretKey,
    channel: ChannelId,
    sequence: u64,
) -> SignedVoucher {
    let cumulative =
        Amount::from_attos(u128::from(sequence) * 1_000_000_000_000).unwrap_or(Amount::ZERO);
    Voucher { channel, sequence, cumulative }.sign(client)
}

pub(super) fn count_settled(outcomes: &[SettlementOutcome]) -> anyhow::Result<usize> {
    for outcome in outcomes {
        if !matches!(outcome, SettlementOutcome::Settled { .. }) {
            bail!("a benchmark voucher was not settled: {outcome:?}");
        }
    }
    Ok(outcomes.len())
}

fn pgbench(cluster: &EmbeddedPostgres, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(cluster.bindir().join("pgbench"))
        .arg("-h")
        .arg(cluster.dir())
        .args(["-U", cluster.superuser()])
        .args(args)
        .arg("ferry")
        .output()
        .context("running pgbench")?;
    if !output.status.success() {
        bail!("pgbench failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn pgbench_run(
    cluster: &EmbeddedPostgres,
    clients: u32,
    seconds: u64,
) -> anyhow::Result<PgbenchResult> {
    let threads = clients.min(2).to_string();
    let text = pgbench(
        cluster,
        &["-c", &clients.to_string(), "-j", &threads, "-T", &seconds.to_string()],
    )?;
    let field = |prefix: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse().ok())
            .with_context(|| format!("pgbench printed no {prefix:?} line:\n{text}"))
    };
    let result = PgbenchResult { tps: field("tps = ")?, latency_ms: field("latency average = ")? };
    println!(
        "  pgbench, {clients} client(s): {:.0} tx/s, mean latency {:.2} ms",
        result.tps, result.latency_ms
    );
    Ok(result)
}
