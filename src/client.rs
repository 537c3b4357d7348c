//! The client commands of `ferry`: the relay table, money, channels, and
//! moving files and TCP connections through the market (docs/CLIENT.md,
//! "The ferry command").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use ferry_client::select::{Offer, SelectionPolicy};
use ferry_client::wallet::Budget;
use ferry_client::{ChannelView, Endpoint, EndpointConfig, RegistryClient, RegistryError};
use ferry_proto::{Amount, ChannelId, PricePerByte, PublicKey, SecretKey};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The first bytes of a file transfer on a peer stream.
const FILE_MAGIC: &[u8] = b"FERRY-FILE/2\n";
/// The receiver's answer to a header it will take.
const FILE_READY: &str = "ready";
/// The longest answer to a header: `refused ` and a reason.
const MAX_ANSWER_BYTES: usize = 512;
/// The longest file name a sender may announce.
const MAX_FILE_NAME_BYTES: usize = 255;
/// How long a receiver waits for a sender's header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a sender waits for the receiver's verdict once all is sent.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(60);
/// Copy buffer for files and tunnels.
const COPY_BUFFER_BYTES: usize = 64 << 10;

/// Who this client is and which registry it talks to.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The registry's URL: https://, or http:// on this machine.
    #[arg(long, env = "FERRY_REGISTRY", default_value = "http://127.0.0.1:7070")]
    registry: String,
    /// Trust only the CA certificates in this PEM file for the registry's
    /// TLS (a private registry's own CA) instead of the system's roots.
    #[arg(long, env = "FERRY_REGISTRY_CA")]
    registry_ca: Option<PathBuf>,
    /// This client's key file (`ferry key new PATH` creates one).
    #[arg(long, env = "FERRY_KEY", default_value = "ferry.key")]
    key: PathBuf,
    /// Print JSON for scripts instead of tables and progress bars.
    #[arg(long)]
    json: bool,
}

/// Which relays a client will use.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// Only relays at most this dear, in tokens per GiB.
    #[arg(long, value_name = "TOKENS_PER_GIB")]
    max_price: Option<Amount>,
    /// Only relays with at least this reputation (0 to 1).
    #[arg(long, default_value_t = SelectionPolicy::default().min_reputation)]
    min_reputation: f64,
    /// Only relays in this region.
    #[arg(long)]
    region: Option<String>,
}

impl PolicyArgs {
    fn policy(&self) -> anyhow::Result<SelectionPolicy> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.min_reputation),
            "--min-reputation is a score from 0 to 1"
        );
        let max_price = match self.max_price {
            Some(per_gib) => Some(
                PricePerByte::from_attos(per_gib.attos() / (1u128 << 30))
                    .context("--max-price is out of range")?,
            ),
            None => None,
        };
        Ok(SelectionPolicy {
            max_price,
            min_reputation: self.min_reputation,
            region: self.region.clone(),
            ..SelectionPolicy::default()
        })
    }
}

/// How much a paying command may lock in each relay's channel.
#[derive(Debug, Args)]
pub struct BudgetArgs {
    /// Escrow of a new channel, and of each top-up, in tokens.
    #[arg(long, default_value = "1")]
    budget: Amount,
}

impl BudgetArgs {
    fn budget(&self) -> anyhow::Result<Budget> {
        anyhow::ensure!(self.budget > Amount::ZERO, "--budget must be above zero");
        let quarter = Amount::from_attos(self.budget.attos() / 4).context("budget")?;
        Ok(Budget { open: self.budget, top_up: self.budget, low_water: quarter })
    }
}

/// How to sort the relay table.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RelaySort {
    /// Cheapest first.
    Price,
    /// Best reputation first.
    Reputation,
    /// By region, then price.
    Region,
    /// Least loaded first.
    Load,
}

/// The client commands.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// List the market's relays: price per GiB, reputation, region, load.
    Relays {
        #[command(flatten)]
        client: ClientArgs,
        /// The column to sort by.
        #[arg(long, value_enum, default_value = "price")]
        sort: RelaySort,
        /// Every relay, whatever its score and whether or not it sent a
        /// recent heartbeat (--max-price and --region still apply).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Show this key's money: available, in escrow, earned.
    Balance {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show this key's newest transfers.
    Statement {
        #[command(flatten)]
        client: ClientArgs,
        /// How many transfers.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Credit an account on a demo registry, signed with the operator's key.
    Deposit {
        #[command(flatten)]
        client: ClientArgs,
        /// The amount, in tokens.
        amount: Amount,
        /// The registry operator's key file.
        #[arg(long, env = "FERRY_OPERATOR_KEY", default_value = "ferry-operator.key")]
        operator_key: PathBuf,
        /// The account to credit (default: this client's key).
        #[arg(long)]
        to: Option<PublicKey>,
    },
    /// Take money out of this key's available balance (a relay's earnings,
    /// say): the registry's operator pays it out.
    Withdraw {
        #[command(flatten)]
        client: ClientArgs,
        /// The amount, in tokens.
        #[arg(required_unless_present = "all")]
        amount: Option<Amount>,
        /// The whole available balance.
        #[arg(long, conflicts_with = "amount")]
        all: bool,
    },
    /// List, open and close payment channels.
    Channels {
        #[command(subcommand)]
        command: ChannelCommand,
    },
    /// Send a file to a peer's key through the market.
    Send {
        #[command(flatten)]
        client: ClientArgs,
        /// The file.
        file: PathBuf,
        /// The receiver's key.
        #[arg(long)]
        to: PublicKey,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        budget: BudgetArgs,
    },
    /// Listen on home relays and receive one file.
    Receive {
        #[command(flatten)]
        client: ClientArgs,
        /// The directory to write the file to.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// How many relays to listen on.
        #[arg(long, default_value_t = 2)]
        home_relays: usize,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Forward TCP connections through the market, like `ssh -L`: with
    /// --to, each connection to --local goes to the peer; with --serve,
    /// each peer stream is connected to the given address here.
    Tunnel {
        #[command(flatten)]
        client: ClientArgs,
        /// The peer to forward to.
        #[arg(long, requires = "local", conflicts_with = "serve")]
        to: Option<PublicKey>,
        /// The local address to accept connections on (with --to).
        #[arg(long)]
        local: Option<std::net::SocketAddr>,
        /// The address that peer streams are forwarded to (the peer's end).
        #[arg(long)]
        serve: Option<String>,
        /// Peers allowed to connect (with --serve; default: anyone).
        #[arg(long = "allow")]
        allow: Vec<PublicKey>,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        budget: BudgetArgs,
    },
}

/// Channel commands.
#[derive(Debug, Subcommand)]
pub enum ChannelCommand {
    /// This key's channels, newest first.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Open a channel to a relay.
    Open {
        #[command(flatten)]
        client: ClientArgs,
        /// The relay's key, or a unique prefix of it (as tables show).
        relay: String,
        /// The escrow, in tokens.
        amount: Amount,
    },
    /// Ask to close a channel; with --finalize, also refund it once the
    /// dispute window has passed.
    Close {
        #[command(flatten)]
        client: ClientArgs,
        /// The channel's id, or a unique prefix of it.
        channel: String,
        /// Finalize too (fails while the dispute window is open).
        #[arg(long)]
        finalize: bool,
    },
}

struct Client {
    registry: RegistryClient,
    json: bool,
}

impl ClientCommand {
    fn client_args(&self) -> &ClientArgs {
        match self {
            ClientCommand::Relays { client, .. }
            | ClientCommand::Balance { client }
            | ClientCommand::Statement { client, .. }
            | ClientCommand::Deposit { client, .. }
            | ClientCommand::Withdraw { client, .. }
            | ClientCommand::Send { client, .. }
            | ClientCommand::Receive { client, .. }
            | ClientCommand::Tunnel { client, .. } => client,
            ClientCommand::Channels { command } => match command {
                ChannelCommand::List { client }
                | ChannelCommand::Open { client, .. }
                | ChannelCommand::Close { client, .. } => client,
            },
        }
    }
}

/// Reads the client's key file. A missing one is an error, never a new
/// identity: a mistyped `--key` must not pay from, or wait for money to,
/// a key nobody meant.
fn read_key(path: &Path) -> anyhow::Result<SecretKey> {
    match SecretKey::read_file(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "no key file at {}: create one with `ferry key new {}`, or name yours with --key (or FERRY_KEY)",
            path.display(),
            path.display()
        ),
        read => read.with_context(|| format!("key file {}", path.display())),
    }
}

/// Runs a client command. With --json, standard output carries only JSON:
/// a failure is `{"error": {"code", "message"}}` there, and the exit code
/// is 1.
pub async fn run(command: ClientCommand) -> anyhow::Result<std::process::ExitCode> {
    let (json, registry_url) = (command.client_args().json, command.client_args().registry.clone());
    let Err(error) = run_command(command).await else {
        return Ok(std::process::ExitCode::SUCCESS);
    };
    let refused = error.chain().find_map(|cause| cause.downcast_ref::<RegistryError>());
    let code = match refused {
        Some(RegistryError::Transport(_)) => "registry_unreachable",
        Some(refused) => refused.code().unwrap_or("registry_error"),
        None => "error",
    }
    .to_owned();
    let error = explain(error, &registry_url);
    if !json {
        return Err(error);
    }
    print_json(&json!({ "error": { "code": code, "message": format!("{error:#}") } }))?;
    Ok(std::process::ExitCode::FAILURE)
}

async fn run_command(command: ClientCommand) -> anyhow::Result<()> {
    let args = command.client_args();
    // Listing relays reads public data: it should not leave a key file
    // behind, so it uses a throwaway key when there is none.
    let key = if matches!(command, ClientCommand::Relays { .. }) && !args.key.exists() {
        SecretKey::generate()?
    } else {
        read_key(&args.key)?
    };
    let registry = crate::registry::client(&args.registry, args.registry_ca.as_deref(), key)?;
    let cx = Client { registry, json: args.json };
    match command {
        ClientCommand::Relays { sort, all, policy, .. } => relays(&cx, sort, all, &policy).await,
        ClientCommand::Balance { .. } => balance(&cx).await,
        ClientCommand::Statement { limit, .. } => statement(&cx, limit).await,
        ClientCommand::Deposit { amount, operator_key, to, .. } => {
            deposit(&cx, amount, &operator_key, to).await
        }
        ClientCommand::Withdraw { amount, .. } => withdraw(&cx, amount).await,
        ClientCommand::Channels { command, .. } => channels(&cx, command).await,
        ClientCommand::Send { file, to, policy, budget, .. } => {
            send(&cx, &file, to, policy.policy()?, budget.budget()?).await
        }
        ClientCommand::Receive { out, home_relays, policy, .. } => {
            receive(&cx, &out, home_relays, policy.policy()?).await
        }
        ClientCommand::Tunnel { to, local, serve, allow, policy, budget, .. } => {
            match (to, local, serve) {
                (Some(to), Some(local), None) => {
                    tunnel_out(&cx, to, local, policy.policy()?, budget.budget()?).await
                }
                (None, None, Some(serve)) => tunnel_in(&cx, &serve, allow, policy.policy()?).await,
                _ => bail!("give either --to KEY --local ADDR, or --serve ADDR"),
            }
        }
    }
}

/// Adds what to do to the errors people meet first.
fn explain(error: anyhow::Error, registry: &str) -> anyhow::Error {
    let text = format!("{error:#}");
    if text.contains("invalid peer certificate") {
        return error.context(format!(
            "the registry at {registry} presented a certificate this client does not trust: check the URL's host name, or pass --registry-ca FILE with the registry's CA"
        ));
    }
    let refused = error.chain().find_map(|cause| cause.downcast_ref::<RegistryError>());
    if let Some(RegistryError::Transport(_)) = refused {
        // One line: reqwest's chain repeats the request in every link.
        return anyhow::anyhow!(
            "cannot reach the registry at {registry} ({}); start one (`ferry registry`) or pass --registry URL",
            error.root_cause()
        );
    }
    if refused.and_then(RegistryError::code) == Some("insufficient_balance") {
        return error.context(
            "not enough money available: `ferry balance` shows what is; `ferry deposit` adds some (on a demo registry), and a smaller --budget asks for less",
        );
    }
    if text.contains("unknown_client") {
        return error.context(
            "the peer has published no home relays: is `ferry receive` running on its side?",
        );
    }
    error
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Bytes in binary units: `1.5 MiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

fn short(key: &PublicKey) -> String {
    key.to_string()[..12].to_owned()
}

async fn relays(
    cx: &Client,
    sort: RelaySort,
    all: bool,
    policy: &PolicyArgs,
) -> anyhow::Result<()> {
    let mut policy = policy.policy()?;
    let mut offers: Vec<Offer> = if all {
        policy.min_reputation = 0.0;
        cx.registry.offers_live_or_not(&policy).await?
    } else {
        cx.registry.offers(&policy).await?
    };
    match sort {
        RelaySort::Price => offers.sort_by_key(|offer| offer.price()),
        RelaySort::Reputation => offers.sort_by(|a, b| b.reputation.total_cmp(&a.reputation)),
        RelaySort::Region => offers.sort_by(|a, b| {
            a.advert.advert.region.cmp(&b.advert.advert.region).then(a.price().cmp(&b.price()))
        }),
        RelaySort::Load => offers.sort_by_key(|offer| offer.load_bytes_per_sec),
    }
    if cx.json {
        let rows: Vec<Value> = offers
            .iter()
            .map(|offer| {
                json!({
                    "relay": offer.key(),
                    "address": offer.advert.advert.address,
                    "price_per_gib": offer.price().per_gib(),
                    "reputation": offer.reputation,
                    "region": offer.advert.advert.region,
                    "load_bytes_per_sec": offer.load_bytes_per_sec,
                    "sessions": offer.sessions,
                    "live": offer.live,
                })
            })
            .collect();
        return print_json(&json!({ "relays": rows }));
    }
    if offers.is_empty() {
        println!(
            "no relay meets these filters; try --all, a higher --max-price or a lower --min-reputation"
        );
        return Ok(());
    }
    println!(
        "{:<12}  {:<21}  {:>14}  {:>10}  {:<10}  {:>12}  {:>8}  LIVE",
        "RELAY", "ADDRESS", "PRICE/GiB", "REPUTATION", "REGION", "LOAD", "SESSIONS"
    );
    for offer in &offers {
        let advert = &offer.advert.advert;
        println!(
            "{:<12}  {:<21}  {:>14}  {:>10.2}  {:<10}  {:>12}  {:>8}  {}",
            short(&offer.key()),
            advert.address,
            offer.price().per_gib().to_string(),
            offer.reputation,
            advert.region,
            format!("{}/s", human_bytes(offer.load_bytes_per_sec)),
            offer.sessions,
            if offer.live { "yes" } else { "no" }
        );
    }
    Ok(())
}

async fn balance(cx: &Client) -> anyhow::Result<()> {
    let balance = cx.registry.balance().await?;
    if cx.json {
        return print_json(&balance);
    }
    println!("key        {}", cx.registry.key().public());
    for field in ["available", "in_escrow", "earned"] {
        println!("{field:<10} {}", balance[field].as_str().unwrap_or("?"));
    }
    Ok(())
}

fn describe_counterparty(value: &Value) -> String {
    match value["kind"].as_str() {
        Some("holder") => format!("key {}", value["key"].as_str().unwrap_or("?")),
        Some("escrow") => format!("channel {}", value["channel"].as_str().unwrap_or("?")),
        Some(other) => other.to_owned(),
        None => "?".into(),
    }
}

/// What some of a key's channels moved: as a client, those to one relay;
/// as a relay, all of its own.
#[derive(Debug, Default, serde::Serialize)]
struct Spending {
    channels: usize,
    deposited: Amount,
    /// Paid for vouchers: to the relay and the registry's fee.
    spent: Amount,
    refunded: Amount,
    in_escrow: Amount,
}

impl Spending {
    fn add(&mut self, channel: &ChannelView) -> anyhow::Result<()> {
        let sum = |a: Amount, b: Amount| a.checked_add(b).context("a total overflows");
        self.channels += 1;
        self.deposited = sum(self.deposited, channel.deposited)?;
        self.spent = sum(self.spent, channel.settled)?;
        self.refunded = sum(self.refunded, channel.refunded)?;
        self.in_escrow = sum(self.in_escrow, channel.escrow)?;
        Ok(())
    }
}

/// A relay key's earnings: gross from its channels, net as the ledger
/// credited it, the registry's fee between them.
#[derive(Debug, serde::Serialize)]
struct Earning {
    channels: usize,
    gross: Amount,
    /// None when the net exceeds the gross seen: the relay has more
    /// channels than one listing holds.
    fee: Option<Amount>,
    net: Amount,
    /// The listing held only the newest channels.
    partial: bool,
}

/// This key's spending by relay (as a client) and its earnings (as a
/// relay), from its channels.
async fn spending(
    cx: &Client,
    earned: Amount,
) -> anyhow::Result<(BTreeMap<PublicKey, Spending>, Earning)> {
    let me = cx.registry.key().public();
    let channels = cx.registry.channels().await?;
    let mut by_relay: BTreeMap<PublicKey, Spending> = BTreeMap::new();
    let mut as_relay = Spending::default();
    for channel in &channels {
        if channel.client == me {
            by_relay.entry(channel.relay).or_default().add(channel)?;
        }
        if channel.relay == me {
            as_relay.add(channel)?;
        }
    }
    let earning = Earning {
        channels: as_relay.channels,
        gross: as_relay.spent,
        fee: as_relay.spent.checked_sub(earned).ok(),
        net: earned,
        partial: channels.len() >= ferry_ledger::MAX_CHANNELS_LISTED as usize,
    };
    Ok((by_relay, earning))
}

/// One amount of a balance the registry answered, such as `available`.
fn balance_amount(balance: &Value, field: &str) -> anyhow::Result<Amount> {
    balance[field]
        .as_str()
        .and_then(|text| text.parse().ok())
        .with_context(|| format!("the registry's balance has no {field} amount"))
}

async fn statement(cx: &Client, limit: u32) -> anyhow::Result<()> {
    let mut statement = cx.registry.statement(limit).await?;
    let earned = balance_amount(&cx.registry.balance().await?, "earned")?;
    let (by_relay, earning) = spending(cx, earned).await?;
    if cx.json {
        let rows: Vec<Value> = by_relay
            .iter()
            .map(|(relay, spent)| {
                let mut row = json!(spent);
                row["relay"] = json!(relay);
                row
            })
            .collect();
        statement["spending_by_relay"] = json!(rows);
        statement["as_relay"] = json!(earning);
        return print_json(&statement);
    }
    println!("balance {}", statement["balance"].as_str().unwrap_or("?"));
    for (relay, spent) in &by_relay {
        println!(
            "spent {} on relay {} (fees included) over {} channel(s): deposited {}, refunded {}, still in escrow {}",
            spent.spent,
            short(relay),
            spent.channels,
            spent.deposited,
            spent.refunded,
            spent.in_escrow
        );
    }
    if earning.channels > 0 {
        println!(
            "earned as a relay over {} channel(s): gross {}, the registry's fee {}, net {}",
            earning.channels,
            earning.gross,
            earning.fee.map_or_else(|| "unknown".to_owned(), |fee| fee.to_string()),
            earning.net
        );
    }
    let entries = statement["entries"].as_array().cloned().unwrap_or_default();
    if entries.is_empty() {
        println!("no transfers yet");
        return Ok(());
    }
    println!("{:<25}  {:<16}  {:>22}  {:>22}  COUNTERPARTY", "AT", "KIND", "CHANGE", "BALANCE");
    for entry in entries {
        let at = entry["at"].as_str().unwrap_or("?");
        println!(
            "{:<25}  {:<16}  {:>22}  {:>22}  {}",
            &at[..at.len().min(25)],
            entry["kind"].as_str().unwrap_or("?"),
            entry["change"].as_str().unwrap_or("?"),
            entry["balance_after"].as_str().unwrap_or("?"),
            describe_counterparty(&entry["counterparty"])
        );
    }
    Ok(())
}

/// A fresh idempotency key for one money command: each run is a new
/// operation, and the SDK's retries of it reuse the key.
fn cli_idempotency(operation: &str) -> anyhow::Result<String> {
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|error| anyhow::anyhow!("no randomness: {error}"))?;
    Ok(format!("cli-{operation}-{}", hex::encode(nonce)))
}

async fn deposit(
    cx: &Client,
    amount: Amount,
    operator_key: &Path,
    to: Option<PublicKey>,
) -> anyhow::Result<()> {
    let operator = SecretKey::read_file(operator_key).with_context(|| {
        format!(
            "the operator key {} (deposits are a demo registry's; its operator key signs them)",
            operator_key.display()
        )
    })?;
    let holder = to.unwrap_or_else(|| cx.registry.key().public());
    let as_operator = cx.registry.acting_for(operator);
    let answer = as_operator.deposit(&holder, amount, &cli_idempotency("deposit")?).await?;
    if cx.json {
        return print_json(&answer);
    }
    println!("deposited {amount} to {holder}");
    Ok(())
}

/// Withdraws `amount`, or with none the whole available balance.
async fn withdraw(cx: &Client, amount: Option<Amount>) -> anyhow::Result<()> {
    let amount = match amount {
        Some(amount) => amount,
        None => {
            let available = balance_amount(&cx.registry.balance().await?, "available")?;
            anyhow::ensure!(
                available > Amount::ZERO,
                "nothing to withdraw: the available balance is 0"
            );
            available
        }
    };
    let answer = cx.registry.withdraw(amount, &cli_idempotency("withdraw")?).await?;
    if cx.json {
        return print_json(&answer);
    }
    println!(
        "withdrew {amount}; available balance now {}",
        answer["balance"].as_str().unwrap_or("?")
    );
    Ok(())
}

async fn channels(cx: &Client, command: ChannelCommand) -> anyhow::Result<()> {
    match command {
        ChannelCommand::List { .. } => {
            let channels = cx.registry.channels().await?;
            if cx.json {
                return print_json(&json!({ "channels": channels }));
            }
            if channels.is_empty() {
                println!("no channels; `ferry channels open RELAY AMOUNT` opens one");
                return Ok(());
            }
            println!(
                "{:<64}  {:<12}  {:<10}  {:>14}  {:>14}  {:>14}",
                "CHANNEL", "RELAY", "STATE", "DEPOSITED", "SETTLED", "REFUNDED"
            );
            for channel in channels {
                println!(
                    "{:<64}  {:<12}  {:<10}  {:>14}  {:>14}  {:>14}",
                    channel.id.to_string(),
                    short(&channel.relay),
                    channel.state,
                    channel.deposited.to_string(),
                    channel.settled.to_string(),
                    channel.refunded.to_string()
                );
            }
        }
        ChannelCommand::Open { relay, amount, .. } => {
            let relay = resolve_relay(cx, &relay).await?;
            let channels = cx.registry.channels().await?;
            let nonce = ferry_client::next_nonce(&channels, &cx.registry.key().public(), &relay);
            let channel = cx.registry.open_channel(&relay, nonce, amount).await?;
            if cx.json {
                return print_json(&json!(channel));
            }
            println!("opened channel {} to {relay} with {amount}", channel.id);
        }
        ChannelCommand::Close { channel, finalize, .. } => {
            let channel = resolve_channel(cx, &channel).await?;
            let mut view = cx.registry.request_close(&channel).await?;
            if finalize && view.state != "closed" {
                view = match cx.registry.finalize(&channel).await {
                    Ok(view) => view,
                    Err(error) if error.code() == Some("dispute_window_open") => {
                        bail!(
                            "channel {channel} cannot be finalized yet: {}",
                            until_finalize(&view)
                        )
                    }
                    Err(error) => return Err(error.into()),
                };
            }
            if cx.json {
                return print_json(&json!(view));
            }
            println!(
                "channel {channel}: {} (settled {}, refunded {})",
                view.state, view.settled, view.refunded
            );
            if view.state == "closing" {
                println!("{}", until_finalize(&view));
            }
        }
    }
    Ok(())
}

/// When a closing channel can be finalized, in words.
fn until_finalize(view: &ChannelView) -> String {
    let deadline = view
        .dispute_deadline
        .as_deref()
        .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok());
    match deadline {
        Some(deadline) => {
            let left = deadline.with_timezone(&chrono::Utc) - chrono::Utc::now();
            let wait = if left.num_seconds() <= 0 {
                "now".to_owned()
            } else {
                format!("in {} h {} min", left.num_hours(), left.num_minutes() % 60)
            };
            format!(
                "the relay may settle until {deadline} ({wait}); then `ferry channels close {} --finalize` refunds the rest",
                view.id
            )
        }
        None => format!(
            "`ferry channels close {} --finalize` refunds the rest once the dispute window has passed",
            view.id
        ),
    }
}

/// The shortest prefix of a key or channel id that is looked up.
const MIN_PREFIX_DIGITS: usize = 4;

/// The one of `candidates` whose text form starts with `typed`: the
/// tables show 12-digit prefixes, and a unique prefix of at least
/// [`MIN_PREFIX_DIGITS`] names its key or id.
fn unique_prefix<T: std::fmt::Display>(
    typed: &str,
    what: &str,
    candidates: impl IntoIterator<Item = T>,
) -> anyhow::Result<T> {
    anyhow::ensure!(
        typed.len() >= MIN_PREFIX_DIGITS
            && typed.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{typed:?} is not a {what}: give its 64 lowercase hex digits, or a prefix of at least {MIN_PREFIX_DIGITS}"
    );
    let mut matching: Vec<T> = candidates
        .into_iter()
        .filter(|candidate| candidate.to_string().starts_with(typed))
        .collect();
    match matching.len() {
        1 => Ok(matching.remove(0)),
        0 => bail!("no {what} starts with {typed}"),
        count => bail!(
            "{typed} is the start of {count} {what}s ({}): type more of it",
            matching.iter().map(|m| m.to_string()[..16].to_owned()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// A relay's key from its whole text or a unique prefix among the
/// registry's relays, live or not.
async fn resolve_relay(cx: &Client, typed: &str) -> anyhow::Result<PublicKey> {
    if let Ok(key) = typed.parse() {
        return Ok(key);
    }
    let every = SelectionPolicy { min_reputation: 0.0, ..SelectionPolicy::default() };
    let offers = cx.registry.offers_live_or_not(&every).await?;
    unique_prefix(typed, "relay key", offers.iter().map(Offer::key))
}

/// A channel id from its whole text or a unique prefix among this key's
/// channels.
async fn resolve_channel(cx: &Client, typed: &str) -> anyhow::Result<ChannelId> {
    if let Ok(id) = typed.parse() {
        return Ok(id);
    }
    let channels = cx.registry.channels().await?;
    unique_prefix(typed, "channel id", channels.iter().map(|channel| channel.id))
}

/// A progress display on standard error: bytes, rate and, for a payer,
/// the cost so far. Hidden with --json.
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(total_bytes: u64, hidden: bool) -> anyhow::Result<Progress> {
        let bar = if hidden {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total_bytes)
        };
        bar.set_style(indicatif::ProgressStyle::with_template(
            "{bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )?);
        Ok(Progress { bar })
    }
}

/// Copies `from` to `to`, hashing and counting, updating `progress` and
/// `cost`. Returns the bytes copied and their blake3 hash.
async fn copy_hashed(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    limit_bytes: u64,
    progress: &Progress,
    cost: impl Fn() -> Option<String>,
) -> anyhow::Result<(u64, blake3::Hash)> {
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
    let mut copied = 0u64;
    while copied < limit_bytes {
        let want = usize::try_from(limit_bytes - copied).unwrap_or(usize::MAX).min(buffer.len());
        let read = from.read(&mut buffer[..want]).await?;
        if read == 0 {
            break;
        }
        to.write_all(&buffer[..read]).await?;
        hasher.update(&buffer[..read]);
        copied += read as u64;
        progress.bar.set_position(copied);
        if let Some(cost) = cost() {
            progress.bar.set_message(cost);
        }
    }
    Ok((copied, hasher.finalize()))
}

fn paid_total(endpoint: &Endpoint) -> Amount {
    endpoint
        .paid()
        .values()
        .fold(Amount::ZERO, |total, paid| total.checked_add(*paid).unwrap_or(total))
}

async fn send(
    cx: &Client,
    file: &Path,
    to: PublicKey,
    policy: SelectionPolicy,
    budget: Budget,
) -> anyhow::Result<()> {
    // Checked before anything is dialled or paid for.
    let metadata =
        tokio::fs::metadata(file).await.with_context(|| format!("{}", file.display()))?;
    anyhow::ensure!(
        !metadata.is_dir(),
        "{} is a directory: ferry send sends one file (pack a directory with tar first)",
        file.display()
    );
    anyhow::ensure!(metadata.is_file(), "{} is not a regular file", file.display());
    let mut source =
        tokio::fs::File::open(file).await.with_context(|| format!("opening {}", file.display()))?;
    let size = source.metadata().await?.len();
    let name = file
        .file_name()
        .and_then(|name| name.to_str())
        .context("the file name is not UTF-8")?
        .to_owned();
    anyhow::ensure!(name.len() <= MAX_FILE_NAME_BYTES, "the file name is too long");
    let config = EndpointConfig { policy, budget: Some(budget), ..EndpointConfig::default() };
    let endpoint = Endpoint::new(cx.registry.clone(), config);
    let started = Instant::now();
    let progress = Progress::new(size, cx.json)?;
    let sending = send_over(&endpoint, to, &mut source, (&name, size), &progress).await;
    // On every path: closing pays for the bytes since the last invoice.
    endpoint.close().await;
    let (hash, verdict) = sending?;
    progress.bar.finish_and_clear();
    let elapsed = started.elapsed();
    let paid = paid_total(&endpoint);
    anyhow::ensure!(
        verdict.trim() == format!("ok {hash}"),
        "the receiver reports a mismatch: {}",
        verdict.trim()
    );
    if cx.json {
        return print_json(&json!({
            "file": name, "bytes": size, "blake3": hash.to_string(),
            "seconds": elapsed.as_secs_f64(), "paid": paid,
        }));
    }
    println!(
        "sent {name} ({}) to {to} in {:.1} s; blake3 {hash} confirmed; paid {paid}",
        human_bytes(size),
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// Dials `to` through `endpoint` and sends the file: header, then (once the
/// receiver answered that it will take it) contents and blake3. Returns the
/// hash and the receiver's verdict.
async fn send_over(
    endpoint: &Endpoint,
    to: PublicKey,
    source: &mut tokio::fs::File,
    (name, size): (&str, u64),
    progress: &Progress,
) -> anyhow::Result<(blake3::Hash, String)> {
    let mut stream = endpoint.dial(to).await.with_context(|| format!("dialling {to}"))?;
    let mut header = FILE_MAGIC.to_vec();
    header.extend_from_slice(format!("{name}\n{size}\n").as_bytes());
    stream.write_all(&header).await?;
    // The receiver refuses before the contents flow (and are paid for): a
    // name that exists there, say.
    let answer = tokio::time::timeout(HEADER_TIMEOUT, read_line(&mut stream, MAX_ANSWER_BYTES))
        .await
        .context("the receiver did not answer the header in time")?
        .context("the receiver closed the stream before taking the file")?;
    if answer != FILE_READY {
        let reason = answer.strip_prefix("refused ").unwrap_or(&answer);
        bail!("the receiver refused {name}: {reason}; none of the file was sent");
    }
    let (sent, hash) = copy_hashed(source, &mut stream, size, progress, || {
        Some(format!("paid {}", paid_total(endpoint)))
    })
    .await?;
    anyhow::ensure!(sent == size, "{name} shrank while it was being sent");
    stream.write_all(hash.as_bytes()).await?;
    stream.shutdown().await?;
    let mut verdict = String::new();
    tokio::time::timeout(VERDICT_TIMEOUT, stream.read_to_string(&mut verdict))
        .await
        .context("the receiver did not confirm in time")??;
    Ok((hash, verdict))
}

/// Reads one header line of at most `limit` bytes, without its newline.
async fn read_line(stream: &mut (impl AsyncRead + Unpin), limit: usize) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            return Ok(String::from_utf8(bytes)?);
        }
        anyhow::ensure!(bytes.len() < limit, "a header line is too long");
        bytes.push(byte);
    }
}

/// Reads the sender's header: magic, file name, size.
async fn read_header(stream: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<(String, u64)> {
    let mut magic = vec![0u8; FILE_MAGIC.len()];
    stream.read_exact(&mut magic).await?;
    anyhow::ensure!(magic == FILE_MAGIC, "the peer is not sending a file");
    let name = read_line(stream, MAX_FILE_NAME_BYTES).await?;
    let size: u64 =
        read_line(stream, 20).await?.parse().context("the announced size is not a number")?;
    // Only a plain file name: the sender cannot choose where it is written.
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.chars().any(char::is_control);
    anyhow::ensure!(plain, "the announced file name {name:?} is not a plain name");
    Ok((name, size))
}

async fn receive(
    cx: &Client,
    out: &Path,
    home_relays: usize,
    policy: SelectionPolicy,
) -> anyhow::Result<()> {
    let config = EndpointConfig { policy, home_relays, ..EndpointConfig::default() };
    let endpoint = Endpoint::new(cx.registry.clone(), config);
    let home = endpoint.listen().await?;
    let relays: Vec<String> = home.home.relays.iter().map(short).collect();
    if cx.json {
        let line = json!({ "receiving_as": endpoint.key(), "relays": home.home.relays });
        crate::announce(&line.to_string());
    } else {
        crate::announce(&format!(
            "receiving as {} on relays {}",
            endpoint.key(),
            relays.join(", ")
        ));
    }
    let mut stream = endpoint.accept().await.context("the endpoint stopped")?;
    let peer = stream.peer();
    let (name, size) = tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut stream))
        .await
        .context("the sender sent no header in time")??;
    let path = out.join(&name);
    let partial = out.join(format!(".{name}.part"));
    let created = if tokio::fs::symlink_metadata(&path).await.is_ok() {
        Err(anyhow::anyhow!("{} exists", path.display()))
    } else {
        tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .await
            .with_context(|| format!("creating {}", partial.display()))
    };
    let mut file = match created {
        Ok(file) => file,
        Err(error) => {
            // Told before the sender sends (and pays for) the contents.
            let mut answer = format!("refused {error:#}").replace('\n', " ");
            while answer.len() >= MAX_ANSWER_BYTES {
                answer.pop();
            }
            let _ = stream.write_all(format!("{answer}\n").as_bytes()).await;
            let _ = stream.shutdown().await;
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(VERDICT_TIMEOUT, stream.read_to_end(&mut rest)).await;
            endpoint.close().await;
            return Err(error.context(format!("refused {name} from {peer}")));
        }
    };
    stream.write_all(format!("{FILE_READY}\n").as_bytes()).await?;
    let started = Instant::now();
    let progress = Progress::new(size, cx.json)?;
    let copied = copy_hashed(&mut stream, &mut file, size, &progress, || None).await;
    let (received, hash) = match copied {
        Ok(copied) => copied,
        Err(error) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(error);
        }
    };
    let mut claimed = [0u8; 32];
    let trailer = stream.read_exact(&mut claimed).await;
    let intact = received == size && trailer.is_ok() && claimed == *hash.as_bytes();
    progress.bar.finish_and_clear();
    let verdict = if intact { format!("ok {hash}\n") } else { format!("bad {hash}\n") };
    stream.write_all(verdict.as_bytes()).await?;
    stream.shutdown().await?;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(VERDICT_TIMEOUT, stream.read_to_end(&mut rest)).await;
    endpoint.close().await;
    if !intact {
        let _ = tokio::fs::remove_file(&partial).await;
        bail!("{name} from {peer} arrived damaged ({received} of {size} bytes); nothing was kept");
    }
    file.sync_all().await?;
    anyhow::ensure!(
        tokio::fs::metadata(&path).await.is_err(),
        "{} exists; the file is kept as {}",
        path.display(),
        partial.display()
    );
    tokio::fs::rename(&partial, &path).await?;
    let elapsed = started.elapsed();
    if cx.json {
        return print_json(&json!({
            "file": path, "bytes": size, "blake3": hash.to_string(), "from": peer,
            "seconds": elapsed.as_secs_f64(),
        }));
    }
    println!(
        "received {} ({}) from {peer} in {:.1} s; blake3 {hash} matches",
        path.display(),
        human_bytes(size),
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// Copies both ways between a TCP connection and a peer stream until both
/// directions end.
async fn splice(mut local: tokio::net::TcpStream, mut remote: ferry_client::stream::Stream) {
    if let Err(error) = tokio::io::copy_bidirectional(&mut local, &mut remote).await {
        tracing::info!(%error, "a forwarded connection ended");
    }
}

async fn tunnel_out(
    cx: &Client,
    to: PublicKey,
    local: std::net::SocketAddr,
    policy: SelectionPolicy,
    budget: Budget,
) -> anyhow::Result<()> {
    let config = EndpointConfig { policy, budget: Some(budget), ..EndpointConfig::default() };
    let endpoint = std::sync::Arc::new(Endpoint::new(cx.registry.clone(), config));
    let listener = tokio::net::TcpListener::bind(local)
        .await
        .with_context(|| format!("listening on {local}"))?;
    crate::announce(&format!("forwarding {} to {to}", listener.local_addr()?));
    let accepting = async {
        loop {
            let (connection, from) = listener.accept().await?;
            let endpoint = std::sync::Arc::clone(&endpoint);
            tokio::spawn(async move {
                match endpoint.dial(to).await {
                    Ok(stream) => splice(connection, stream).await,
                    Err(error) => tracing::warn!(%from, %error, "cannot reach the peer"),
                }
            });
        }
    };
    let result = tokio::select! {
        result = accepting => result,
        () = crate::shutdown_signal() => Ok(()),
    };
    // Either way: closing pays for the bytes since the last invoice.
    endpoint.close().await;
    result
}

async fn tunnel_in(
    cx: &Client,
    serve: &str,
    allow: Vec<PublicKey>,
    policy: SelectionPolicy,
) -> anyhow::Result<()> {
    let listen = if allow.is_empty() {
        ferry_proto::wire::ListenPolicy::Open
    } else {
        ferry_proto::wire::ListenPolicy::Allow(allow)
    };
    let config = EndpointConfig { policy, listen, ..EndpointConfig::default() };
    let endpoint = Endpoint::new(cx.registry.clone(), config);
    let home = endpoint.listen().await?;
    let relays: Vec<String> = home.home.relays.iter().map(short).collect();
    crate::announce(&format!(
        "serving {serve} to peers of {} on relays {}",
        endpoint.key(),
        relays.join(", ")
    ));
    let serving = async {
        while let Some(stream) = endpoint.accept().await {
            let target = serve.to_owned();
            tokio::spawn(async move {
                match tokio::net::TcpStream::connect(&target).await {
                    Ok(connection) => splice(connection, stream).await,
                    Err(error) => {
                        tracing::warn!(%target, %error, "cannot connect the peer's stream")
                    }
                }
            });
        }
    };
    tokio::select! {
        () = serving => {}
        () = crate::shutdown_signal() => {}
    }
    endpoint.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn a_unique_prefix_names_its_key_and_others_are_refused() {
        let keys: Vec<PublicKey> =
            (1..=40u8).map(|seed| SecretKey::from_seed(&[seed; 32]).public()).collect();
        let first = keys[0].to_string();
        assert_eq!(
            unique_prefix(&first[..12], "relay key", keys.iter().copied()).unwrap(),
            keys[0]
        );
        assert_eq!(unique_prefix(&first, "relay key", keys.iter().copied()).unwrap(), keys[0]);
        for (typed, error) in
            [("abc", "not a relay key"), ("ABCD", "not a relay key"), ("zzzz", "not a relay key")]
        {
            let refused = unique_prefix(typed, "relay key", keys.iter().copied()).unwrap_err();
            assert!(refused.to_string().contains(error), "{typed}: {refused}");
        }
        let absent = (0..=0xffffu32)
            .map(|n| format!("{n:04x}"))
            .find(|p| keys.iter().all(|key| !key.to_string().starts_with(p.as_str())))
            .unwrap();
        assert!(
            unique_prefix(&absent, "relay key", keys.iter().copied())
                .unwrap_err()
                .to_string()
                .contains("no relay key starts with")
        );
        let twins = [keys[0], keys[0]];
        assert!(
            unique_prefix(&first[..8], "relay key", twins)
                .unwrap_err()
                .to_string()
                .contains("type more of it")
        );
    }

    #[tokio::test]
    async fn a_header_names_a_plain_file_or_is_refused() {
        let header = |name: &str| {
            let mut bytes = FILE_MAGIC.to_vec();
            bytes.extend_from_slice(format!("{name}\n42\n").as_bytes());
            bytes
        };
        let (name, size) = read_header(&mut header("report.pdf").as_slice()).await.unwrap();
        assert_eq!((name.as_str(), size), ("report.pdf", 42));
        for bad in ["../etc/passwd", "a/b", "..", "", "tab\there"] {
            assert!(read_header(&mut header(bad).as_slice()).await.is_err(), "{bad:?}");
        }
        assert!(read_header(&mut b"HTTP/1.1 200 OK\r\n".as_slice()).await.is_err());
        let long = "x".repeat(MAX_FILE_NAME_BYTES + 1);
        assert!(read_header(&mut header(&long).as_slice()).await.is_err());
    }
}
