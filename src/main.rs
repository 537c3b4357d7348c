//! `ferry`: the command that runs every part of the marketplace.

mod bench;
mod client;
mod db;
mod demo;
mod relay;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferry_ledger::{Ledger, LedgerConfig};
use ferry_proto::SecretKey;

/// A marketplace of paid relays.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole marketplace, narrated, on a private, throwaway Postgres.
    Demo(demo::DemoArgs),
    /// Inspect the ledger.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Create and show ed25519 identities.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Serve the registry and ledger web API.
    Registry(RegistryArgs),
    /// Run a relay: carry clients' bytes and get paid for them.
    Relay(Box<relay::RelayArgs>),
    /// Run the benchmarks and print their figures against same-run baselines.
    Bench(bench::BenchArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

#[derive(Debug, Args)]
struct RegistryArgs {
    /// The address to listen on (port 0 picks a free port; the address is
    /// printed on the first line of standard output).
    #[arg(long, env = "FERRY_LISTEN", default_value = "127.0.0.1:7070")]
    listen: std::net::SocketAddr,
    #[command(flatten)]
    database: DatabaseArgs,
    /// The operator's key file, created on first start; it signs deposits.
    #[arg(long, env = "FERRY_OPERATOR_KEY", default_value = "ferry-operator.key")]
    operator_key: PathBuf,
    /// The registry's fee on settled amounts, in basis points.
    #[arg(long, env = "FERRY_FEE_BPS", default_value_t = 100)]
    fee_bps: u16,
    /// How long a relay may still settle after a client asks to close, in seconds.
    #[arg(long, env = "FERRY_DISPUTE_WINDOW_SECS", default_value_t = 86_400)]
    dispute_window_secs: u64,
    /// How often to probe every relay's address and handshake, in seconds (0: never).
    #[arg(long, env = "FERRY_PROBE_INTERVAL_SECS", default_value_t = 60)]
    probe_interval_secs: u64,
    #[command(flatten)]
    limits: LimitArgs,
}

/// The registry's request limits (docs/OPERATING.md).
#[derive(Debug, Args)]
struct LimitArgs {
    /// The largest request body, in bytes.
    #[arg(long, env = "FERRY_MAX_BODY_BYTES", default_value_t = ferry_api::Limits::default().max_body_bytes)]
    max_body_bytes: usize,
    /// The longest a request may take, in milliseconds.
    #[arg(long, env = "FERRY_REQUEST_TIMEOUT_MS", default_value_t = ferry_api::Limits::default().request_timeout.as_secs() * 1000)]
    request_timeout_ms: u64,
    /// Requests per second per client IP address (0: no limit).
    #[arg(long, env = "FERRY_RATE_PER_IP", default_value_t = ferry_api::Limits::default().per_ip.per_sec)]
    rate_per_ip: u32,
    /// Requests a client IP address may send at once.
    #[arg(long, env = "FERRY_BURST_PER_IP", default_value_t = ferry_api::Limits::default().per_ip.burst)]
    burst_per_ip: u32,
    /// Signed requests per second per key (0: no limit).
    #[arg(long, env = "FERRY_RATE_PER_KEY", default_value_t = ferry_api::Limits::default().per_key.per_sec)]
    rate_per_key: u32,
    /// Signed requests a key may send at once.
    #[arg(long, env = "FERRY_BURST_PER_KEY", default_value_t = ferry_api::Limits::default().per_key.burst)]
    burst_per_key: u32,
    /// Requests per second per client IP address to /healthz, /readyz and
    /// /metrics, apart from the API's (0: no limit).
    #[arg(long, env = "FERRY_RATE_PER_IP_OPERATIONS", default_value_t = ferry_api::Limits::default().per_ip_operations.per_sec)]
    rate_per_ip_operations: u32,
    /// Connections open at once; more are refused with 503.
    #[arg(long, env = "FERRY_MAX_CONNECTIONS", default_value_t = ferry_api::ConnectionLimits::default().max_connections)]
    max_connections: usize,
    /// Connections one client IP address may hold open at once.
    #[arg(long, env = "FERRY_MAX_CONNECTIONS_PER_IP", default_value_t = ferry_api::ConnectionLimits::default().max_connections_per_ip)]
    max_connections_per_ip: usize,
    /// How long a connection may take to send a request's headers, from its
    /// opening or its previous response (so also the keep-alive idle
    /// timeout), in milliseconds.
    #[arg(long, env = "FERRY_HEADER_READ_TIMEOUT_MS", default_value_t = ferry_api::ConnectionLimits::default().header_read_timeout.as_secs() * 1000)]
    header_read_timeout_ms: u64,
}

impl LimitArgs {
    fn limits(&self) -> ferry_api::Limits {
        ferry_api::Limits {
            max_body_bytes: self.max_body_bytes,
            request_timeout: std::time::Duration::from_millis(self.request_timeout_ms),
            per_ip: ferry_api::Rate { per_sec: self.rate_per_ip, burst: self.burst_per_ip },
            per_key: ferry_api::Rate { per_sec: self.rate_per_key, burst: self.burst_per_key },
            per_ip_operations: ferry_api::Rate {
                per_sec: self.rate_per_ip_operations,
                burst: self.rate_per_ip_operations.saturating_mul(2),
            },
            connections: ferry_api::ConnectionLimits {
                max_connections: self.max_connections,
                max_connections_per_ip: self.max_connections_per_ip,
                header_read_timeout: std::time::Duration::from_millis(self.header_read_timeout_ms),
                ..ferry_api::ConnectionLimits::default()
            },
        }
    }
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Check every ledger invariant; exits non-zero if one is violated.
    Check {
        #[command(flatten)]
        database: DatabaseArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Create a new key file (owner-only permissions); never overwrites one.
    New {
        /// Where to write the key.
        path: PathBuf,
    },
    /// Print the public key of a key file.
    Show {
        /// The key file.
        path: PathBuf,
    },
}

/// Where the ledger's database is.
#[derive(Debug, Args)]
struct DatabaseArgs {
    /// A Postgres URL. Without one, ferry starts its own private cluster in
    /// --data-dir.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// The directory of the private cluster used when no URL is given.
    #[arg(long, env = "FERRY_DATA_DIR", default_value_os_t = db::default_data_dir())]
    data_dir: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Serves the registry until SIGINT or SIGTERM, then finishes the requests in
/// flight and stops the embedded database, if any.
async fn registry(args: RegistryArgs) -> anyhow::Result<()> {
    let operator = SecretKey::read_or_create_file(&args.operator_key)
        .with_context(|| format!("operator key file {}", args.operator_key.display()))?;
    let db = db::Database::open(args.database.database_url, &args.database.data_dir).await?;
    let config = LedgerConfig {
        fee_basis_points: args.fee_bps,
        dispute_window: std::time::Duration::from_secs(args.dispute_window_secs),
        ..LedgerConfig::default()
    };
    let ledger = Ledger::connect(db.options().clone(), config).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let shutdown = shutdown_signal();
    announce(&format!(
        "listening on http://{} (operator key {})",
        listener.local_addr()?,
        operator.public()
    ));
    let state = ferry_api::AppState::new(
        ledger.clone(),
        ferry_api::RegistryConfig {
            operator: operator.public(),
            limits: args.limits.limits(),
            probe_interval: (args.probe_interval_secs > 0)
                .then(|| std::time::Duration::from_secs(args.probe_interval_secs)),
        },
    );
    let served = ferry_api::serve(listener, state, shutdown).await;
    ledger.close().await;
    db.close().await?;
    served.context("serving the registry")
}

/// Prints one line for people, scripts and tests. A closed standard output
/// must not stop a server, so write errors are ignored.
pub(crate) fn announce(line: &str) {
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Completes on SIGINT or SIGTERM.
/// Completes on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: a command calls it before
/// it announces itself, so a signal sent right after the announcement is
/// never missed (the default action would kill the process unsettled).
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::error!(%error, "cannot listen for {name}");
            None
        }
    };
    let (interrupt, terminate) =
        (listen(SignalKind::interrupt(), "SIGINT"), listen(SignalKind::terminate(), "SIGTERM"));
    async move {
        let wait = |signal: Option<tokio::signal::unix::Signal>| async move {
            match signal {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(interrupt) => {}
            () = wait(terminate) => {}
        }
        tracing::info!("shutting down");
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => demo::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => bench::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Registry(args) => registry(args).await.map(|()| ExitCode::SUCCESS),
        Command::Relay(args) => relay::run(*args).await.map(|()| ExitCode::SUCCESS),
        Command::Client(command) => client::run(command).await.map(|()| ExitCode::SUCCESS),
        Command::Ledger { command: LedgerCommand::Check { database, json } } => {
            let db = db::Database::open(database.database_url, &database.data_dir).await?;
            let ledger = Ledger::connect(db.options().clone(), LedgerConfig::default()).await?;
            let report = ledger.check().await?;
            ledger.close().await;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                demo::print_check(&report);
            }
            db.close().await?;
            Ok(if report.is_ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Key { command: KeyCommand::New { path } } => {
            let key = SecretKey::create_file(&path)
                .with_context(|| format!("creating key file {}", path.display()))?;
            println!("{}", key.public());
            Ok(ExitCode::SUCCESS)
        }
        Command::Key { command: KeyCommand::Show { path } } => {
            let key = SecretKey::read_file(&path)
                .with_context(|| format!("reading key file {}", path.display()))?;
            println!("{}", key.public());
            Ok(ExitCode::SUCCESS)
        }
    }
}
