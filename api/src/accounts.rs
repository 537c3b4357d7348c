//! Accounts: balances and statements (private to their key), deposits
//! (signed by the operator) and withdrawals (signed by the owner).

use axum::Json;
use axum::extract::State;
use ferry_ledger::{AccountRef, BalanceSummary, ChannelInfo, Statement, TransferReceipt};
use ferry_proto::Amount;
use serde::{Deserialize, Serialize};

use crate::auth::Signed;
use crate::error::ErrorBody;
use crate::extract::{KeyPath, StrictQuery};
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
    #[serde(default, deserialize_with = "crate::extract::optional_transfer_id")]
    #[param(minimum = 1, maximum = 9_223_372_036_854_775_807_i64)]
    pub before: Option<i64>,
    /// At most this many entries (1 to 1,000; default 100).
    #[serde(default, deserialize_with = "crate::extract::optional_u32")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// `GET /v1/accounts/{key}`: the key's money at a glance.
#[utoipa::path(
    get,
    path = "/v1/accounts/{key}",
    tag = "accounts",
    params(KeyPath),
    responses(
        (status = 200, description = "Available, in escrow and earned", body = BalanceSummary),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn balance(
    State(state): State<AppState>,
    KeyPath(key): KeyPath,
    signed: Signed,
) -> Result<Json<BalanceSummary>, ApiError> {
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
    params(KeyPath),
    responses(
        (status = 200, description = "The newest 1,000 channels, newest first", body = ChannelList),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn channels(
    State(state): State<AppState>,
    KeyPath(key): KeyPath,
    signed: Signed,
) -> Result<Json<ChannelList>, ApiError> {
    signed.require(&key)?;
    Ok(Json(ChannelList { channels: state.ledger.channels_of(&key).await? }))
}

/// `GET /v1/accounts/{key}/statement`: a page of transfers, newest first.
#[utoipa::path(
    get,
    path = "/v1/accounts/{key}/statement",
    tag = "accounts",
    params(KeyPath, StatementQuery),
    responses(
        (status = 200, description = "A page of transfers, newest first", body = Statement),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn statement(
    State(state): State<AppState>,
    KeyPath(key): KeyPath,
    StrictQuery(query): StrictQuery<StatementQuery>,
    signed: Signed,
) -> Result<Json<Statement>, ApiError> {
    signed.require(&key)?;
    let limit = query.limit.unwrap_or(DEFAULT_STATEMENT_PAGE);
    Ok(Json(state.ledger.statement(AccountRef::Holder { key }, query.before, limit).await?))
}

/// `POST /v1/accounts/{key}/deposits`: money from outside, signed by the
/// registry operator.
#[utoipa::path(
    post,
    path = "/v1/accounts/{key}/deposits",
    tag = "accounts",
    params(KeyPath, ("Idempotency-Key" = String, Header, description = "Names the operation for safe retries: 1 to 64 of A-Z a-z 0-9 . _ : -", pattern = "^[A-Za-z0-9._:-]{1,64}$")),
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
    KeyPath(key): KeyPath,
    signed: Signed,
) -> Result<Json<TransferReceipt>, ApiError> {
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
    params(KeyPath, ("Idempotency-Key" = String, Header, description = "Names the operation for safe retries: 1 to 64 of A-Z a-z 0-9 . _ : -", pattern = "^[A-Za-z0-9._:-]{1,64}$")),
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
    KeyPath(key): KeyPath,
    signed: Signed,
) -> Result<Json<TransferReceipt>, ApiError> {
    signed.require(&key)?;
    let body: AmountBody = signed.json()?;
    Ok(Json(state.ledger.withdraw(&signed.idempotency_key()?, &key, body.amount).await?))
}
