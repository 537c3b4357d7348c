//! Signed requests: who is asking, checked before any handler runs.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::HeaderMap;
use ferry_ledger::IdempotencyKey;
use ferry_proto::{
    KEY_HEADER, NONCE_HEADER, PublicKey, SIGNATURE_HEADER, Signature, SignedRequest,
    TIMESTAMP_HEADER,
};
use serde::de::DeserializeOwned;

use crate::extract::whole_number;
use crate::{ApiError, AppState, CLOCK_SKEW, limit};

/// The header that names an operation for idempotent retries.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// A request whose signature, timestamp and nonce were checked: `key` signed
/// exactly these bytes, recently, and never sent them before.
#[derive(Debug)]
pub struct Signed {
    /// The key the request acts for.
    pub key: PublicKey,
    /// The `Idempotency-Key` header, if any.
    idempotency_key: Option<String>,
    body: Bytes,
}

impl Signed {
    /// The body parsed as JSON; a malformed body, or one with a bad key or
    /// amount in it, is a 400 that quotes the problem.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body).map_err(|error| {
            ApiError::bad_request("invalid_body", format!("invalid body: {error}"))
        })
    }

    /// The `Idempotency-Key` header, required on every request that moves
    /// money or changes a channel.
    pub fn idempotency_key(&self) -> Result<IdempotencyKey, ApiError> {
        let text = self.idempotency_key.as_deref().ok_or_else(|| {
            ApiError::bad_request(
                "missing_idempotency_key",
                "the Idempotency-Key header is required",
            )
        })?;
        text.parse()
            .map_err(|error| ApiError::bad_request("invalid_idempotency_key", format!("{error}")))
    }

    /// Refuses the request unless it is signed by `allowed`.
    pub fn require(&self, allowed: &PublicKey) -> Result<(), ApiError> {
        if self.key != *allowed {
            return Err(ApiError::forbidden("this request must be signed by another key"));
        }
        Ok(())
    }
}

impl FromRequest<AppState> for Signed {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Signed, ApiError> {
        let (parts, body) = request.into_parts();
        let key: PublicKey = header(&parts.headers, KEY_HEADER)?.parse().map_err(|error| {
            ApiError::unauthenticated("bad_key", format!("{KEY_HEADER}: {error}"))
        })?;
        let timestamp =
            whole_number(header(&parts.headers, TIMESTAMP_HEADER)?, u64::MAX).map_err(|error| {
                ApiError::unauthenticated(
                    "bad_timestamp",
                    format!(
                        "{TIMESTAMP_HEADER} must be whole seconds since the Unix epoch: {error}"
                    ),
                )
            })?;
        let nonce = parse_nonce(header(&parts.headers, NONCE_HEADER)?)?;
        let signature: Signature =
            header(&parts.headers, SIGNATURE_HEADER)?.parse().map_err(|error| {
                ApiError::unauthenticated("bad_signature", format!("{SIGNATURE_HEADER}: {error}"))
            })?;
        let idempotency_key = parts
            .headers
            .get(IDEMPOTENCY_HEADER)
            .map(|value| value.to_str().map(str::to_owned))
            .transpose()
            .map_err(|_| {
                ApiError::bad_request("invalid_idempotency_key", "the Idempotency-Key is not text")
            })?;

        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now.abs_diff(timestamp) > CLOCK_SKEW.as_secs() {
            return Err(ApiError::unauthenticated(
                "stale_timestamp",
                format!(
                    "the request's timestamp {timestamp} is more than {} s from the registry's clock ({now})",
                    CLOCK_SKEW.as_secs()
                ),
            ));
        }
        let body = read_body(body, state.config.limits.max_body_bytes).await?;
        let path_and_query = parts.uri.path_and_query().map_or(parts.uri.path(), |pq| pq.as_str());
        let signed = SignedRequest {
            method: parts.method.as_str(),
            path_and_query,
            timestamp,
            nonce,
            body: &body,
        };
        signed.verify(&key, &signature).map_err(|_| {
            ApiError::unauthenticated(
                "bad_signature",
                "the signature does not match the key and the request",
            )
        })?;
        // Counted after the signature check, so that nobody can spend another
        // key's budget with forged requests, and before the database is asked.
        if let Err(retry_after) = state.limits.per_key.check(key, Instant::now()) {
            state.metrics.rate_limited("key");
            return Err(limit::rate_limited("key", retry_after));
        }
        remember_nonce(state, &key, &nonce).await?;
        Ok(Signed { key, idempotency_key, body })
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .ok_or_else(|| {
            ApiError::unauthenticated(
                "unsigned",
                format!("this request must be signed: {name} is missing"),
            )
        })?
        .to_str()
        .map_err(|_| ApiError::unauthenticated("bad_header", format!("{name} is not text")))
}

fn parse_nonce(text: &str) -> Result<[u8; 16], ApiError> {
    let mut nonce = [0u8; 16];
    let lower_hex =
        text.len() == 32 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !lower_hex || hex::decode_to_slice(text, &mut nonce).is_err() {
        return Err(ApiError::unauthenticated(
            "bad_nonce",
            format!("{NONCE_HEADER} must be 32 lowercase hex digits"),
        ));
    }
    Ok(nonce)
}

async fn read_body(body: axum::body::Body, max_body_bytes: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, max_body_bytes).await.map_err(|error| {
        if error.into_inner().is::<http_body_util::LengthLimitError>() {
            ApiError::body_too_large(max_body_bytes)
        } else {
            ApiError::bad_request("unreadable_body", "the body could not be read")
        }
    })
}

/// Records `nonce` for `key`; a nonce seen before is a replay.
async fn remember_nonce(
    state: &AppState,
    key: &PublicKey,
    nonce: &[u8; 16],
) -> Result<(), ApiError> {
    let fresh = sqlx::query(
        "INSERT INTO request_nonces (key_bytes, nonce) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(key.as_bytes().as_slice())
    .bind(nonce.as_slice())
    .execute(state.ledger.pool())
    .await?;
    if fresh.rows_affected() == 0 {
        return Err(ApiError::unauthenticated(
            "replayed_nonce",
            "this request's nonce was already used",
        ));
    }
    Ok(())
}

/// Forgets nonces older than twice the skew window: a request that old is
/// refused for its timestamp anyway.
pub(crate) async fn forget_expired_nonces(state: &AppState) -> Result<(), sqlx::Error> {
    let window = i64::try_from(CLOCK_SKEW.as_secs() * 2).unwrap_or(i64::MAX);
    sqlx::query("DELETE FROM request_nonces WHERE seen_at < now() - make_interval(secs => $1)")
        .bind(window as f64)
        .execute(state.ledger.pool())
        .await?;
    Ok(())
}
