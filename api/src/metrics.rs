//! Prometheus metrics: the registry's own traffic, counted as it happens, and
//! the market's size, read from the database when scraped.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::{ApiError, AppState};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// The route template, such as `/v1/relays/{key}`, so keys do not
    /// explode the label space; `unmatched` for unknown paths.
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

fn duration_histogram() -> Histogram {
    // 0.25 ms to about 8 s, doubling.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// The registry's metrics.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram, fn() -> Histogram>,
    rate_limited: Family<ScopeLabels, Counter>,
    vouchers: Family<OutcomeLabels, Counter>,
    relays: Family<StateLabels, Gauge>,
    channels: Family<StateLabels, Gauge>,
    escrow_units: Gauge<f64, AtomicU64>,
    connections: Gauge,
    connections_refused: Family<ScopeLabels, Counter>,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ferry");
        let requests = Family::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        let durations = Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer a request, by route",
            durations.clone(),
        );
        let rate_limited = Family::default();
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit, by scope (ip, ip_operations or key)",
            rate_limited.clone(),
        );
        let vouchers = Family::default();
        registry.register(
            "settlement_vouchers",
            "Vouchers submitted for settlement, by outcome",
            vouchers.clone(),
        );
        let relays = Family::default();
        registry.register("relays", "Registered relays, by liveness (at scrape)", relays.clone());
        let channels = Family::default();
        registry.register("channels", "Payment channels, by state (at scrape)", channels.clone());
        let escrow_units = Gauge::default();
        registry.register(
            "escrow_units",
            "Money held in channel escrow, in units (at scrape; approximate for display)",
            escrow_units.clone(),
        );
        let connections = Gauge::default();
        registry.register("connections", "HTTP connections open", connections.clone());
        let connections_refused = Family::default();
        registry.register(
            "connections_refused",
            "Connections refused by a bound, by scope (total or per_ip)",
            connections_refused.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            requests,
            durations,
            rate_limited,
            vouchers,
            relays,
            channels,
            escrow_units,
            connections,
            connections_refused,
        }
    }

    pub(crate) fn rate_limited(&self, scope: &'static str) {
        self.rate_limited.get_or_create(&ScopeLabels { scope }).inc();
    }

    pub(crate) fn voucher(&self, outcome: &'static str) {
        self.vouchers.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

/// The method as a label: the standard ones by name, any other as `other`,
/// so that made-up methods cannot create series without bound.
fn method_label(method: &Method) -> &'static str {
    let standard = [
        (Method::GET, "GET"),
        (Method::HEAD, "HEAD"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    standard.into_iter().find(|(known, _)| known == method).map_or("other", |(_, name)| name)
}

/// Middleware: counts and times every request by its route template.
pub(crate) async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = &state.metrics;
    metrics
        .durations
        .get_or_create(&RouteLabels { route: route.clone() })
        .observe(started.elapsed().as_secs_f64());
    let status = response.status().as_u16();
    metrics.requests.get_or_create(&RequestLabels { route, method, status }).inc();
    response
}

/// `GET /metrics`: Prometheus text.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"),
        (status = 503, description = "unavailable", body = crate::error::ErrorBody),
    ),
)]
pub(crate) async fn render(State(state): State<AppState>) -> Result<Response, ApiError> {
    let pool = state.ledger.pool();
    let (registered, live): (i64, i64) = sqlx::query_as(concat!(
        "SELECT count(*), count(*) FILTER (WHERE ",
        is_live!(),
        ") FROM relays"
    ))
    .fetch_one(pool)
    .await?;
    let metrics = &state.metrics;
    metrics.relays.get_or_create(&StateLabels { state: "registered" }).set(registered);
    metrics.relays.get_or_create(&StateLabels { state: "live" }).set(live);
    let channels: Vec<(String, i64, f64)> = sqlx::query_as(
        "SELECT state::text, count(*), coalesce(sum(deposited - settled - refunded), 0)::float8 \
         FROM channels GROUP BY state",
    )
    .fetch_all(pool)
    .await?;
    let mut escrow = 0.0;
    for state_name in ["open", "closing", "closed"] {
        let found = channels.iter().find(|(name, _, _)| name == state_name);
        let count = found.map_or(0, |(_, count, _)| *count);
        metrics.channels.get_or_create(&StateLabels { state: state_name }).set(count);
        escrow += found.map_or(0.0, |(_, _, held)| *held);
    }
    metrics.escrow_units.set(escrow);
    let mut text = String::new();
    prometheus_text::encode(&mut text, &metrics.registry)
        .map_err(|_| ApiError::internal("encoding metrics"))?;
    Ok(([(CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], text).into_response())
}

/// The registry's connections: open, and refused by which bound.
impl ferry_proto::http::ConnectionObserver for Metrics {
    fn opened(&self, open: usize) {
        self.connections.set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    fn closed(&self, open: usize) {
        self.connections.set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    fn refused(&self, why: ferry_proto::http::Refusal) {
        self.connections_refused.get_or_create(&ScopeLabels { scope: why.as_str() }).inc();
    }
}
