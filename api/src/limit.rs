//! Rate limits per client IP and per signing key, the declared body size
//! and the request timeout.
//!
//! Limits are kept in each registry instance's memory: a client spread over
//! `n` instances gets up to `n` times the rate, which bounds load per
//! instance, the thing the limits protect.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CONNECTION, CONTENT_LENGTH};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ferry_proto::http::ClientIp;
use http_body_util::BodyExt;

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

/// The most of a refused body that is read (and dropped) after its 413.
pub const MAX_DISCARDED_BODY_BYTES: usize = 16 << 20;
/// How long a refused body is read (and dropped) after its 413.
pub const DISCARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads and drops `body`, at most [`MAX_DISCARDED_BODY_BYTES`] within
/// [`DISCARD_TIMEOUT`]; then the connection closes.
async fn discard(mut body: Body) {
    let mut read = 0usize;
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, async {
        while read < MAX_DISCARDED_BODY_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |data| data.len()),
                _ => return,
            }
        }
    })
    .await;
}

/// Paths with their own per-IP budget (`Limits::per_ip_operations`), apart
/// from the API's: health checks and metrics scrapes come from the
/// operator's monitoring, often from an address that is busy with API calls
/// too, and must see the instance as it is rather than that address's rate
/// limit, while a flood of them stays bounded.
const OPERATIONS_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Middleware: the per-IP rate limit and the request timeout. The IP is the
/// client's as [`ferry_proto::http::serve`] found it (behind a trusted proxy,
/// the forwarded one); a request served otherwise has none, and only the
/// timeout applies.
pub(crate) async fn limit_requests(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(&ClientIp(ip)) = request.extensions().get::<ClientIp>() {
        let (limiter, scope) = if OPERATIONS_PATHS.contains(&request.uri().path()) {
            (&state.limits.per_ip_operations, "ip_operations")
        } else {
            (&state.limits.per_ip, "ip")
        };
        if let Err(retry_after) = limiter.check(ferry_proto::rate::ip_bucket(ip), Instant::now()) {
            state.metrics.rate_limited(scope);
            return rate_limited("address", retry_after).into_response();
        }
    }
    // A body declared larger than the registry reads is refused at once,
    // not after the request timeout. The body is still read and dropped, up
    // to a bound, so that a client that is sending it can finish and then
    // read the answer (many clients give up on a request whose body they
    // could not write, answer or not).
    let max_body_bytes = state.config.limits.max_body_bytes;
    let declared = request.headers().get(CONTENT_LENGTH).and_then(|value| value.to_str().ok());
    if declared.and_then(|text| text.parse::<u64>().ok()).is_some_and(|length| {
        usize::try_from(length).map_or(true, |length| length > max_body_bytes)
    }) {
        tokio::spawn(discard(request.into_body()));
        let mut answer = ApiError::body_too_large(max_body_bytes).into_response();
        answer.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        return answer;
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
