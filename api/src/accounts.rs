//! Accounts: balances and statements (private to their key), deposits
//! (signed by the operator) and withdrawals (signed by the owner).

use axum::Json;
use axum::extract::{Path, Query, State};
use ferry_ledger::{AccountRef, BalanceSummary, Statement, TransferReceipt};
use ferry_proto::{Amount, PublicKey};
use serde::Deserialize;

use crate::auth::Signed;
use crate::{ApiError, AppState};

/// The statement page size when the client names none.
const DEFAULT_STATEMENT_PAGE: u32 = 100;

/// The body of a deposit or a withdrawal.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmountBody {
    /// How much.
    pub amount: Amount,
}

/// Which page of a statement.
#[derive(Debug, Deserialize)]
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
pub async fn balance(
    State(state): State<AppState>,
    Path(key): Path<String>,
    signed: Signed,
) -> Result<Json<BalanceSummary>, ApiError> {
    let key = path_key(&key)?;
    signed.require(&key)?;
    Ok(Json(state.ledger.balance(&key).await?))
}

/// `GET /v1/accounts/{key}/statement`: a page of transfers, newest first.
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
pub async fn deposit(
    State(state): State<AppState>,
    Path(key): Path<String>,
    signed: Signed,
) -> Result<Json<TransferReceipt>, ApiError> {
    let key = path_key(&key)?;
    signed.require(&state.config.operator)?;
    let body: AmountBody = signed.json()?;
    Ok(Json(state.ledger.deposit(&signed.idempotency_key()?, &key, body.amount).await?))
}

/// `POST /v1/accounts/{key}/withdrawals`: money out, signed by the owner.
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
