//! Liveness and readiness.

use axum::extract::State;
use axum::http::StatusCode;

use crate::{ApiError, AppState};

/// Liveness: the process answers.
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the database answers.
pub async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    sqlx::query("SELECT 1").execute(state.ledger.pool()).await.map_err(|error| {
        tracing::warn!(%error, "readiness check failed");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the database is unreachable")
    })?;
    Ok("ready")
}
