//! `ferry bench`: benchmarks reported as ratios to a baseline measured in the
//! same run on the same machine, because these machines are shared and noisy.

mod aead;
mod connections;
mod delay;
mod distance;
mod ledger;
mod registry;
mod relay;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use ferry_ledger::IdempotencyKey;

/// Which benchmarks to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// Every benchmark.
    All,
    /// Ledger settlement against pgbench.
    Ledger,
    /// Registry listings against a trivial axum handler, the settlement
    /// endpoint, and /healthz under a flood of idle connections.
    Registry,
    /// Relay throughput against a bare TCP proxy, payment CPU, idle sessions' memory.
    Relay,
    /// Throughput through the relay at round trips of 0 to 100 ms per hop,
    /// against bare TCP through the same delaying proxies.
    Distance,
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
    /// Seconds each path of the distance benchmark sends for: long enough
    /// that a stream's window ramp at 200 ms per end-to-end round trip
    /// (about 1 s) does not dominate the figure.
    #[arg(long, default_value_t = 10)]
    pub distance_seconds: u64,
    /// Round trips per hop the distance benchmark runs at, in ms
    /// (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [0, 20, 50, 100])]
    pub round_trips_ms: Vec<u64>,
    /// Idle connections one address opens against the registry (each sends
    /// part of a request's headers, then nothing).
    #[arg(long, default_value_t = 20_000)]
    pub idle_connections: usize,
    /// Idle authenticated sessions held open for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    pub idle_sessions: usize,
    /// The file whose generated sections get each suite's table.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    pub report: PathBuf,
    /// Print the tables only; write nothing.
    #[arg(long)]
    pub no_report: bool,
}

/// One suite's results: a markdown table of figures against their
/// baselines, and notes below it.
pub struct Table {
    header: String,
    rows: Vec<String>,
    notes: Vec<String>,
}

impl Table {
    fn new(subject: &str) -> Table {
        Table {
            header: format!(
                "| measure | {subject} | baseline (same run) | ratio |\n|---|---|---|---|"
            ),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a row, already in markdown.
    fn row(&mut self, row: String) {
        self.rows.push(row);
    }

    /// Adds a line below the table.
    fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    fn markdown(&self) -> String {
        let mut text = format!("{}\n{}\n", self.header, self.rows.join("\n"));
        for note in &self.notes {
            text.push_str(&format!("\n{note}\n"));
        }
        text
    }
}

/// Each suite, in the order they run, with the name of its report section.
const SUITES: [(&str, Suite); 4] = [
    ("ledger", Suite::Ledger),
    ("registry", Suite::Registry),
    ("relay", Suite::Relay),
    ("distance", Suite::Distance),
];

/// Runs the chosen benchmarks, prints their tables, and writes each into
/// its generated section of the report file.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let machine = machine();
    println!("machine: {machine}\n");
    if !args.no_report {
        // Fail before minutes of measuring, not after.
        let report = std::fs::read_to_string(&args.report).with_context(|| {
            format!(
                "reading {} (run from the repository, or pass --report or --no-report)",
                args.report.display()
            )
        })?;
        for (name, _) in SUITES {
            section_bounds(&report, name)?;
        }
    }
    for (name, suite) in SUITES {
        if !matches!(args.suite, Suite::All) && args.suite != suite {
            continue;
        }
        let started = std::time::Instant::now();
        let table = match suite {
            Suite::Ledger => ledger::run(&args).await?,
            Suite::Registry => registry::run(&args).await?,
            Suite::Relay => relay::run(&args).await?,
            // SUITES holds every suite but All.
            Suite::Distance | Suite::All => distance::run(&args).await?,
        };
        let markdown = table.markdown();
        println!("\n{markdown}");
        if !args.no_report {
            let when = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC");
            let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
            let section = format!(
                "Latest run: {when}, on {machine}; `ferry {command}`; this suite took {:.0} s.\n\n{markdown}",
                started.elapsed().as_secs_f64()
            );
            write_section(&args.report, name, &section)?;
            println!("written to {} (section \"{name}\")", args.report.display());
        }
    }
    Ok(())
}

/// The generated section's markers for `suite`.
fn markers(suite: &str) -> (String, String) {
    (
        format!("<!-- ferry bench {suite}: begin (generated; `ferry bench` rewrites it) -->"),
        format!("<!-- ferry bench {suite}: end -->"),
    )
}

/// Where `suite`'s generated section starts and ends in `report`.
fn section_bounds(report: &str, suite: &str) -> anyhow::Result<(usize, usize)> {
    let (begin, end) = markers(suite);
    let start =
        report.find(&begin).with_context(|| format!("the report lacks the line {begin}"))?;
    let stop = report[start..]
        .find(&end)
        .map(|offset| start + offset)
        .with_context(|| format!("the report lacks the line {end}"))?;
    Ok((start + begin.len(), stop))
}

/// Replaces `suite`'s generated section of the file at `path` with `section`.
fn write_section(path: &Path, suite: &str, section: &str) -> anyhow::Result<()> {
    let report = std::fs::read_to_string(path)?;
    let (start, stop) = section_bounds(&report, suite)?;
    let updated = format!("{}\n{section}{}", &report[..start], &report[stop..]);
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
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

/// The CPU model, cores, memory and kernel, for the record.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| {
            line.strip_prefix("model name")
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let kib: u64 = line
                    .strip_prefix("MemTotal:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()?;
                Some(kib as f64 / f64::from(1 << 20))
            })
        })
        .map_or_else(|| "unknown memory".to_owned(), |gib| format!("{gib:.0} GiB"));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown kernel".to_owned(), |text| format!("Linux {}", text.trim()));
    format!("{model}, {cores} cores, {memory_gib}, {kernel}")
}
