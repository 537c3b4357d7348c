//! `ferry`: the command that runs every part of the marketplace.

mod bench;
mod client;
mod db;
mod demo;
mod registry;
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
    Registry(registry::RegistryArgs),
    /// Run a relay: carry clients' bytes and get paid for them.
    Relay(Box<relay::RelayCommand>),
    /// Run the benchmarks and print their figures against same-run baselines.
    Bench(bench::BenchArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
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
    // sqlx reports slow statements at warn, under sqlx::query: that is for
    // whoever tunes the database, with RUST_LOG, not every operator's log.
    // Colours only on a terminal: a log file or journal gets plain text.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx::query=error")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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

/// Prints one line for people, scripts and tests. A closed standard output
/// must not stop a server, so write errors are ignored.
pub(crate) fn announce(line: &str) {
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

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
        Command::Registry(args) => registry::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Relay(command) => match command.action {
            Some(relay::RelayAction::Status(args)) => relay::status::run(args).await,
            None => relay::run(command.run).await,
        }
        .map(|()| ExitCode::SUCCESS),
        Command::Client(command) => client::run(command).await,
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
