//! Payment channels and settlement.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use ferry_ledger::{ChannelInfo, SettlementOutcome};
use ferry_proto::{Amount, PublicKey, SignedVoucher};
use serde::{Deserialize, Serialize};

use crate::accounts::AmountBody;
use crate::auth::Signed;
use crate::error::ErrorBody;
use crate::extract::ChannelPath;
use crate::openapi::SignedErrors;
use crate::{ApiError, AppState};

/// The body of a channel open; the client is the signer.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenBody {
    /// The relay to pay.
    pub relay: PublicKey,
    /// The client's nonce, part of the channel id.
    pub nonce: u64,
    /// The escrow.
    pub amount: Amount,
}

/// The body of a relay's close.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RelayCloseBody {
    /// The newest voucher, settled before the rest is refunded.
    pub final_voucher: Option<SignedVoucher>,
}

/// The body of a settlement: a batch of vouchers, signed by the relay.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettleBody {
    /// The vouchers, at most 10,000.
    pub vouchers: Vec<SignedVoucher>,
}

/// The answer to a settlement: one outcome per voucher, in order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SettleAnswer {
    /// What each voucher did.
    pub outcomes: Vec<SettlementOutcome>,
}

/// `POST /v1/channels`: open a channel from the signer to a relay.
#[utoipa::path(
    post,
    path = "/v1/channels",
    tag = "channels",
    params(("Idempotency-Key" = String, Header, description = "Names the operation for safe retries: 1 to 64 of A-Z a-z 0-9 . _ : -", pattern = "^[A-Za-z0-9._:-]{1,64}$")),
    request_body = OpenBody,
    responses(
        (status = 201, description = "The channel, opened", body = ChannelInfo),
        (status = 409, description = "channel_exists, idempotency_conflict", body = ErrorBody),
        (status = 422, description = "zero_amount, insufficient_balance, same_key, not_a_relay", body = ErrorBody),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn open(
    State(state): State<AppState>,
    signed: Signed,
) -> Result<(StatusCode, Json<ChannelInfo>), ApiError> {
    let body: OpenBody = signed.json()?;
    let key = signed.idempotency_key()?;
    // Escrow paid to a key no relay holds would be locked for the dispute
    // window, for nothing.
    if !crate::relays::exists(&state, &body.relay).await? {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_a_relay",
            format!(
                "no relay with key {} is registered: a channel can only pay a registered relay (`ferry relays --all` lists them)",
                body.relay
            ),
        ));
    }
    let channel =
        state.ledger.open_channel(&key, &signed.key, &body.relay, body.nonce, body.amount).await?;
    Ok((StatusCode::CREATED, Json(channel)))
}

/// `GET /v1/channels/{id}`: a channel, for its client and its relay.
#[utoipa::path(
    get,
    path = "/v1/channels/{id}",
    tag = "channels",
    params(ChannelPath),
    responses(
        (status = 200, description = "The channel", body = ChannelInfo),
        (status = 404, description = "unknown_channel", body = ErrorBody),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn read(
    State(state): State<AppState>,
    ChannelPath(id): ChannelPath,
    signed: Signed,
) -> Result<Json<ChannelInfo>, ApiError> {
    let channel = state.ledger.channel(&id).await?;
    if signed.key != channel.client && signed.key != channel.relay {
        return Err(ApiError::forbidden("only the channel's client and relay may read it"));
    }
    Ok(Json(channel))
}

/// `POST /v1/channels/{id}/top-ups`: more escrow, from the client.
#[utoipa::path(
    post,
    path = "/v1/channels/{id}/top-ups",
    tag = "channels",
    params(ChannelPath, ("Idempotency-Key" = String, Header, description = "Names the operation for safe retries: 1 to 64 of A-Z a-z 0-9 . _ : -", pattern = "^[A-Za-z0-9._:-]{1,64}$")),
    request_body = AmountBody,
    responses(
        (status = 200, description = "The channel, with more escrow", body = ChannelInfo),
        (status = 404, description = "unknown_channel", body = ErrorBody),
        (status = 409, description = "wrong_state, idempotency_conflict", body = ErrorBody),
        (status = 422, description = "zero_amount, insufficient_balance", body = ErrorBody),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn top_up(
    State(state): State<AppState>,
    ChannelPath(id): ChannelPath,
    signed: Signed,
) -> Result<Json<ChannelInfo>, ApiError> {
    let body: AmountBody = signed.json()?;
    let key = signed.idempotency_key()?;
    Ok(Json(state.ledger.top_up(&key, &signed.key, &id, body.amount).await?))
}

/// `POST /v1/channels/{id}/close-request`: the client asks to close.
#[utoipa::path(
    post,
    path = "/v1/channels/{id}/close-request",
    tag = "channels",
    params(ChannelPath, ("Idempotency-Key" = String, Header, description = "Names the operation for safe retries: 1 to 64 of A-Z a-z 0-9 . _ : -", pattern = "^[A-Za-z0-9._:-]{1,64}$")),
    responses(
        (status = 200, description = "The channel, closing", body = ChannelInfo),
        (status = 404, description = "unknown_channel", body = ErrorBody),
        (status = 409, description = "wrong_state, idempotency_conflict", body = ErrorBody),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn request_close(
    State(state): State<AppState>,
    ChannelPath(id): ChannelPath,
    signed: Signed,
) -> Result<Json<ChannelInfo>, ApiError> {
    let key = signed.idempotency_key()?;
    Ok(Json(state.ledger.request_close(&key, &signed.key, &id).await?))
}

/// `POST /v1/channels/{id}/finalize`: anyone closes a channel whose dispute
/// window has passed; the rest goes to the client.
#[utoipa::path(
    post,
    path = "/v1/channels/{id}/finalize",
    tag = "channels",
    params(ChannelPath, ("Idempotency-Key" = String, Header, description = "Names the operation for safe retries: 1 to 64 of A-Z a-z 0-9 . _ : -", pattern = "^[A-Za-z0-9._:-]{1,64}$")),
    responses(
        (status = 200, description = "The channel, closed", body = ChannelInfo),
        (status = 404, description = "unknown_channel", body = ErrorBody),
        (status = 409, description = "wrong_state, dispute_window_open, idempotency_conflict", body = ErrorBody),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn finalize(
    State(state): State<AppState>,
    ChannelPath(id): ChannelPath,
    signed: Signed,
) -> Result<Json<ChannelInfo>, ApiError> {
    let key = signed.idempotency_key()?;
    Ok(Json(state.ledger.finalize(&key, &signed.key, &id).await?))
}

/// `POST /v1/channels/{id}/relay-close`: the relay closes at once.
#[utoipa::path(
    post,
    path = "/v1/channels/{id}/relay-close",
    tag = "channels",
    params(ChannelPath, ("Idempotency-Key" = String, Header, description = "Names the operation for safe retries: 1 to 64 of A-Z a-z 0-9 . _ : -", pattern = "^[A-Za-z0-9._:-]{1,64}$")),
    request_body = RelayCloseBody,
    responses(
        (status = 200, description = "The channel, closed", body = ChannelInfo),
        (status = 404, description = "unknown_channel", body = ErrorBody),
        (status = 409, description = "wrong_state, idempotency_conflict", body = ErrorBody),
        (status = 422, description = "voucher_rejected", body = ErrorBody),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn relay_close(
    State(state): State<AppState>,
    ChannelPath(id): ChannelPath,
    signed: Signed,
) -> Result<Json<ChannelInfo>, ApiError> {
    let body: RelayCloseBody = signed.json()?;
    let key = signed.idempotency_key()?;
    let channel = id;
    let info = state
        .ledger
        .close_by_relay(&key, &signed.key, &channel, body.final_voucher.as_ref())
        .await?;
    Ok(Json(info))
}

/// `POST /v1/settlements`: the signing relay settles a batch of vouchers.
#[utoipa::path(
    post,
    path = "/v1/settlements",
    tag = "channels",
    params(("Idempotency-Key" = String, Header, description = "Names the operation for safe retries: 1 to 64 of A-Z a-z 0-9 . _ : -", pattern = "^[A-Za-z0-9._:-]{1,64}$")),
    request_body = SettleBody,
    responses(
        (status = 200, description = "One outcome per voucher, in order", body = SettleAnswer),
        (status = 409, description = "idempotency_conflict", body = ErrorBody),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn settle(
    State(state): State<AppState>,
    signed: Signed,
) -> Result<Json<SettleAnswer>, ApiError> {
    let body: SettleBody = signed.json()?;
    let key = signed.idempotency_key()?;
    let settlement = state.ledger.settle(&key, &signed.key, &body.vouchers).await?;
    for outcome in &settlement.outcomes {
        // A retried batch moved nothing: its vouchers count once, as
        // replayed, so `settled` equals the ledger's settlements.
        state.metrics.voucher(match outcome {
            _ if settlement.replayed => "replayed",
            SettlementOutcome::Settled { .. } => "settled",
            SettlementOutcome::AlreadySettled { .. } => "already_settled",
            SettlementOutcome::Rejected { .. } => "rejected",
        });
    }
    Ok(Json(SettleAnswer { outcomes: settlement.outcomes }))
}
