//! `ferry registry`, and how the other commands reach a registry: over
//! `http://` or `https://`, trusting the system's roots or a pinned CA.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use ferry_client::RegistryClient;
use ferry_ledger::{Ledger, LedgerConfig};
use ferry_proto::SecretKey;
use ferry_proto::http::{ForwardedHeader, TrustedProxies};

use crate::db;

/// A client of the registry at `url` acting for `key`; over TLS it trusts
/// only the certificates in `ca_file` when one is given, the system's roots
/// otherwise.
pub(crate) fn client(
    url: &str,
    ca_file: Option<&Path>,
    key: SecretKey,
) -> anyhow::Result<RegistryClient> {
    Ok(RegistryClient::new(url, key, http(url, ca_file)?))
}

/// Checks a registry URL before anything else happens: `https://` or
/// `http://`, with a host.
pub(crate) fn parse_url(url: &str) -> anyhow::Result<reqwest::Url> {
    let parsed = reqwest::Url::parse(url)
        .with_context(|| format!("the registry URL {url:?} is not a URL (https://host:port)"))?;
    anyhow::ensure!(
        matches!(parsed.scheme(), "https" | "http"),
        "the registry URL {url:?} must start with https:// (or http:// on this machine)"
    );
    anyhow::ensure!(parsed.host_str().is_some(), "the registry URL {url:?} names no host");
    Ok(parsed)
}

/// The HTTP client for the registry at `url` (see [`client`]). A URL that
/// is neither `http://` nor `https://` is refused, and plain HTTP to a host
/// other than this machine draws a warning: on the way, anyone could forge
/// the registry's answers (docs/PROTOCOL.md, "What TLS guarantees").
fn http(url: &str, ca_file: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let parsed = parse_url(url)?;
    let host = parsed.host_str().unwrap_or_default();
    match parsed.scheme() {
        "https" => {}
        _ => {
            let on_this_machine = host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !on_this_machine {
                eprintln!(
                    "warning: the registry at {url} is reached over plain HTTP: anyone on the path can forge its answers; use https://"
                );
            }
        }
    }
    let pinned = match ca_file {
        Some(path) => Some(
            ferry_proto::tls::read_certificates(path)
                .with_context(|| format!("--registry-ca {}", path.display()))?,
        ),
        None => None,
    };
    Ok(RegistryClient::http_trusting(pinned)?)
}

/// Options of `ferry registry`.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// The address to listen on (port 0 picks a free port; the address is
    /// printed on the first line of standard output).
    #[arg(long, env = "FERRY_LISTEN", default_value = "127.0.0.1:7070")]
    listen: std::net::SocketAddr,
    #[command(flatten)]
    database: crate::DatabaseArgs,
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
    #[command(flatten)]
    transport: TransportArgs,
}

/// How clients reach the registry: TLS and trusted proxies
/// (docs/OPERATING.md, "TLS and proxies").
#[derive(Debug, Args)]
struct TransportArgs {
    /// Serve TLS with the certificate chain in this PEM file (leaf first);
    /// needs --tls-key. Without it the registry serves plain HTTP, for
    /// loopback or behind a TLS proxy.
    #[arg(long, env = "FERRY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert, in a PEM file.
    #[arg(long, env = "FERRY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A proxy address or network (10.0.0.0/8) whose forwarding header
    /// names the client for the per-IP limits; repeat, or separate with
    /// commas. Connections from it are exempt from the per-IP connection
    /// bound.
    #[arg(long = "trusted-proxy", env = "FERRY_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<String>,
    /// The header the trusted proxies write: x-forwarded-for or forwarded.
    #[arg(long, env = "FERRY_FORWARDED_HEADER", default_value = "x-forwarded-for")]
    forwarded_header: ForwardedHeader,
}

impl TransportArgs {
    fn transport(&self) -> anyhow::Result<ferry_api::Transport> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(certificate), Some(key)) => Some(
                ferry_proto::tls::server_config(certificate, key)
                    .context("loading --tls-cert and --tls-key")?,
            ),
            _ => None,
        };
        let trusted_proxies = TrustedProxies::new(&self.trusted_proxies, self.forwarded_header)
            .context("--trusted-proxy")?;
        Ok(ferry_api::Transport { tls, trusted_proxies })
    }
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

/// Serves the registry until SIGINT or SIGTERM, then finishes the requests in
/// flight and stops the embedded database, if any.
pub async fn run(args: RegistryArgs) -> anyhow::Result<()> {
    // Bad TLS files or proxy lists are refused before anything starts.
    let transport = args.transport.transport()?;
    let (operator, created) = SecretKey::read_or_create_file(&args.operator_key)
        .with_context(|| format!("operator key file {}", args.operator_key.display()))?;
    if created {
        // Said on every log level: a new key is a new identity.
        eprintln!(
            "created a new operator key {} in {}: the only key that may credit deposits; keep the file",
            operator.public(),
            args.operator_key.display()
        );
    }
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
    let shutdown = crate::shutdown_signal();
    crate::announce(&format!(
        "listening on {}://{} (operator key {})",
        if transport.tls.is_some() { "https" } else { "http" },
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
            transport,
        },
    );
    let served = ferry_api::serve(listener, state, shutdown).await;
    ledger.close().await;
    db.close().await?;
    served.context("serving the registry")
}
