//! The registry's web API under load, against baselines in the same run:
//! listings sorted by price and by reputation over thousands of registered
//! relays against a trivial axum handler served the same way (same process,
//! same load generator, 127.0.0.1), and the settlement endpoint against the
//! same batches settled by calling the ledger directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::routing::get;
use axum::{Json, Router};
use ferry_api::{AppState, Limits, Rate, RegistryConfig};
use ferry_client::RegistryClient;
use ferry_ledger::embedded::EmbeddedOptions;
use ferry_ledger::{Ledger, LedgerConfig};
use ferry_proto::{PROTOCOL_VERSION, RelayAdvert, SecretKey};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::ledger::Market;
use super::{BenchArgs, Table, percentile};
use crate::db::Database;

/// Seconds of unmeasured load before each measured run, so connections are
/// open and caches warm.
const WARM_UP: Duration = Duration::from_secs(1);
/// The listing page size requested.
const PAGE: u32 = 50;
/// The database connections of the benchmark's registry.
const POOL_CONNECTIONS: u32 = 32;

/// Runs the registry benchmark on a private durable cluster.
pub async fn run(args: &BenchArgs) -> anyhow::Result<Table> {
    anyhow::ensure!(
        args.listed_relays > 0 && args.connections > 0 && args.seconds > 0,
        "counts must be positive"
    );
    let db =
        Database::embedded(EmbeddedOptions::ephemeral("ferry-bench-registry-pg", true)?).await?;
    let result = run_on(&db, args).await;
    db.close().await?;
    result
}

/// A server on 127.0.0.1:0 and the switch that stops it.
pub(super) struct Served {
    pub(super) base: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    pub(super) async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("the server did not stop within 30 s")???;
        Ok(())
    }
}

/// A registry for benchmarks over `ledger`: all load comes from one address
/// and few keys, so rate limits (which would measure themselves) are off;
/// body and time limits stay, and the registry does not probe relays.
pub(super) async fn bench_registry(ledger: &Ledger) -> anyhow::Result<Served> {
    let off = Rate { per_sec: 0, burst: 0 };
    let limits = Limits { per_ip: off, per_key: off, ..Limits::default() };
    let operator = SecretKey::generate()?;
    let config = RegistryConfig {
        operator: operator.public(),
        limits,
        probe_interval: None,
        transport: ferry_api::Transport::default(),
    };
    serve_registry(AppState::new(ledger.clone(), config)).await
}

async fn serve_registry(state: AppState) -> anyhow::Result<Served> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(ferry_api::serve(listener, state, async {
        let _ = stopped.await;
    }));
    Ok(Served { base, stop, task })
}

/// The baseline: an axum handler that answers a constant, served with
/// the same connection handling as the registry.
async fn serve_trivial() -> anyhow::Result<Served> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let app = Router::new().route("/trivial", get(|| async { Json(serde_json::json!({"ok": 1})) }));
    let (stop, stopped) = oneshot::channel::<()>();
    let limits = Limits::default().connections;
    let transport = ferry_proto::http::Transport::default();
    let task = tokio::spawn(ferry_proto::http::serve(
        listener,
        app,
        limits,
        transport,
        Arc::new(()),
        async {
            let _ = stopped.await;
        },
    ));
    Ok(Served { base, stop, task })
}

async fn run_on(db: &Database, args: &BenchArgs) -> anyhow::Result<Table> {
    println!("ferry bench: the registry API against a trivial axum handler (same process)");
    let config = LedgerConfig { max_connections: POOL_CONNECTIONS, ..LedgerConfig::default() };
    let ledger = Ledger::connect(db.options().clone(), config).await?;
    let registry = bench_registry(&ledger).await?;
    let trivial = serve_trivial().await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .timeout(ferry_client::REQUEST_TIMEOUT)
        .build()?;

    println!(
        "▸ registering {} relays through the API (a signed advertisement and a heartbeat each)",
        args.listed_relays
    );
    let registration =
        register(&registry.base, &http, args.listed_relays, args.connections).await?;

    let seconds = Duration::from_secs(args.seconds);
    let connections = args.connections;
    let trivial_url = format!("{}/trivial", trivial.base);
    let mut rows = Vec::new();
    for (name, query) in [("price", "sort=price"), ("reputation", "sort=reputation")] {
        println!(
            "▸ {connections} connections, {} s each: trivial handler, then listing by {name}",
            args.seconds
        );
        let baseline = measure(&http, &trivial_url, connections, seconds).await?;
        let url = format!("{}/v1/relays?{query}&limit={PAGE}", registry.base);
        let listing = measure(&http, &url, connections, seconds).await?;
        rows.push((name, baseline, listing));
    }

    println!(
        "▸ settlement: opening {} channels for {} relays",
        args.relays * args.batch + 1,
        args.relays + 1
    );
    let market = Market::open(&ledger, args.relays, args.batch).await?;
    println!(
        "▸ settlement: {} rounds of {} concurrent batches of {} vouchers, ledger calls then HTTP",
        args.rounds, args.relays, args.batch
    );
    let (direct_rate, direct_p99_ms) = market.settle_batches(&ledger, 1..=args.rounds).await?;
    let (http_rate, http_p99_ms) =
        settle_over_http(&market, &registry.base, &http, args.rounds + 1..=2 * args.rounds).await?;

    let report = ledger.check().await?;
    anyhow::ensure!(report.is_ok(), "ledger invariants violated: {:?}", report.violations);
    registry.stop().await?;
    trivial.stop().await?;
    ledger.close().await;
    let flood = super::connections::run(db, args).await?;

    let mut table = Table::new("registry");
    for (name, baseline, listing) in &rows {
        table.row(format!(
            "| listing {} relays by {name} ({PAGE} per page), {connections} connections: rate | {:.0} req/s | trivial axum handler: {:.0} req/s | {:.2}× |",
            args.listed_relays,
            listing.rate,
            baseline.rate,
            listing.rate / baseline.rate
        ));
        table.row(format!(
            "| listing by {name}: p99 latency | {:.2} ms | trivial: {:.2} ms | p50 {:.2} ms |",
            listing.p99_ms, baseline.p99_ms, listing.p50_ms
        ));
    }
    table.row(format!(
        "| settlement endpoint, batched ({} relays × {} vouchers) | {:.0} vouchers/s | direct ledger calls: {:.0} vouchers/s | {:.2}× |",
        args.relays,
        args.batch,
        http_rate,
        direct_rate,
        http_rate / direct_rate
    ));
    table.row(format!(
        "| settlement, p99 latency of one batch | {http_p99_ms:.0} ms | direct: {direct_p99_ms:.0} ms | |"
    ));
    table.row(format!(
        "| registering a relay (signed advert + heartbeat), {connections} connections | {:.0} relays/s | | |",
        registration
    ));
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    table.row(format!(
        "| `/healthz` p99 while one address opens {} idle connections (`ferry registry` process, defaults) | {:.2} ms | `/healthz` alone: {:.2} ms | {:.2}× |",
        flood.attempted,
        flood.p99_flooded_ms(),
        flood.p99_baseline_ms(),
        flood.p99_flooded_ms() / flood.p99_baseline_ms().max(f64::MIN_POSITIVE)
    ));
    table.row(format!(
        "| `/healthz` slowest poll during the flood ({} polls) | {:.2} ms | | |",
        flood.flooded_ms.len(),
        flood.max_flooded_ms()
    ));
    table.row(format!(
        "| idle connections: most held at once, refused | {} held, {} refused | per-IP bound {} | |",
        flood.most_held,
        flood.refused,
        ferry_api::ConnectionLimits::default().max_connections_per_ip
    ));
    table.row(format!(
        "| registry RSS: before, peak, after the flood | {:.1} / {:.1} / {:.1} MiB | | |",
        mib(flood.rss_before),
        mib(flood.rss_peak),
        mib(flood.rss_after)
    ));
    table.note(format!(
        "ledger check after the run: all invariants hold ({} transfers)",
        report.transfers
    ));
    Ok(table)
}

/// Registers `count` relays, each with a signed advertisement (random price
/// and region) and one heartbeat, `connections` at a time; returns relays/s.
async fn register(
    base: &str,
    http: &reqwest::Client,
    count: usize,
    connections: usize,
) -> anyhow::Result<f64> {
    let regions = ["eu-west", "eu-north", "us-east", "us-west", "ap-south"];
    let issued_at_ms = u64::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis(),
    )?;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for index in 0..count {
        if tasks.len() >= connections {
            tasks.join_next().await.context("registration task")???;
        }
        let (base, http) = (base.to_owned(), http.clone());
        let region = regions[index % regions.len()];
        tasks.spawn(async move {
            let key = SecretKey::generate()?;
            // Prices from 1e-12 to 1e-9 per byte (about 0.001 to 1 per GiB).
            let price_attos = 1_000_000 + (index as u128 * 7_919 % 1_000) * 1_000_000;
            let advert = RelayAdvert {
                relay: key.public(),
                address: format!("relay-{index}.example.net:7000"),
                price_per_byte: ferry_proto::PricePerByte::from_attos(price_attos)?,
                credit_window_bytes: 1 << 20,
                capacity_bytes_per_sec: 100 << 20,
                region: region.to_owned(),
                protocol_version: PROTOCOL_VERSION,
                issued_at_ms,
            }
            .sign(&key);
            let client = RegistryClient::new(&base, key, http);
            client.publish_advert(&advert).await?;
            client.heartbeat(0, 0).await?;
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Requests per second and latency percentiles of one load run.
struct Load {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `connections` tasks each GET `url` back to back (one keep-alive
/// connection each) for `duration`, after an unmeasured warm-up.
async fn measure(
    http: &reqwest::Client,
    url: &str,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Load> {
    hammer(http, url, connections, WARM_UP).await?;
    let started = Instant::now();
    let latencies_ms = hammer(http, url, connections, duration).await?;
    let rate = latencies_ms.len() as f64 / started.elapsed().as_secs_f64();
    Ok(Load {
        rate,
        p50_ms: percentile(&latencies_ms, 0.50),
        p99_ms: percentile(&latencies_ms, 0.99),
    })
}

async fn hammer(
    http: &reqwest::Client,
    url: &str,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Vec<f64>> {
    let deadline = Instant::now() + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..connections {
        let (http, url) = (http.clone(), url.to_owned());
        tasks.spawn(async move {
            let mut latencies_ms = Vec::new();
            while Instant::now() < deadline {
                let begun = Instant::now();
                let response = http.get(&url).send().await?;
                let status = response.status();
                response.bytes().await?;
                anyhow::ensure!(status.is_success(), "GET {url}: {status}");
                latencies_ms.push(begun.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(latencies_ms)
        });
    }
    let mut all = Vec::new();
    while let Some(result) = tasks.join_next().await {
        all.extend(result??);
    }
    Ok(all)
}

/// Settles the market's vouchers for `rounds` through `POST /v1/settlements`,
/// each relay's batch concurrently; returns vouchers/s and the p99 batch
/// latency in ms.
async fn settle_over_http(
    market: &Market,
    base: &str,
    http: &reqwest::Client,
    rounds: std::ops::RangeInclusive<u64>,
) -> anyhow::Result<(f64, f64)> {
    let signed = market.vouchers(rounds);
    let mut batch_ms = Vec::new();
    let mut settled = 0usize;
    let started = Instant::now();
    for (round, per_relay) in signed.into_iter().enumerate() {
        let mut tasks = JoinSet::new();
        for ((relay, _), vouchers) in market.relays.iter().zip(per_relay) {
            let client = RegistryClient::new(base, relay.clone(), http.clone());
            tasks.spawn(async move {
                let begun = Instant::now();
                let answer = client.settle(&vouchers, &format!("http-batch-{round}")).await?;
                anyhow::Ok((begun.elapsed(), answer))
            });
        }
        while let Some(result) = tasks.join_next().await {
            let (elapsed, answer) = result??;
            batch_ms.push(elapsed.as_secs_f64() * 1000.0);
            let outcomes = answer["outcomes"].as_array().context("no outcomes")?;
            anyhow::ensure!(
                outcomes.iter().all(|o| o["outcome"] == "settled"),
                "a benchmark voucher was not settled"
            );
            settled += outcomes.len();
        }
    }
    Ok((settled as f64 / started.elapsed().as_secs_f64(), percentile(&batch_ms, 0.99)))
}
