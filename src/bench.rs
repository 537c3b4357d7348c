//! `ferry bench`: benchmarks reported as ratios to a baseline measured in the
//! same run on the same machine, because these machines are shared and noisy.

mod ledger;
mod registry;
mod relay;

use clap::{Args, ValueEnum};
use ferry_ledger::IdempotencyKey;

/// Which benchmarks to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// Every benchmark.
    All,
    /// Ledger settlement against pgbench.
    Ledger,
    /// Registry listings against a trivial axum handler, and the settlement endpoint.
    Registry,
    /// Relay throughput against a bare TCP proxy, payment CPU, idle sessions' memory.
    Relay,
}

/// Options of `ferry bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmarks to run.
    #[arg(value_enum, default_value_t = Suite::All)]
    pub suite: Suite,
    /// Seconds for each timed run (pgbench, and each HTTP load run).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Relays settling concurrently in the batched runs.
    #[arg(long, default_value_t = 4)]
    pub relays: usize,
    /// Vouchers per settlement batch (one per channel).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Rounds of batches in the batched runs (each relay settles one batch per round).
    #[arg(long, default_value_t = 10)]
    pub rounds: u64,
    /// Single-voucher settlements in the latency run.
    #[arg(long, default_value_t = 500)]
    pub singles: usize,
    /// Relays registered for the listing benchmark.
    #[arg(long, default_value_t = 10_000)]
    pub listed_relays: usize,
    /// Concurrent HTTP connections of the listing benchmark.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Bytes pushed through one tunnel per throughput run.
    #[arg(long, default_value_t = 1 << 30)]
    pub tunnel_bytes: u64,
    /// Idle authenticated sessions held open for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    pub idle_sessions: usize,
}

/// Runs the chosen benchmarks and prints their reports.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    println!("machine: {}\n", machine());
    if matches!(args.suite, Suite::All | Suite::Ledger) {
        ledger::run(&args).await?;
    }
    if matches!(args.suite, Suite::All | Suite::Registry) {
        registry::run(&args).await?;
    }
    if matches!(args.suite, Suite::All | Suite::Relay) {
        relay::run(&args).await?;
    }
    Ok(())
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn percentile(values: &[f64], quantile: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() as f64 - 1.0) * quantile).round() as usize;
    sorted.get(index).copied().unwrap_or(0.0)
}

fn idempotency(text: &str) -> anyhow::Result<IdempotencyKey> {
    // Relay keys are 64 hex digits: keep the key within the 64-character limit.
    let text: String = text.chars().take(64).collect();
    Ok(text.parse()?)
}

/// The CPU model and core count, for the record.
fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                line.strip_prefix("model name")
                    .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    format!("{model}, {cores} cores")
}
