//! Home relays: where a client can be reached, published by the client and
//! read by anyone who wants to reach it.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use ferry_proto::SignedHomeRelays;
use serde::Serialize;

use crate::auth::Signed;
use crate::error::ErrorBody;
use crate::extract::KeyPath;
use crate::openapi::{PublicErrors, SignedErrors};
use crate::relays::{self, RelayView};
use crate::{ApiError, AppState};

/// A client's home relays, as a peer needs them to dial it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HomeView {
    /// The client's own signed list; peers can verify it.
    pub home: SignedHomeRelays,
    /// The listed relays as the market sees them now (address, price,
    /// liveness), in the list's order.
    pub relays: Vec<RelayView>,
}

/// `PUT /v1/clients/{key}/home-relays`: publish or replace the client's
/// signed list; a newer one replaces an older one, never the reverse.
#[utoipa::path(
    put,
    path = "/v1/clients/{key}/home-relays",
    tag = "clients",
    params(KeyPath),
    request_body = SignedHomeRelays,
    responses(
        (status = 200, description = "The published list", body = HomeView),
        (status = 409, description = "stale_home_relays: a newer list is stored", body = ErrorBody),
        (status = 422, description = "invalid_home_relays, unknown_home_relay, issued_in_future", body = ErrorBody),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn publish(
    State(state): State<AppState>,
    KeyPath(key): KeyPath,
    signed: Signed,
) -> Result<Json<HomeView>, ApiError> {
    signed.require(&key)?;
    let home: SignedHomeRelays = signed.json()?;
    if home.home.client != key {
        return Err(ApiError::bad_request(
            "home_key_mismatch",
            "the home relay list names another client",
        ));
    }
    home.verify().map_err(|error| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_home_relays", error.to_string())
    })?;
    let issued_at_ms = relays::issued_at_ms(home.home.issued_at_ms)?;
    let registered = relays::load_many(&state, &home.home.relays).await?;
    if let Some(missing) =
        home.home.relays.iter().find(|r| !registered.iter().any(|v| v.key_bytes == *r.as_bytes()))
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_home_relay",
            format!("relay {missing} is not registered"),
        ));
    }
    let json = serde_json::to_value(&home)
        .map_err(|error| ApiError::bad_request("invalid_body", error.to_string()))?;
    let stored = sqlx::query(
        "INSERT INTO home_relays (client_key, home, issued_at_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (client_key) DO UPDATE SET home = EXCLUDED.home, \
             issued_at_ms = EXCLUDED.issued_at_ms, updated_at = now() \
         WHERE home_relays.issued_at_ms < EXCLUDED.issued_at_ms \
            OR (home_relays.issued_at_ms = EXCLUDED.issued_at_ms AND home_relays.home = EXCLUDED.home)",
    )
    .bind(key.as_bytes().as_slice())
    .bind(&json)
    .bind(issued_at_ms)
    .execute(state.ledger.pool())
    .await?;
    if stored.rows_affected() == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "stale_home_relays",
            "a newer home relay list of this client is already published",
        ));
    }
    Ok(Json(HomeView { home, relays: registered }))
}

/// `GET /v1/clients/{key}/home-relays`: where the client can be reached.
/// Public: a peer needs it to dial the client.
#[utoipa::path(
    get,
    path = "/v1/clients/{key}/home-relays",
    tag = "clients",
    params(KeyPath),
    responses(
        (status = 200, description = "Where the client can be reached", body = HomeView),
        (status = 404, description = "unknown_client", body = ErrorBody),
        PublicErrors,
    ),
)]
pub async fn read(
    State(state): State<AppState>,
    KeyPath(key): KeyPath,
) -> Result<Json<HomeView>, ApiError> {
    let json: serde_json::Value =
        sqlx::query_scalar("SELECT home FROM home_relays WHERE client_key = $1")
            .bind(key.as_bytes().as_slice())
            .fetch_optional(state.ledger.pool())
            .await?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_client",
                    "this client has published no home relays",
                )
            })?;
    let home: SignedHomeRelays = serde_json::from_value(json)
        .map_err(|_| ApiError::internal("a stored home relay list is invalid"))?;
    let relays = relays::load_many(&state, &home.home.relays).await?;
    Ok(Json(HomeView { home, relays }))
}
