//! Idle connections against a `ferry registry` process: one address opens
//! thousands of connections that send part of a request's headers and then
//! nothing, while another address polls `/healthz`. Measured in the same run:
//! `/healthz` latency without the flood (the baseline) and during it, how
//! many connections the registry held and refused, and its resident memory
//! before, at the peak and after. The flood opens [`FLOOD_PER_SEC`]
//! connections a second.

use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::ConnectOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;

use super::relay::rss_bytes;
use super::{BenchArgs, percentile};
use crate::db::Database;

/// The flood's address and the polling client's: two loopback addresses.
const FLOOD_FROM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const POLL_FROM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Flood connections being opened or held at once by this benchmark.
const FLOOD_CONCURRENCY: usize = 2_048;
/// New flood connections per second. The flood measures what idle
/// connections cost, not a connection-rate flood: on this machine's two
/// cores an unpaced flood mostly measures the benchmark's own CPU, which
/// shares them with the registry.
const FLOOD_PER_SEC: u64 = 2_000;
/// How often `/healthz` is polled (within the registry's 20/s budget for
/// health checks per address, with the metrics scrapes).
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How often the registry's metrics and memory are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// Every wait of the benchmark is bounded by this.
const WAIT: Duration = Duration::from_secs(120);

/// What one flood showed.
pub struct Flood {
    pub attempted: usize,
    pub most_held: u64,
    pub refused: u64,
    pub baseline_ms: Vec<f64>,
    pub flooded_ms: Vec<f64>,
    pub rss_before: u64,
    pub rss_peak: u64,
    pub rss_after: u64,
}

impl Flood {
    pub fn p99_baseline_ms(&self) -> f64 {
        percentile(&self.baseline_ms, 0.99)
    }

    pub fn p99_flooded_ms(&self) -> f64 {
        percentile(&self.flooded_ms, 0.99)
    }

    pub fn max_flooded_ms(&self) -> f64 {
        self.flooded_ms.iter().copied().fold(0.0, f64::max)
    }
}

/// Runs `args.idle_connections` idle connections against a registry
/// process on `db`.
pub async fn run(db: &Database, args: &BenchArgs) -> anyhow::Result<Flood> {
    let scratch = std::env::temp_dir().join(format!("ferry-bench-flood-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let url = db.options().to_url_lossy().to_string();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["registry", "--listen", "127.0.0.1:0", "--database-url", &url])
        .arg("--operator-key")
        .arg(scratch.join("operator.key"))
        .args(["--probe-interval-secs", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting ferry registry")?;
    let result = flood(&mut child, args.idle_connections).await;
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

async fn flood(child: &mut std::process::Child, count: usize) -> anyhow::Result<Flood> {
    let stdout = child.stdout.take().context("no stdout")?;
    let line = tokio::task::spawn_blocking(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        // Later lines are read and dropped, so the child never blocks.
        std::thread::spawn(move || {
            let mut rest = String::new();
            while reader.read_line(&mut rest).is_ok_and(|read| read > 0) {
                rest.clear();
            }
        });
        std::io::Result::Ok(line)
    })
    .await??;
    let Some(base) = line.strip_prefix("listening on ").and_then(|rest| rest.split(' ').next())
    else {
        bail!("ferry registry printed no address: {line:?}");
    };
    let base = base.to_owned();
    let address: SocketAddr = base.trim_start_matches("http://").parse()?;
    let pid = child.id();
    let poller = reqwest::Client::builder()
        .local_address(IpAddr::V4(POLL_FROM))
        .timeout(Duration::from_secs(10))
        .build()?;
    let healthz = format!("{base}/healthz");

    println!("▸ /healthz alone: {} polls from {POLL_FROM}", 50);
    let mut baseline_ms = Vec::new();
    for _ in 0..50 {
        baseline_ms.push(poll(&poller, &healthz).await?);
        tokio::time::sleep(POLL_EVERY).await;
    }
    let rss_before = rss_bytes(pid)?;

    println!("▸ {count} idle connections from {FLOOD_FROM}, /healthz polled from {POLL_FROM}");
    let flooding = tokio::spawn(open_idle(address, count));
    let (mut flooded_ms, mut most_held, mut rss_peak) = (Vec::new(), 0u64, rss_before);
    let mut last_sample = Instant::now();
    let deadline = Instant::now() + WAIT;
    while !flooding.is_finished() {
        anyhow::ensure!(Instant::now() < deadline, "the flood did not end within {WAIT:?}");
        flooded_ms.push(poll(&poller, &healthz).await?);
        if last_sample.elapsed() >= SAMPLE_EVERY {
            last_sample = Instant::now();
            most_held = most_held.max(metric(&poller, &base, "ferry_connections ").await?);
            rss_peak = rss_peak.max(rss_bytes(pid)?);
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    flooding.await??;
    // The held connections are closed by the header read timeout, so the
    // count falls back to the poller's own.
    let settled = async {
        while metric(&poller, &base, "ferry_connections ").await? > 1 {
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(WAIT, settled).await.context("connections did not close")??;
    let refused = metric(&poller, &base, "ferry_connections_refused_total{scope=\"per_ip\"} ")
        .await?
        + metric(&poller, &base, "ferry_connections_refused_total{scope=\"total\"} ").await?;
    let rss_after = rss_bytes(pid)?;
    Ok(Flood {
        attempted: count,
        most_held,
        refused,
        baseline_ms,
        flooded_ms,
        rss_before,
        rss_peak,
        rss_after,
    })
}

/// One `/healthz`; its latency in ms.
async fn poll(client: &reqwest::Client, url: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let answer = client.get(url).send().await?;
    anyhow::ensure!(answer.status().is_success(), "/healthz answered {}", answer.status());
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// The value of the series whose line starts with `series` (0 if absent).
async fn metric(client: &reqwest::Client, base: &str, series: &str) -> anyhow::Result<u64> {
    let text = client.get(format!("{base}/metrics")).send().await?.text().await?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |value| value as u64))
}

/// Opens `count` connections that each send part of a request's headers
/// and wait until the registry closes them.
async fn open_idle(address: SocketAddr, count: usize) -> anyhow::Result<()> {
    let mut open = JoinSet::new();
    let mut pace = tokio::time::interval(Duration::from_micros(1_000_000 / FLOOD_PER_SEC));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..count {
        pace.tick().await;
        while open.len() >= FLOOD_CONCURRENCY {
            if let Some(done) = open.join_next().await {
                done?;
            }
        }
        open.spawn(async move {
            let idle = async {
                let socket = TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(IpAddr::V4(FLOOD_FROM), 0))?;
                let mut stream = socket.connect(address).await?;
                stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: flood\r\n").await?;
                let mut sink = Vec::new();
                stream.read_to_end(&mut sink).await?;
                std::io::Result::Ok(())
            };
            // A refused or reset connection counts as shed all the same.
            let _ = tokio::time::timeout(WAIT, idle).await;
        });
    }
    while let Some(done) = open.join_next().await {
        done?;
    }
    Ok(())
}
