//! Rate limits per client IP and per signing key, and the request timeout.
//!
//! Limits are kept in each registry instance's memory: a client spread over
//! `n` instances gets up to `n` times the rate, which bounds load per
//! instance, the thing the limits protect.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

pub use ferry_proto::rate::{MAX_TRACKED_CLIENTS, Rate, RateLimiter};

use crate::{ApiError, AppState};

/// 429 with how long to wait.
pub(crate) fn rate_limited(scope: &str, retry_after: Duration) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many requests from this {scope}; retry later"),
    );
    error.retry_after = Some(retry_after);
    error
}

/// Paths with their own per-IP budget (`Limits::per_ip_operations`), apart
/// from the API's: health checks and metrics scrapes come from the
/// operator's monitoring, often from an address that is busy with API calls
/// too, and must see the instance as it is rather than that address's rate
/// limit, while a flood of them stays bounded.
const OPERATIONS_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Middleware: the per-IP rate limit and the request timeout. A request
/// served without connection info (not through [`crate::serve`]) has no IP
/// and only the timeout applies.
pub(crate) async fn limit_requests(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<SocketAddr>>() {
        let ip: IpAddr = peer.ip();
        let (limiter, scope) = if OPERATIONS_PATHS.contains(&request.uri().path()) {
            (&state.limits.per_ip_operations, "ip_operations")
        } else {
            (&state.limits.per_ip, "ip")
        };
        if let Err(retry_after) = limiter.check(ip, Instant::now()) {
            state.metrics.rate_limited(scope);
            return rate_limited("address", retry_after).into_response();
        }
    }
    let timeout = state.config.limits.request_timeout;
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        // Dropping the handler rolls back its transaction, if any: every
        // operation commits whole or not at all, and a retry is idempotent.
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!("the request took longer than {} ms", timeout.as_millis()),
        )
        .into_response(),
    }
}
