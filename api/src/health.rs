//! Liveness and readiness.

use axum::extract::State;
use axum::http::StatusCode;

use crate::error::ErrorBody;
use crate::{ApiError, AppState};

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process answers", body = String, content_type = "text/plain")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the database answers.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200, description = "The database answers", body = String, content_type = "text/plain"), (status = 503, description = "unavailable", body = ErrorBody)))]
pub async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    sqlx::query("SELECT 1").execute(state.ledger.pool()).await.map_err(|error| {
        tracing::warn!(%error, "readiness check failed");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the database is unreachable")
    })?;
    Ok("ready")
}
