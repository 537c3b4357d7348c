//! The registry and ledger web API of ferry.
//!
//! `ferry registry` serves this router over the ledger's Postgres. The API is
//! stateless: everything it knows is in the database, so any number of
//! instances may serve one database and behave as one.
//!
//! Requests that change state or read private data are signed by the key
//! they act for (`docs/PROTOCOL.md`, "Signed API requests"); [`auth`] checks
//! the signature, the timestamp and the nonce before a handler runs.

/// SQL that is true for a live relay: one whose last heartbeat is at most 90
/// seconds old (three missed heartbeats at the relay's 30-second interval).
macro_rules! is_live {
    () => {
        "coalesce(last_heartbeat > now() - make_interval(secs => 90), false)"
    };
}

mod accounts;
pub mod auth;
mod channels;
mod error;
mod extract;
mod health;
mod home;
mod limit;
mod market;
mod metrics;
mod openapi;
mod probe;
mod relays;
mod reputation;
mod totals;
mod web;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::{Router, middleware};
use ferry_ledger::Ledger;
use ferry_proto::PublicKey;
pub use ferry_proto::http::{ConnectionLimits, Transport};
use tokio::net::TcpListener;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

pub use error::ApiError;

/// How far a signed request's timestamp may be from the registry's clock.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// How often remembered nonces older than the skew window are forgotten.
const NONCE_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

pub use limit::{MAX_TRACKED_CLIENTS, Rate};
pub use market::SNAPSHOT_MAX_AGE;
pub use probe::{PROBE_CONCURRENCY, PROBE_TIMEOUT};

/// The registry's bounds on what one request, address or key may cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The largest request body read, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// The longest a request may take, body included; longer ones get 503.
    pub request_timeout: Duration,
    /// Requests per client IP address; more get 429.
    pub per_ip: Rate,
    /// Signed requests per key; more get 429.
    pub per_key: Rate,
    /// Requests per client IP address to `/healthz`, `/readyz` and
    /// `/metrics`, a budget apart from `per_ip`; more get 429.
    pub per_ip_operations: Rate,
    /// Connections in total and per IP address, and the wait for a
    /// request's headers (which also closes idle kept-alive connections).
    pub connections: ConnectionLimits,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            // A full settlement batch of 10,000 vouchers in JSON is about 3 MiB.
            max_body_bytes: 4 << 20,
            request_timeout: Duration::from_secs(10),
            per_ip: Rate { per_sec: 500, burst: 1000 },
            per_key: Rate { per_sec: 100, burst: 200 },
            per_ip_operations: Rate { per_sec: 20, burst: 40 },
            connections: ConnectionLimits::default(),
        }
    }
}

/// The registry operator's settings.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The key that signs deposits: in a deployment, the payment gateway's.
    pub operator: PublicKey,
    /// Bounds on requests.
    pub limits: Limits,
    /// How often the registry probes every relay (none: never).
    pub probe_interval: Option<Duration>,
    /// TLS, and the proxies trusted to name the client (docs/OPERATING.md).
    pub transport: Transport,
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    ledger: Ledger,
    config: Arc<RegistryConfig>,
    limits: Arc<Limiters>,
    metrics: metrics::Metrics,
    market: Arc<market::Market>,
}

#[derive(Debug)]
struct Limiters {
    per_ip: limit::RateLimiter<IpAddr>,
    per_key: limit::RateLimiter<PublicKey>,
    per_ip_operations: limit::RateLimiter<IpAddr>,
}

impl AppState {
    /// The state of a registry serving `ledger`.
    pub fn new(ledger: Ledger, config: RegistryConfig) -> AppState {
        let limits = Limiters {
            per_ip: limit::RateLimiter::new(config.limits.per_ip),
            per_key: limit::RateLimiter::new(config.limits.per_key),
            per_ip_operations: limit::RateLimiter::new(config.limits.per_ip_operations),
        };
        AppState {
            ledger,
            config: Arc::new(config),
            limits: Arc::new(limits),
            metrics: metrics::Metrics::new(),
            market: Arc::default(),
        }
    }
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    let (routes, api) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::render))
        .routes(routes!(accounts::balance))
        .routes(routes!(accounts::statement))
        .routes(routes!(accounts::channels))
        .routes(routes!(accounts::deposit))
        .routes(routes!(accounts::withdraw))
        .routes(routes!(channels::open))
        .routes(routes!(channels::read))
        .routes(routes!(channels::top_up))
        .routes(routes!(channels::request_close))
        .routes(routes!(channels::finalize))
        .routes(routes!(channels::relay_close))
        .routes(routes!(channels::settle))
        .routes(routes!(home::publish, home::read))
        .routes(routes!(relays::list))
        .routes(routes!(relays::detail))
        .routes(routes!(relays::publish))
        .routes(routes!(relays::heartbeat))
        .routes(routes!(totals::totals))
        .split_for_parts();
    routes
        .merge(SwaggerUi::new("/docs").url("/openapi.json", api))
        .merge(web::routes())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), limit::limit_requests))
        .layer(middleware::from_fn_with_state(state.clone(), metrics::track))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes, then finishes the
/// requests in flight. Also forgets expired request nonces in the background.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let pruner = tokio::spawn(prune_nonces(state.clone()));
    let prober =
        state.config.probe_interval.map(|every| tokio::spawn(probe::run(state.clone(), every)));
    let limits = state.config.limits.connections;
    let transport = state.config.transport.clone();
    let observer = Arc::new(state.metrics.clone());
    let served =
        ferry_proto::http::serve(listener, router(state), limits, transport, observer, shutdown)
            .await;
    pruner.abort();
    if let Some(prober) = prober {
        prober.abort();
    }
    served
}

async fn prune_nonces(state: AppState) {
    let mut interval = tokio::time::interval(NONCE_PRUNE_INTERVAL);
    loop {
        interval.tick().await;
        if let Err(error) = auth::forget_expired_nonces(&state).await {
            tracing::warn!(%error, "forgetting expired request nonces failed");
        }
    }
}
