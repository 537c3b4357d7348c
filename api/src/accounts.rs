//! Accounts: balances and statements (private to their key), deposits
//! (signed by the operator) and withdrawals (signed by the owner).

use axum::Json;
use axum::extract::{Path, Query, State};
use ferry_ledger::{AccountRef, BalanceSummary, ChannelInfo, Statement, TransferReceipt};
use ferry_proto::{Amount, PublicKey};
use serde::{Deserialize, Serialize};

use crate::auth::Signed;
use crate::error::ErrorBody;
use crate::openapi::SignedErrors;
use crate::{ApiError, AppState};

/// The statement page size when the client names none.
const DEFAULT_STATEMENT_PAGE: u32 = 100;

/// The body of a deposit or a withdrawal.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AmountBody {
    /// How much.
    pub amount: Amount,
}

/// Which page of a statement.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StatementQuery {
    /// Only transfers older than this transfer id (the previous page's
    /// `next_before`).
    pub before: Option<i64>,
    /// At most this many entries (1 to 1,000; default 100).
    pub limit: Option<u32>,
}

/// Parses a key from the path.
pub(crate) fn path_key(text: &str) -> Result<PublicKey, ApiError> {
    text.parse().map_err(|error| ApiError::bad_request("invalid_key", format!("{error}")))
}

/// `GET /v1/accounts/{key}`: the key's money at a glance.
#[utoipa::path(
    get,
    path = "/v1/accounts/{key}",
    tag = "accounts",
    params(("key" = String, Path, description = "A public key, 64 lowercase hex digits")),
    responses(
        (status = 200, description = "Available, in escrow and earned", body = BalanceSummary),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn balance(
    State(state): State<AppState>,
    Path(key): Path<String>,
    signed: Signed,
) -> Result<Json<BalanceSummary>, ApiError> {
    let key = path_key(&key)?;
    signed.require(&key)?;
    Ok(Json(state.ledger.balance(&key).await?))
}

/// A key's channels.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChannelList {
    /// The newest 1,000 channels where the key is the client or the relay,
    /// newest first.
    pub channels: Vec<ChannelInfo>,
}

/// `GET /v1/accounts/{key}/channels`: the key's channels, as client or
/// relay.
#[utoipa::path(
    get,
    path = "/v1/accounts/{key}/channels",
    tag = "accounts",
    params(("key" = String, Path, description = "A public key, 64 lowercase hex digits")),
    responses(
        (status = 200, description = "The newest 1,000 channels, newest first", body = ChannelList),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn channels(
    State(state): State<AppState>,
    Path(key): Path<String>,
    signed: Signed,
) -> Result<Json<ChannelList>, ApiError> {
    let key = path_key(&key)?;
    signed.require(&key)?;
    Ok(Json(ChannelList { channels: state.ledger.channels_of(&key).await? }))
}

/// `GET /v1/accounts/{key}/statement`: a page of transfers, newest first.
#[utoipa::path(
    get,
    path = "/v1/accounts/{key}/statement",
    tag = "accounts",
    params(("key" = String, Path, description = "A public key, 64 lowercase hex digits"), StatementQuery),
    responses(
        (status = 200, description = "A page of transfers, newest first", body = Statement),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn statement(
    State(state): State<AppState>,
    Path(key): Path<String>,
    query: Result<Query<StatementQuery>, axum::extract::rejection::QueryRejection>,
    signed: Signed,
) -> Result<Json<Statement>, ApiError> {
    let key = path_key(&key)?;
    signed.require(&key)?;
    let Query(query) =
        query.map_err(|error| ApiError::bad_request("invalid_query", error.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_STATEMENT_PAGE);
    Ok(Json(state.ledger.statement(AccountRef::Holder { key }, query.before, limit).await?))
}

/// `POST /v1/accounts/{key}/deposits`: money from outside, signed by the
/// registry operator.
#[utoipa::path(
    post,
    path = "/v1/accounts/{key}/deposits",
    tag = "accounts",
    params(("key" = String, Path, description = "A public key, 64 lowercase hex digits"), ("Idempotency-Key" = String, Header, description = "Names the operation for safe retries: 1 to 64 of A-Z a-z 0-9 . _ : -")),
    request_body = AmountBody,
    responses(
        (status = 200, description = "Deposited", body = TransferReceipt),
        (status = 409, description = "idempotency_conflict", body = ErrorBody),
        (status = 422, description = "zero_amount", body = ErrorBody),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn deposit(
    State(state): State<AppState>,
    Path(key): Path<String>,
    signed: Signed,
) -> Result<Json<TransferReceipt>, ApiError> {
    let key = path_key(&key)?;
    signed.require(&state.config.operator)?;
    let body: AmountBody = signed.json()?;
    Ok(Json(
        state
            .ledger
            .deposit(&signed.idempotency_key()?, &state.config.operator, &key, body.amount)
            .await?,
    ))
}

/// `POST /v1/accounts/{key}/withdrawals`: money out, signed by the owner.
#[utoipa::path(
    post,
    path = "/v1/accounts/{key}/withdrawals",
    tag = "accounts",
    params(("key" = String, Path, description = "A public key, 64 lowercase hex digits"), ("Idempotency-Key" = String, Header, description = "Names the operation for safe retries: 1 to 64 of A-Z a-z 0-9 . _ : -")),
    request_body = AmountBody,
    responses(
        (status = 200, description = "Withdrawn", body = TransferReceipt),
        (status = 409, description = "idempotency_conflict", body = ErrorBody),
        (status = 422, description = "zero_amount, insufficient_balance", body = ErrorBody),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn withdraw(
    State(state): State<AppState>,
    Path(key): Path<String>,
    signed: Signed,
) -> Result<Json<TransferReceipt>, ApiError> {
    let key = path_key(&key)?;
    signed.require(&key)?;
    let body: AmountBody = signed.json()?;
    Ok(Json(state.ledger.withdraw(&signed.idempotency_key()?, &key, body.amount).await?))
}
