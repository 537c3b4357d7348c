//! Throughput at a distance: a delaying proxy in front of the relay gives
//! each hop (client to relay, relay to client) a round trip of 0, 20, 50 or
//! 100 ms, and at each one the same run measures bare TCP through the same
//! kind of path (delaying proxy, bare proxy, delaying proxy: the baseline),
//! a raw relay tunnel free and paid, and an encrypted `Endpoint` stream (as
//! `ferry tunnel` uses it) free and paid.

use std::time::Duration;

use anyhow::Context;
use ferry_client::select::SelectionPolicy;
use ferry_client::wallet::Budget;
use ferry_client::{Endpoint, EndpointConfig, RegistryClient};
use ferry_ledger::embedded::EmbeddedOptions;
use ferry_ledger::{Ledger, LedgerConfig};
use ferry_proto::SecretKey;
use tokio::net::{TcpListener, TcpStream};

use super::delay::DelayProxy;
use super::registry::bench_registry;
use super::relay::{
    BenchRelay, CREDIT_WINDOW_BYTES, Load, Pushed, bare_proxy, close_session, count,
    funded_channel, push, raw_tunnel,
};
use super::{BenchArgs, Table, idempotency};
use crate::db::Database;

/// The ways across one distance, each measured in the same run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Bare,
    RawFree,
    RawPaid,
    StreamFree,
    StreamPaid,
}

impl Path {
    const ALL: [Path; 5] =
        [Path::Bare, Path::RawFree, Path::RawPaid, Path::StreamFree, Path::StreamPaid];

    /// Whether the relay charges on this path.
    fn paid(self) -> bool {
        matches!(self, Path::RawPaid | Path::StreamPaid)
    }

    fn name(self) -> &'static str {
        match self {
            Path::Bare => "bare TCP",
            Path::RawFree => "raw relay tunnel, free",
            Path::RawPaid => "raw relay tunnel, paid (1 MiB window)",
            Path::StreamFree => "encrypted Endpoint stream, free relay",
            Path::StreamPaid => "encrypted Endpoint stream, paid relay (1 MiB window)",
        }
    }
}

/// Runs the distance benchmark.
pub async fn run(args: &BenchArgs) -> anyhow::Result<Table> {
    anyhow::ensure!(args.distance_seconds > 0, "--distance-seconds must be positive");
    let db =
        Database::embedded(EmbeddedOptions::ephemeral("ferry-bench-distance-pg", true)?).await?;
    let result = run_on(&db, args).await;
    db.close().await?;
    result
}

async fn run_on(db: &Database, args: &BenchArgs) -> anyhow::Result<Table> {
    let ledger = Ledger::connect(db.options().clone(), LedgerConfig::default()).await?;
    let registry = bench_registry(&ledger).await?;
    let scratch = std::env::temp_dir().join(format!("ferry-bench-distance-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let load = Load::For(Duration::from_secs(args.distance_seconds));
    let mut table = Table::new("distance");
    super::aead::rows(&mut table)?;
    for &rtt_ms in &args.round_trips_ms {
        let one_way = Duration::from_millis(rtt_ms / 2);
        println!("▸ {rtt_ms} ms round trip per hop: {} s per path", args.distance_seconds);
        let mut results = Vec::new();
        for path in Path::ALL {
            let tag = format!("{rtt_ms}-{path:?}");
            let pushed = match path {
                Path::Bare => bare_run(one_way, load).await,
                _ => relay_run(&ledger, &registry.base, &scratch, &tag, path, one_way, load).await,
            }
            .with_context(|| format!("{} at {rtt_ms} ms", path.name()))?;
            println!("  {}: {:.0} MiB/s", path.name(), pushed.mib_per_sec());
            results.push((path, pushed));
        }
        let bare = results[0].1.mib_per_sec();
        for (path, pushed) in &results {
            let ratio = pushed.mib_per_sec() / bare;
            let baseline = if *path == Path::Bare {
                "(the baseline)".to_owned()
            } else {
                format!("bare TCP: {bare:.0} MiB/s")
            };
            table.row(format!(
                "| {rtt_ms} ms per hop: {} | {:.0} MiB/s | {baseline} | {ratio:.2}× |",
                path.name(),
                pushed.mib_per_sec(),
            ));
        }
    }
    let report = ledger.check().await?;
    anyhow::ensure!(report.is_ok(), "ledger invariants violated: {:?}", report.violations);
    registry.stop().await?;
    ledger.close().await;
    let _ = std::fs::remove_dir_all(&scratch);
    table.note(format!(
        "Each path sends for {} s through a proxy that holds every chunk half the round trip \
         each way, in front of the relay (so both hops, sender to relay and relay to receiver, \
         have that round trip); bare TCP goes through a delaying proxy, a bare proxy and a \
         delaying proxy. Paid runs use the default credit window, 1 MiB. Ledger check after \
         the run: all invariants hold ({} transfers).",
        args.distance_seconds, report.transfers
    ));
    Ok(table)
}

/// A region of the run's own, so that endpoints choose its relay only.
fn region_of(tag: &str) -> String {
    let tag = tag.to_ascii_lowercase().replace(|c: char| !c.is_ascii_alphanumeric(), "-");
    format!("d{tag}")
}

/// Bare TCP: sender, delaying proxy, bare proxy, delaying proxy, receiver.
async fn bare_run(one_way: Duration, load: Load) -> anyhow::Result<Pushed> {
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let far = DelayProxy::start(sink.local_addr()?, one_way).await?;
    let middle = bare_proxy(far.address()).await?;
    let near = DelayProxy::start(middle, one_way).await?;
    let sender = TcpStream::connect(near.address()).await?;
    let (received, _) = sink.accept().await?;
    push(sender, load, count(received)).await
}

/// One of the relay paths, through a relay of its own behind a proxy
/// delaying `one_way`.
async fn relay_run(
    ledger: &Ledger,
    registry: &str,
    scratch: &std::path::Path,
    tag: &str,
    path: Path,
    one_way: Duration,
    load: Load,
) -> anyhow::Result<Pushed> {
    let window = path.paid().then_some(CREDIT_WINDOW_BYTES);
    let region = region_of(tag);
    let bench = BenchRelay::start(registry, scratch, tag, window, &region, Some(one_way)).await?;
    let pushed = match path {
        Path::RawFree | Path::RawPaid => raw_run(ledger, &bench, tag, load).await,
        _ => stream_run(ledger, registry, tag, region, load).await,
    };
    bench.stop().await;
    pushed
}

async fn raw_run(
    ledger: &Ledger,
    bench: &BenchRelay,
    tag: &str,
    load: Load,
) -> anyhow::Result<Pushed> {
    let (caller, callee) = (SecretKey::generate()?, SecretKey::generate()?);
    let channel = funded_channel(ledger, &caller, &bench.at.key, tag).await?;
    let (session, sender, received) =
        raw_tunnel(&bench.at, &caller, &callee, Some(channel)).await?;
    let pushed = push(sender, load, count(received)).await;
    close_session(session).await;
    pushed
}

/// An encrypted stream between two endpoints that choose the run's relay,
/// the only one in `region`.
async fn stream_run(
    ledger: &Ledger,
    registry: &str,
    tag: &str,
    region: String,
    load: Load,
) -> anyhow::Result<Pushed> {
    let policy =
        SelectionPolicy { min_reputation: 0.0, region: Some(region), ..SelectionPolicy::default() };
    let http = RegistryClient::http()?;
    let (sender_key, receiver_key) = (SecretKey::generate()?, SecretKey::generate()?);
    let me = sender_key.public();
    ledger.deposit(&idempotency(&format!("fund-{tag}"))?, &me, &me, "100".parse()?).await?;
    let budget = Budget { open: "20".parse()?, top_up: "20".parse()?, low_water: "10".parse()? };
    // The relay is listed once its first heartbeat lands: wait for it.
    let as_receiver = RegistryClient::new(registry, receiver_key.clone(), http.clone());
    let listed = async {
        loop {
            let ranked = ferry_client::select::discover(&as_receiver, &receiver_key, &policy).await;
            if ranked.is_ok_and(|ranked| !ranked.is_empty()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), listed)
        .await
        .context("the relay is listed and measured within 10 s")?;
    let receiver = Endpoint::new(
        as_receiver,
        EndpointConfig { policy: policy.clone(), home_relays: 1, ..EndpointConfig::default() },
    );
    receiver.listen().await?;
    let sender = Endpoint::new(
        RegistryClient::new(registry, sender_key, http),
        EndpointConfig {
            policy,
            budget: Some(budget),
            home_relays: 1,
            ..EndpointConfig::default()
        },
    );
    let outgoing = sender.dial(receiver_key.public()).await?;
    let incoming = tokio::time::timeout(Duration::from_secs(30), receiver.accept())
        .await
        .context("the receiver accepts in time")?
        .context("the receiver stopped accepting")?;
    let pushed = push(outgoing, load, count(incoming)).await;
    sender.close().await;
    receiver.close().await;
    pushed
}
