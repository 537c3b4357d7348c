//! `ferry relay`: runs a relay. Settings come from flags, then the
//! environment, then a TOML file (`--config`), then defaults; the key file is
//! created on first start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferry_proto::{PricePerByte, SecretKey};
use ferry_relay::{DataDir, PricingPolicy, Relay, RelayConfig};
use serde::Deserialize;

pub mod status;

/// How long the final settlement at shutdown may retry.
const SHUTDOWN_SETTLE_DEADLINE: Duration = Duration::from_secs(30);

/// `ferry relay`: run a relay, or with `status` show the market's view of
/// one.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RelayCommand {
    #[command(subcommand)]
    pub action: Option<RelayAction>,
    #[command(flatten)]
    pub run: RelayArgs,
}

/// What `ferry relay` does besides running one.
#[derive(Debug, clap::Subcommand)]
pub enum RelayAction {
    /// The relay's earnings, reputation and every component, and whether
    /// default clients will choose it, and why not.
    Status(status::StatusArgs),
}

/// Options of `ferry relay`; each may also come from the config file.
#[derive(Debug, Args, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayArgs {
    /// A TOML file with any of these settings (flag names with `_`).
    #[arg(long, env = "FERRY_RELAY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The address to listen on [default: 0.0.0.0:7000].
    #[arg(long, env = "FERRY_RELAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The address clients are told to connect to [default: the listen address].
    #[arg(long, env = "FERRY_RELAY_PUBLIC_ADDRESS")]
    pub public_address: Option<String>,
    /// The registry's URL: https://, or http:// on this machine.
    #[arg(long, env = "FERRY_REGISTRY")]
    pub registry: Option<String>,
    /// Trust only the CA certificates in this PEM file for the registry's
    /// TLS (a private registry's own CA) instead of the system's roots.
    #[arg(long, env = "FERRY_REGISTRY_CA")]
    pub registry_ca: Option<PathBuf>,
    /// The relay's key file, created on first start [default: ferry-relay.key].
    #[arg(long, env = "FERRY_RELAY_KEY")]
    pub key: Option<PathBuf>,
    /// Where accepted vouchers are kept until settled [default: ferry-relay-data].
    #[arg(long, env = "FERRY_RELAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The advertised region [default: local].
    #[arg(long, env = "FERRY_RELAY_REGION")]
    pub region: Option<String>,
    /// The price of a byte [default: 0.000000001, about 1.07 per GiB].
    #[arg(long, env = "FERRY_RELAY_PRICE_PER_BYTE")]
    pub price_per_byte: Option<PricePerByte>,
    /// With --max-price-per-byte: price by load between the two.
    #[arg(long, env = "FERRY_RELAY_MIN_PRICE_PER_BYTE")]
    pub min_price_per_byte: Option<PricePerByte>,
    /// With --min-price-per-byte: the price at full capacity.
    #[arg(long, env = "FERRY_RELAY_MAX_PRICE_PER_BYTE")]
    pub max_price_per_byte: Option<PricePerByte>,
    /// Bytes carried ahead of payment per client [default: 1048576].
    #[arg(long, env = "FERRY_RELAY_CREDIT_WINDOW_BYTES")]
    pub credit_window_bytes: Option<u64>,
    /// Advertised capacity in bytes per second [default: 104857600].
    #[arg(long, env = "FERRY_RELAY_CAPACITY_BYTES_PER_SEC")]
    pub capacity_bytes_per_sec: Option<u64>,
    /// Seconds between settlement rounds [default: 30].
    #[arg(long, env = "FERRY_RELAY_SETTLE_INTERVAL_SECS")]
    pub settle_interval_secs: Option<u64>,
    /// Seconds between heartbeats [default: 30].
    #[arg(long, env = "FERRY_RELAY_HEARTBEAT_INTERVAL_SECS")]
    pub heartbeat_interval_secs: Option<u64>,
    /// Connections one IP address may hold at once [default: 256].
    #[arg(long, env = "FERRY_RELAY_CONNECTIONS_PER_IP")]
    pub connections_per_ip: Option<usize>,
    /// Control sessions the relay holds at once [default: 100000].
    #[arg(long, env = "FERRY_RELAY_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    /// Seconds between lookups of a paying session's channel: the relay
    /// learns of a top-up or a close request within this time; keep it well
    /// under the registry's dispute window [default: 5].
    #[arg(long, env = "FERRY_RELAY_CHANNEL_CHECK_INTERVAL_SECS")]
    pub channel_check_interval_secs: Option<u64>,
    /// Serve /metrics and /healthz on this address (off when absent).
    #[arg(long, env = "FERRY_RELAY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl RelayArgs {
    /// These settings, with the file's filling the ones not given.
    fn merged(self) -> anyhow::Result<RelayArgs> {
        let Some(path) = &self.config else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        let file: RelayArgs = toml::from_str(&text)
            .with_context(|| format!("parsing the config file {}", path.display()))?;
        Ok(RelayArgs {
            config: self.config,
            listen: self.listen.or(file.listen),
            public_address: self.public_address.or(file.public_address),
            registry: self.registry.or(file.registry),
            registry_ca: self.registry_ca.or(file.registry_ca),
            key: self.key.or(file.key),
            data_dir: self.data_dir.or(file.data_dir),
            region: self.region.or(file.region),
            price_per_byte: self.price_per_byte.or(file.price_per_byte),
            min_price_per_byte: self.min_price_per_byte.or(file.min_price_per_byte),
            max_price_per_byte: self.max_price_per_byte.or(file.max_price_per_byte),
            credit_window_bytes: self.credit_window_bytes.or(file.credit_window_bytes),
            capacity_bytes_per_sec: self.capacity_bytes_per_sec.or(file.capacity_bytes_per_sec),
            settle_interval_secs: self.settle_interval_secs.or(file.settle_interval_secs),
            heartbeat_interval_secs: self.heartbeat_interval_secs.or(file.heartbeat_interval_secs),
            connections_per_ip: self.connections_per_ip.or(file.connections_per_ip),
            max_sessions: self.max_sessions.or(file.max_sessions),
            channel_check_interval_secs: self
                .channel_check_interval_secs
                .or(file.channel_check_interval_secs),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
        })
    }
}

/// The default price: 10^-9 per byte, about 1.07 per GiB.
const DEFAULT_PRICE_ATTOS_PER_BYTE: u128 = 1_000_000_000;
/// Prices more than this many times the default, or below the default
/// divided by it (but not free), are probably a slip of the decimal point.
const PRICE_BAND_FACTOR: u128 = 1_000;

/// A warning for a price outside the sane band, naming it per GiB.
fn price_warning(price: PricePerByte) -> Option<String> {
    let attos = price.attos();
    let (low, high) = (
        DEFAULT_PRICE_ATTOS_PER_BYTE / PRICE_BAND_FACTOR,
        DEFAULT_PRICE_ATTOS_PER_BYTE * PRICE_BAND_FACTOR,
    );
    let outside = attos > high || (attos > 0 && attos < low);
    outside.then(|| {
        format!(
            "the price is {} per GiB, outside {}x either side of the default ({} per GiB); clients choose relays by price, so check the figure",
            price.per_gib(),
            PRICE_BAND_FACTOR,
            PricePerByte::from_attos(DEFAULT_PRICE_ATTOS_PER_BYTE).map_or_else(|_| "?".into(), |p| p.per_gib().to_string()),
        )
    })
}

/// Runs a relay until SIGINT or SIGTERM, then settles and exits.
pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
    let args = args.merged()?;
    let registry = args
        .registry
        .context("--registry (or FERRY_REGISTRY, or registry in --config) is required")?;
    // Settings are checked before a key or data directory is written.
    crate::registry::parse_url(&registry)?;
    let region = args.region.clone().unwrap_or_else(|| "local".to_owned());
    ferry_proto::check_region(&region).with_context(|| format!("--region {region:?}"))?;
    let price = match args.price_per_byte {
        Some(price) => price,
        None => PricePerByte::from_attos(DEFAULT_PRICE_ATTOS_PER_BYTE)?,
    };
    if let Some(warning) = price_warning(price) {
        eprintln!("warning: {warning}");
    }
    let key_path = args.key.unwrap_or_else(|| PathBuf::from("ferry-relay.key"));
    let (key, created) = SecretKey::read_or_create_file(&key_path)
        .with_context(|| format!("relay key file {}", key_path.display()))?;
    if created {
        // Said on every log level: a new key is a new identity.
        eprintln!(
            "created a new relay key {} in {}: this relay's identity, which its earnings and reputation belong to; keep the file",
            key.public(),
            key_path.display()
        );
    }
    let listen = args.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7000)));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let bound = listener.local_addr()?;
    let mut config =
        RelayConfig::new(&args.public_address.unwrap_or_else(|| bound.to_string()), &region, price);
    config.pricing = match (args.min_price_per_byte, args.max_price_per_byte) {
        (Some(min), Some(max)) => {
            anyhow::ensure!(min <= max, "--min-price-per-byte is above --max-price-per-byte");
            Some(PricingPolicy { min, max })
        }
        (None, None) => None,
        _ => anyhow::bail!("give both --min-price-per-byte and --max-price-per-byte, or neither"),
    };
    if let Some(window) = args.credit_window_bytes {
        config.credit_window_bytes = window;
    }
    if let Some(capacity) = args.capacity_bytes_per_sec {
        config.capacity_bytes_per_sec = capacity;
    }
    if let Some(seconds) = args.settle_interval_secs {
        config.settle_interval = Duration::from_secs(seconds.max(1));
    }
    if let Some(seconds) = args.heartbeat_interval_secs {
        config.heartbeat_interval = Duration::from_secs(seconds.max(1));
    }
    if let Some(count) = args.connections_per_ip {
        config.limits.connections_per_ip = count;
    }
    if let Some(count) = args.max_sessions {
        config.limits.max_sessions = count;
    }
    if let Some(seconds) = args.channel_check_interval_secs {
        config.limits.channel_check_interval = Duration::from_secs(seconds.max(1));
    }
    let data_dir = args.data_dir.unwrap_or_else(|| PathBuf::from("ferry-relay-data"));
    let data = DataDir::open(&data_dir)?;
    let registry_client =
        crate::registry::client(&registry, args.registry_ca.as_deref(), key.clone())?;
    let relay = Relay::new(config, key.clone(), registry_client, data);
    relay
        .register()
        .await
        .with_context(|| format!("registering with the registry at {registry}"))?;
    if let Some(address) = args.metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("listening for metrics on {address}"))?;
        tokio::spawn(ferry_relay::metrics::serve(
            metrics_listener,
            relay.metrics(),
            std::future::pending(),
        ));
    }
    let shutdown = crate::shutdown_signal();
    crate::announce(&format!(
        "relay {} listening on {bound} (price {} per GiB, registry {registry})",
        relay.public_key(),
        relay.price().per_gib()
    ));
    relay.serve(listener, shutdown).await?;
    let report = relay.shutdown(SHUTDOWN_SETTLE_DEADLINE).await;
    crate::announce(&format!(
        "settled {} vouchers ({} already, {} refused){}",
        report.settled,
        report.already_settled,
        report.rejected,
        if report.incomplete { "; some remain for the next start" } else { "" }
    ));
    Ok(())
}
