//! `GET /v1/market`: the market's totals, for the registry's web page and for
//! anyone who wants to watch the market as a whole.

use axum::Json;
use axum::extract::State;
use ferry_proto::Balance;
use serde::Serialize;
use sqlx::Row;

use crate::openapi::PublicErrors;
use crate::{ApiError, AppState};

/// The whole market at one moment.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MarketTotals {
    /// Relays that ever registered.
    pub relays: i64,
    /// Relays with a heartbeat in the last 90 seconds.
    pub live_relays: i64,
    /// Bytes per second the live relays report carrying now.
    pub load_bytes_per_sec: i64,
    /// Channels open for payments.
    pub open_channels: i64,
    /// Channels whose client asked to close, inside their dispute window.
    pub closing_channels: i64,
    /// Money locked in the escrow of open and closing channels.
    pub in_escrow: Balance,
    /// Money paid out for vouchers ever, to relays and as the registry's fee.
    pub settled: Balance,
    /// The registry's fees, part of `settled`.
    pub fees: Balance,
    /// Money in the ledger: deposited and not withdrawn.
    pub deposited: Balance,
}

/// `GET /v1/market`: relays, channels and money in the market now. Public.
#[utoipa::path(
    get,
    path = "/v1/market",
    tag = "relays",
    responses(
        (status = 200, description = "The market's totals", body = MarketTotals),
        PublicErrors,
    ),
)]
pub async fn totals(State(state): State<AppState>) -> Result<Json<MarketTotals>, ApiError> {
    // One statement, so the figures are of one snapshot of the database.
    let row = sqlx::query(concat!(
        "SELECT ",
        "(SELECT count(*) FROM relays) AS relays, ",
        "(SELECT count(*) FROM relays WHERE ",
        is_live!(),
        ") AS live_relays, ",
        "(SELECT coalesce(sum(load_bytes_per_sec), 0)::bigint FROM relays WHERE ",
        is_live!(),
        ") AS load_bytes_per_sec, ",
        "(SELECT count(*) FROM channels WHERE state = 'open') AS open_channels, ",
        "(SELECT count(*) FROM channels WHERE state = 'closing') AS closing_channels, ",
        "(SELECT coalesce(sum(balance), 0)::text FROM accounts WHERE kind = 'escrow') AS in_escrow, ",
        "(SELECT coalesce(sum(settled), 0)::text FROM channels) AS settled, ",
        "(SELECT coalesce(sum(balance), 0)::text FROM accounts WHERE kind = 'treasury') AS fees, ",
        "(SELECT coalesce(-sum(balance), 0)::text FROM accounts WHERE kind = 'world') AS deposited",
    ))
    .fetch_one(state.ledger.pool())
    .await?;
    let money = |column: &str| -> Result<Balance, ApiError> {
        row.try_get::<String, _>(column)?
            .parse()
            .map_err(|_| ApiError::internal(&format!("market totals: invalid {column}")))
    };
    Ok(Json(MarketTotals {
        relays: row.try_get("relays")?,
        live_relays: row.try_get("live_relays")?,
        load_bytes_per_sec: row.try_get("load_bytes_per_sec")?,
        open_channels: row.try_get("open_channels")?,
        closing_channels: row.try_get("closing_channels")?,
        in_escrow: money("in_escrow")?,
        settled: money("settled")?,
        fees: money("fees")?,
        deposited: money("deposited")?,
    }))
}
