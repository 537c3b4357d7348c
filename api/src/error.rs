//! API errors: JSON `{code, message}` with a precise status, and never a
//! database detail.

use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ferry_ledger::LedgerError;
use serde::Serialize;

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable machine-readable code, such as `insufficient_balance`.
    pub code: &'static str,
    /// What happened, for people.
    pub message: String,
    /// For 429: when to try again, sent as `Retry-After` in whole seconds.
    pub retry_after: Option<std::time::Duration>,
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody<'a> {
    /// A stable machine-readable code, such as `insufficient_balance`.
    code: &'a str,
    /// What happened, for people.
    message: &'a str,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after: None }
    }

    /// 400: the request is malformed.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401: the request's signature is missing or not acceptable.
    pub fn unauthenticated(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 500: something the registry stored is not what it wrote; the detail
    /// goes to the log, never to the client.
    pub fn internal(what: &str) -> ApiError {
        tracing::error!(what, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
    }

    /// 413: the body is larger than the registry reads.
    pub fn body_too_large(max_body_bytes: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is larger than the maximum of {max_body_bytes} bytes"),
        )
    }

    /// 403: the signer may not do this.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { code: self.code, message: &self.message };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}

impl From<LedgerError> for ApiError {
    fn from(error: LedgerError) -> ApiError {
        use StatusCode as S;
        let message = error.to_string();
        let (status, code) = match &error {
            LedgerError::ZeroAmount => (S::UNPROCESSABLE_ENTITY, "zero_amount"),
            LedgerError::Amount(_) => (S::UNPROCESSABLE_ENTITY, "invalid_amount"),
            LedgerError::InsufficientBalance { .. } => {
                (S::UNPROCESSABLE_ENTITY, "insufficient_balance")
            }
            LedgerError::IdempotencyConflict(_) => (S::CONFLICT, "idempotency_conflict"),
            LedgerError::UnknownChannel(_) => (S::NOT_FOUND, "unknown_channel"),
            LedgerError::ChannelExists(_) => (S::CONFLICT, "channel_exists"),
            LedgerError::NotParticipant { .. } => (S::FORBIDDEN, "forbidden"),
            LedgerError::WrongState { .. } => (S::CONFLICT, "wrong_state"),
            LedgerError::DisputeWindowOpen { .. } => (S::CONFLICT, "dispute_window_open"),
            LedgerError::SameKey => (S::UNPROCESSABLE_ENTITY, "same_key"),
            LedgerError::BatchTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "batch_too_large"),
            LedgerError::PageSize { .. } => (S::BAD_REQUEST, "page_size"),
            LedgerError::VoucherRejected(_) => (S::UNPROCESSABLE_ENTITY, "voucher_rejected"),
            LedgerError::Database(source) => {
                tracing::error!(error = %source, "ledger database error");
                (S::SERVICE_UNAVAILABLE, "unavailable")
            }
            LedgerError::InvalidConfig(_) | LedgerError::Corrupt(_) => {
                return ApiError::internal(&error.to_string());
            }
        };
        ApiError::new(status, code, message)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> ApiError {
        ApiError::from(LedgerError::Database(error))
    }
}

/// The answer for a path no route serves.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
}

/// The answer for a method a path does not serve (axum adds `Allow`).
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this path does not serve this method",
    )
}
