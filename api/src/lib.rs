//! The registry and ledger web API of ferry.
//!
//! `ferry registry` serves this router over the ledger's Postgres. The API is
//! stateless: everything it knows is in the database, so any number of
//! instances may serve one database and behave as one.
//!
//! Requests that change state or read private data are signed by the key
//! they act for (`docs/PROTOCOL.md`, "Signed API requests"); [`auth`] checks
//! the signature, the timestamp and the nonce before a handler runs.

mod accounts;
pub mod auth;
mod channels;
mod error;
mod health;
mod home;
mod relays;
mod reputation;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post, put};
use ferry_ledger::Ledger;
use ferry_proto::PublicKey;
use tokio::net::TcpListener;

pub use error::ApiError;

/// The largest request body the API reads, in bytes (a full settlement batch
/// of 10,000 vouchers in JSON is about 3 MiB).
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// How far a signed request's timestamp may be from the registry's clock.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// How often remembered nonces older than the skew window are forgotten.
const NONCE_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// The registry operator's settings.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The key that signs deposits: in a deployment, the payment gateway's.
    pub operator: PublicKey,
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    ledger: Ledger,
    config: Arc<RegistryConfig>,
}

impl AppState {
    /// The state of a registry serving `ledger`.
    pub fn new(ledger: Ledger, config: RegistryConfig) -> AppState {
        AppState { ledger, config: Arc::new(config) }
    }
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/v1/accounts/{key}", get(accounts::balance))
        .route("/v1/accounts/{key}/statement", get(accounts::statement))
        .route("/v1/accounts/{key}/deposits", post(accounts::deposit))
        .route("/v1/accounts/{key}/withdrawals", post(accounts::withdraw))
        .route("/v1/channels", post(channels::open))
        .route("/v1/channels/{id}", get(channels::read))
        .route("/v1/channels/{id}/top-ups", post(channels::top_up))
        .route("/v1/channels/{id}/close-request", post(channels::request_close))
        .route("/v1/channels/{id}/finalize", post(channels::finalize))
        .route("/v1/channels/{id}/relay-close", post(channels::relay_close))
        .route("/v1/settlements", post(channels::settle))
        .route("/v1/clients/{key}/home-relays", put(home::publish).get(home::read))
        .route("/v1/relays", get(relays::list))
        .route("/v1/relays/{key}", get(relays::detail))
        .route("/v1/relays/{key}/advert", put(relays::publish))
        .route("/v1/relays/{key}/heartbeats", post(relays::heartbeat))
        .fallback(error::not_found)
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
    let served = axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await;
    pruner.abort();
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
