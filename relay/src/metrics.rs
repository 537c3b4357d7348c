//! The relay's Prometheus metrics, and the small HTTP server that exposes
//! them with a health check.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use ferry_proto::Amount;
use ferry_proto::http::ConnectionLimits;
use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevenueLabels {
    state: &'static str,
}

/// The relay's counters and gauges.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Control sessions open.
    pub sessions: Gauge<i64, AtomicI64>,
    /// Tunnels open.
    pub tunnels: Gauge<i64, AtomicI64>,
    bytes: Family<DirectionLabels, Counter>,
    vouchers: Family<VerdictLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    /// Times a tunnel waited for payment because the credit window was used.
    pub throttled: Counter,
    /// Connections that hung up once the relay proved its key: probes.
    pub probed: Counter,
    revenue: Family<RevenueLabels, Gauge<f64, AtomicU64>>,
    payment_round_trip: Histogram,
    /// The histogram's sum and count, which prometheus-client does not
    /// expose: for the benchmark's mean.
    payment_round_trip_totals: Arc<(AtomicU64, AtomicU64)>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("ferry_relay");
        let sessions = Gauge::default();
        registry.register("sessions", "Control sessions open", sessions.clone());
        let tunnels = Gauge::default();
        registry.register("tunnels", "Tunnels open", tunnels.clone());
        let bytes = Family::default();
        registry.register(
            "bytes",
            "Bytes carried, by direction (caller_to_callee, callee_to_caller)",
            bytes.clone(),
        );
        let vouchers = Family::default();
        registry.register("vouchers", "Vouchers received, by verdict", vouchers.clone());
        let refused = Family::default();
        registry.register(
            "refused",
            "Connections, sessions and dials refused, by reason",
            refused.clone(),
        );
        let throttled = Counter::default();
        registry.register(
            "throttled",
            "Times a tunnel stopped reading because its client's credit window was used",
            throttled.clone(),
        );
        let probed = Counter::default();
        registry.register(
            "probed",
            "Connections that hung up once the relay proved its key (the registry's probes, clients measuring the round trip)",
            probed.clone(),
        );
        let revenue = Family::default();
        registry.register(
            "revenue_units",
            "Money in vouchers, in units: received (the newest stored voucher of each channel, cumulative), settled (what the ledger paid on each channel, as of this relay's settlements since it started), pending (received less settled)",
            revenue.clone(),
        );
        // 100 µs to about 1.6 s: a voucher log sync alone is 0.1–0.3 ms on
        // the disks we measured, and a slow client may take seconds.
        let payment_round_trip = Histogram::new(exponential_buckets(1e-4, 2.0, 15));
        registry.register(
            "payment_round_trip_seconds",
            "Seconds from an invoice to the voucher that pays it being on disk and counted",
            payment_round_trip.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            sessions,
            tunnels,
            bytes,
            vouchers,
            refused,
            throttled,
            probed,
            revenue,
            payment_round_trip,
            payment_round_trip_totals: Arc::default(),
        }
    }
}

impl Metrics {
    /// Counts `bytes` carried in `direction`.
    pub fn carried(&self, direction: &'static str, bytes: u64) {
        self.bytes.get_or_create(&DirectionLabels { direction }).inc_by(bytes);
    }

    /// Bytes carried so far, both directions.
    pub fn carried_total(&self) -> u64 {
        ["caller_to_callee", "callee_to_caller"]
            .into_iter()
            .map(|direction| self.bytes.get_or_create(&DirectionLabels { direction }).get())
            .sum()
    }

    /// Counts a voucher's verdict.
    pub fn voucher(&self, verdict: &'static str) {
        self.vouchers.get_or_create(&VerdictLabels { verdict }).inc();
    }

    /// How many vouchers got `verdict`.
    pub fn vouchers_with(&self, verdict: &'static str) -> u64 {
        self.vouchers.get_or_create(&VerdictLabels { verdict }).get()
    }

    /// Records one payment round trip.
    pub fn paid_after(&self, round_trip: std::time::Duration) {
        self.payment_round_trip.observe(round_trip.as_secs_f64());
        let (micros, count) = &*self.payment_round_trip_totals;
        let round_trip_us = u64::try_from(round_trip.as_micros()).unwrap_or(u64::MAX);
        micros.fetch_add(round_trip_us, Ordering::Relaxed);
        count.fetch_add(1, Ordering::Relaxed);
    }

    /// The mean payment round trip so far, and how many were timed.
    pub fn payment_round_trip_mean(&self) -> (std::time::Duration, u64) {
        let (micros, count) = &*self.payment_round_trip_totals;
        let (micros, count) = (micros.load(Ordering::Relaxed), count.load(Ordering::Relaxed));
        (std::time::Duration::from_micros(micros.checked_div(count).unwrap_or(0)), count)
    }

    /// Counts a refusal.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Sets the revenue gauges from exact amounts in attos: each shows the
    /// nearest float to the exact decimal (Prometheus has no other type).
    pub fn revenue(&self, received_attos: u128, settled_attos: u128) {
        let units = |attos: u128| {
            Amount::from_attos(attos)
                .map_or(f64::NAN, |amount| amount.to_string().parse().unwrap_or(f64::NAN))
        };
        let pending = received_attos.saturating_sub(settled_attos);
        for (state, attos) in
            [("received", received_attos), ("settled", settled_attos), ("pending", pending)]
        {
            self.revenue.get_or_create(&RevenueLabels { state }).set(units(attos));
        }
    }

    /// The Prometheus text of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

/// Serves `GET /healthz` and `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(render))
        .with_state(metrics);
    ferry_proto::http::serve(
        listener,
        app,
        METRICS_CONNECTIONS,
        ferry_proto::http::Transport::default(),
        Arc::new(()),
        shutdown,
    )
    .await
}

/// The metrics port is for the operator's monitoring: a few connections,
/// each bounded like the registry's.
const METRICS_CONNECTIONS: ConnectionLimits = ConnectionLimits {
    max_connections: 64,
    max_connections_per_ip: 16,
    header_read_timeout: Duration::from_secs(10),
    shutdown_grace: Duration::from_secs(2),
};

async fn render(State(metrics): State<Metrics>) -> impl IntoResponse {
    ([(CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], metrics.render())
}

/// A gauge that follows a count: incremented now, decremented on drop.
#[derive(Debug)]
pub struct Held(Gauge<i64, AtomicI64>);

impl Held {
    /// Increments `gauge` until the returned value is dropped.
    pub fn new(gauge: &Gauge<i64, AtomicI64>) -> Held {
        gauge.inc();
        Held(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}
