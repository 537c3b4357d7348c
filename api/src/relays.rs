//! The relay market: advertisements, heartbeats, listings and details.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use ferry_proto::{Amount, Balance, PricePerByte, PublicKey, SignedAdvert};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::accounts::path_key;
use crate::auth::Signed;
use crate::error::ErrorBody;
use crate::openapi::{PublicErrors, SignedErrors};
use crate::{ApiError, AppState, CLOCK_SKEW, reputation};

/// The most relays one listing page holds.
pub const MAX_RELAY_PAGE: u32 = 500;
/// The listing page size when the client names none.
const DEFAULT_RELAY_PAGE: u32 = 50;

/// `SELECT`s a relay's columns, followed by the rest of the query.
macro_rules! select_relays {
    ($($rest:expr),+) => {
        concat!(
            "SELECT key_bytes, advert, first_seen, last_heartbeat, load_bytes_per_sec, sessions, ",
            "uptime_24h, paid_volume_30d::text AS paid_volume_30d, paying_clients_30d, ",
            "settled_vouchers_30d, rejected_vouchers_30d, reputation, value_score, ",
            "price_per_byte::text AS price_text, ",
            is_live!(),
            " AS live FROM relays ",
            $($rest),+
        )
    };
}

/// A relay's load, reported by the relay.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatBody {
    /// Bytes per second it carries now.
    pub load_bytes_per_sec: u64,
    /// Client sessions it holds now.
    pub sessions: u64,
}

/// How the registry judges a relay: the score and every component of it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReputationView {
    /// The score, in [0, 1] (docs/REPUTATION.md).
    pub score: f64,
    /// Share of the last 24 hours' minutes with a heartbeat, smoothed.
    pub uptime_24h: f64,
    /// Settled to the relay in the last 30 days.
    pub paid_volume_30d: Balance,
    /// Distinct clients who paid at least 0.01 in the last 30 days.
    pub paying_clients_30d: i64,
    /// Vouchers settled in the last 30 days.
    pub settled_vouchers_30d: i64,
    /// Vouchers the ledger refused from this relay in the last 30 days.
    pub rejected_vouchers_30d: i64,
    /// Days since the registry first saw the relay.
    pub age_days: f64,
}

/// A relay as the market sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RelayView {
    /// The relay's own signed advertisement; clients can verify it.
    pub advert: SignedAdvert,
    /// The advertised price per GiB, for people.
    pub price_per_gib: Amount,
    /// Whether it sent a heartbeat in the last 90 seconds.
    pub live: bool,
    /// Its last heartbeat.
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Its reported load.
    pub load_bytes_per_sec: i64,
    /// Its reported sessions.
    pub sessions: i64,
    /// Its reputation, with every component.
    pub reputation: ReputationView,
    /// Reputation discounted by price (docs/REPUTATION.md), in [0, 1].
    pub value_score: f64,
}

/// A page of relays.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RelayPage {
    /// The relays, in the requested order.
    pub relays: Vec<RelayView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// One hour of a relay's uptime history.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UptimeHour {
    /// The hour.
    pub hour: DateTime<Utc>,
    /// Minutes of that hour with a heartbeat (0 to 60).
    pub minutes_up: i64,
}

/// A relay with its recent history.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RelayDetail {
    /// The relay.
    #[serde(flatten)]
    pub relay: RelayView,
    /// Uptime per hour over the last 24 hours, oldest first.
    pub uptime_history: Vec<UptimeHour>,
}

/// The order of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SortBy {
    /// Cheapest first.
    Price,
    /// Most reputable first.
    Reputation,
    /// Best value (reputation discounted by price) first.
    #[default]
    Value,
}

/// A listing's filters, order and page.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only relays at most this dear per byte.
    pub max_price: Option<PricePerByte>,
    /// Only relays with at least this reputation score.
    pub min_reputation: Option<f64>,
    /// Only relays in this region.
    pub region: Option<String>,
    /// Only live relays (the default), or all.
    pub live: Option<bool>,
    /// The order.
    #[serde(default)]
    pub sort: SortBy,
    /// At most this many relays (1 to 500; default 50).
    pub limit: Option<u32>,
    /// Where the previous page ended.
    pub cursor: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Checks a signed document's `issued_at_ms`: not ahead of the registry's
/// clock by more than the clock skew, since a document from the future would
/// block every newer one until then.
pub(crate) fn issued_at_ms(issued_at_ms: u64) -> Result<i64, ApiError> {
    let latest_allowed = now_ms().saturating_add(CLOCK_SKEW.as_secs() * 1000);
    if issued_at_ms > latest_allowed {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "issued_in_future",
            "issued_at_ms is ahead of the registry's clock",
        ));
    }
    // Any time up to the registry's clock fits in an i64 of milliseconds.
    i64::try_from(issued_at_ms)
        .map_err(|_| ApiError::bad_request("invalid_body", "issued_at_ms is out of range"))
}

/// `PUT /v1/relays/{key}/advert`: publish or replace the relay's signed
/// advertisement; a newer one replaces an older one, never the reverse.
#[utoipa::path(
    put,
    path = "/v1/relays/{key}/advert",
    tag = "relays",
    params(("key" = String, Path, description = "A public key, 64 lowercase hex digits")),
    request_body = SignedAdvert,
    responses(
        (status = 200, description = "The relay as listed", body = RelayView),
        (status = 409, description = "stale_advert: a newer advertisement is stored", body = ErrorBody),
        (status = 422, description = "invalid_advert, issued_in_future", body = ErrorBody),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn publish(
    State(state): State<AppState>,
    Path(key): Path<String>,
    signed: Signed,
) -> Result<Json<RelayView>, ApiError> {
    let key = path_key(&key)?;
    signed.require(&key)?;
    let advert: SignedAdvert = signed.json()?;
    if advert.advert.relay != key {
        return Err(ApiError::bad_request(
            "advert_key_mismatch",
            "the advertisement names another relay",
        ));
    }
    advert.verify().map_err(|error| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_advert", error.to_string())
    })?;
    let issued_at_ms = issued_at_ms(advert.advert.issued_at_ms)?;
    let json = serde_json::to_value(&advert)
        .map_err(|error| ApiError::bad_request("invalid_advert", error.to_string()))?;
    let stored = sqlx::query(
        "INSERT INTO relays (key_bytes, advert, address, price_per_byte, region, issued_at_ms) \
         VALUES ($1, $2, $3, $4::numeric, $5, $6) \
         ON CONFLICT (key_bytes) DO UPDATE SET advert = EXCLUDED.advert, address = EXCLUDED.address, \
             price_per_byte = EXCLUDED.price_per_byte, region = EXCLUDED.region, \
             issued_at_ms = EXCLUDED.issued_at_ms \
         WHERE relays.issued_at_ms < EXCLUDED.issued_at_ms \
            OR (relays.issued_at_ms = EXCLUDED.issued_at_ms AND relays.advert = EXCLUDED.advert)",
    )
    .bind(key.as_bytes().as_slice())
    .bind(&json)
    .bind(&advert.advert.address)
    .bind(advert.advert.price_per_byte.to_string())
    .bind(&advert.advert.region)
    .bind(issued_at_ms)
    .execute(state.ledger.pool())
    .await?;
    if stored.rows_affected() == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "stale_advert",
            "a newer advertisement of this relay is already published",
        ));
    }
    reputation::recompute(state.ledger.pool(), &key).await?;
    Ok(Json(load(&state, &key).await?))
}

/// `POST /v1/relays/{key}/heartbeats`: the relay is up and reports its load.
#[utoipa::path(
    post,
    path = "/v1/relays/{key}/heartbeats",
    tag = "relays",
    params(("key" = String, Path, description = "A public key, 64 lowercase hex digits")),
    request_body = HeartbeatBody,
    responses(
        (status = 200, description = "The relay as listed", body = RelayView),
        (status = 404, description = "unknown_relay", body = ErrorBody),
        SignedErrors,
    ),
    security(("signed_request" = [])),
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    Path(key): Path<String>,
    signed: Signed,
) -> Result<Json<RelayView>, ApiError> {
    let key = path_key(&key)?;
    signed.require(&key)?;
    let body: HeartbeatBody = signed.json()?;
    let (load_now, sessions) = (
        i64::try_from(body.load_bytes_per_sec).map_err(|_| {
            ApiError::bad_request("invalid_body", "load_bytes_per_sec is out of range")
        })?,
        i64::try_from(body.sessions)
            .map_err(|_| ApiError::bad_request("invalid_body", "sessions is out of range"))?,
    );
    let updated = sqlx::query(
        "WITH beat AS ( \
             UPDATE relays SET last_heartbeat = now(), load_bytes_per_sec = $2, sessions = $3 \
             WHERE key_bytes = $1 RETURNING key_bytes \
         ) \
         INSERT INTO relay_uptime (key_bytes, minute) \
         SELECT key_bytes, date_trunc('minute', now()) FROM beat ON CONFLICT DO NOTHING",
    )
    .bind(key.as_bytes().as_slice())
    .bind(load_now)
    .bind(sessions)
    .execute(state.ledger.pool())
    .await?;
    if updated.rows_affected() == 0 && !exists(&state, &key).await? {
        return Err(unknown_relay());
    }
    reputation::recompute(state.ledger.pool(), &key).await?;
    Ok(Json(load(&state, &key).await?))
}

/// `GET /v1/relays`: relays, filtered, sorted and paged. Public.
#[utoipa::path(
    get,
    path = "/v1/relays",
    tag = "relays",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of relays", body = RelayPage),
        PublicErrors,
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<RelayPage>, ApiError> {
    let Query(query) =
        query.map_err(|error| ApiError::bad_request("invalid_query", error.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_RELAY_PAGE);
    if limit == 0 || limit > MAX_RELAY_PAGE {
        return Err(ApiError::bad_request(
            "page_size",
            format!("page size {limit} is out of range 1..={MAX_RELAY_PAGE}"),
        ));
    }
    if query.min_reputation.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
        return Err(ApiError::bad_request("invalid_query", "min_reputation must be from 0 to 1"));
    }
    let cursor = query.cursor.as_deref().map(|text| Cursor::parse(text, query.sort)).transpose()?;
    let sql = match query.sort {
        SortBy::Price => select_relays!(
            "WHERE ($1::numeric IS NULL OR price_per_byte <= $1::numeric) \
               AND ($2::float8 IS NULL OR reputation >= $2) AND ($3::text IS NULL OR region = $3) \
               AND (NOT $4 OR ",
            is_live!(),
            ") \
               AND ($5::text IS NULL OR (price_per_byte, key_bytes) > ($5::numeric, $6)) \
             ORDER BY price_per_byte, key_bytes LIMIT $7"
        ),
        SortBy::Reputation => select_relays!(
            "WHERE ($1::numeric IS NULL OR price_per_byte <= $1::numeric) \
               AND ($2::float8 IS NULL OR reputation >= $2) AND ($3::text IS NULL OR region = $3) \
               AND (NOT $4 OR ",
            is_live!(),
            ") \
               AND ($5::text IS NULL OR (reputation, key_bytes) < ($5::float8, $6)) \
             ORDER BY reputation DESC, key_bytes DESC LIMIT $7"
        ),
        SortBy::Value => select_relays!(
            "WHERE ($1::numeric IS NULL OR price_per_byte <= $1::numeric) \
               AND ($2::float8 IS NULL OR reputation >= $2) AND ($3::text IS NULL OR region = $3) \
               AND (NOT $4 OR ",
            is_live!(),
            ") \
               AND ($5::text IS NULL OR (value_score, key_bytes) < ($5::float8, $6)) \
             ORDER BY value_score DESC, key_bytes DESC LIMIT $7"
        ),
    };
    let rows = sqlx::query(sql)
        .bind(query.max_price.map(|p| p.to_string()))
        .bind(query.min_reputation)
        .bind(query.region.as_deref())
        .bind(query.live.unwrap_or(true))
        .bind(cursor.as_ref().map(|c| c.value.clone()))
        .bind(cursor.as_ref().map(|c| c.key.as_bytes().to_vec()))
        .bind(i64::from(limit))
        .fetch_all(state.ledger.pool())
        .await?;
    let mut relays = Vec::with_capacity(rows.len());
    let mut last_sort_value = None;
    for row in &rows {
        last_sort_value = Some(match query.sort {
            SortBy::Price => row.try_get::<String, _>("price_text")?,
            SortBy::Reputation => {
                format!("{:?}", row.try_get::<f64, _>("reputation")?)
            }
            SortBy::Value => {
                format!("{:?}", row.try_get::<f64, _>("value_score")?)
            }
        });
        relays.push(view(row)?);
    }
    let next_cursor = match (relays.last(), last_sort_value) {
        (Some(last), Some(value)) if relays.len() == limit as usize => {
            Some(Cursor { value, key: last.advert.advert.relay }.encode(query.sort))
        }
        _ => None,
    };
    Ok(Json(RelayPage { relays, next_cursor }))
}

/// `GET /v1/relays/{key}`: one relay, every reputation component, and its
/// uptime over the last 24 hours. Public.
#[utoipa::path(
    get,
    path = "/v1/relays/{key}",
    tag = "relays",
    params(("key" = String, Path, description = "A public key, 64 lowercase hex digits")),
    responses(
        (status = 200, description = "The relay, its reputation components and uptime history", body = RelayDetail),
        (status = 404, description = "unknown_relay", body = ErrorBody),
        PublicErrors,
    ),
)]
pub async fn detail(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<RelayDetail>, ApiError> {
    let key = path_key(&key)?;
    let relay = load(&state, &key).await?;
    let rows: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT date_trunc('hour', minute) AS hour, count(*) FROM relay_uptime \
         WHERE key_bytes = $1 AND minute > now() - interval '24 hours' GROUP BY 1 ORDER BY 1",
    )
    .bind(key.as_bytes().as_slice())
    .fetch_all(state.ledger.pool())
    .await?;
    let uptime_history =
        rows.into_iter().map(|(hour, minutes_up)| UptimeHour { hour, minutes_up }).collect();
    Ok(Json(RelayDetail { relay, uptime_history }))
}

/// A listing position: the last relay's sort value and key.
struct Cursor {
    value: String,
    key: PublicKey,
}

impl Cursor {
    fn encode(&self, sort: SortBy) -> String {
        let tag = match sort {
            SortBy::Price => "p",
            SortBy::Reputation => "r",
            SortBy::Value => "v",
        };
        format!("{tag}_{}_{}", self.value, self.key)
    }

    fn parse(text: &str, sort: SortBy) -> Result<Cursor, ApiError> {
        let invalid = || {
            ApiError::bad_request("invalid_cursor", "the cursor is not one this listing returned")
        };
        let mut parts = text.splitn(3, '_');
        let (Some(tag), Some(value), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid());
        };
        let value_ok = match (sort, tag) {
            (SortBy::Price, "p") => value.parse::<PricePerByte>().is_ok(),
            (SortBy::Reputation, "r") | (SortBy::Value, "v") => {
                value.parse::<f64>().is_ok_and(f64::is_finite)
            }
            _ => false,
        };
        if !value_ok {
            return Err(invalid());
        }
        Ok(Cursor { value: value.to_owned(), key: key.parse().map_err(|_| invalid())? })
    }
}

async fn exists(state: &AppState, key: &PublicKey) -> Result<bool, ApiError> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM relays WHERE key_bytes = $1)")
        .bind(key.as_bytes().as_slice())
        .fetch_one(state.ledger.pool())
        .await?)
}

fn unknown_relay() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_relay", "no relay with this key is registered")
}

async fn load(state: &AppState, key: &PublicKey) -> Result<RelayView, ApiError> {
    let row = sqlx::query(select_relays!("WHERE key_bytes = $1"))
        .bind(key.as_bytes().as_slice())
        .fetch_optional(state.ledger.pool())
        .await?
        .ok_or_else(unknown_relay)?;
    view(&row)
}

/// The registered relays among `keys`, in the order of `keys`.
pub(crate) async fn load_many(
    state: &AppState,
    keys: &[PublicKey],
) -> Result<Vec<RelayView>, ApiError> {
    let key_bytes: Vec<Vec<u8>> = keys.iter().map(|key| key.as_bytes().to_vec()).collect();
    let rows = sqlx::query(select_relays!(
        "JOIN unnest($1::bytea[]) WITH ORDINALITY AS wanted (key, position) \
         ON key_bytes = wanted.key ORDER BY wanted.position"
    ))
    .bind(&key_bytes)
    .fetch_all(state.ledger.pool())
    .await?;
    rows.iter().map(view).collect()
}

fn view(row: &PgRow) -> Result<RelayView, ApiError> {
    let corrupt = |what: &str| ApiError::internal(&format!("stored relay row: invalid {what}"));
    let advert: SignedAdvert =
        serde_json::from_value(row.try_get("advert")?).map_err(|_| corrupt("advert"))?;
    let first_seen: DateTime<Utc> = row.try_get("first_seen")?;
    let paid: String = row.try_get("paid_volume_30d")?;
    Ok(RelayView {
        price_per_gib: advert.advert.price_per_byte.per_gib(),
        live: row.try_get("live")?,
        last_heartbeat: row.try_get("last_heartbeat")?,
        load_bytes_per_sec: row.try_get("load_bytes_per_sec")?,
        sessions: row.try_get("sessions")?,
        reputation: ReputationView {
            score: row.try_get("reputation")?,
            uptime_24h: row.try_get("uptime_24h")?,
            paid_volume_30d: paid.parse().map_err(|_| corrupt("paid_volume_30d"))?,
            paying_clients_30d: row.try_get("paying_clients_30d")?,
            settled_vouchers_30d: row.try_get("settled_vouchers_30d")?,
            rejected_vouchers_30d: row.try_get("rejected_vouchers_30d")?,
            age_days: (Utc::now() - first_seen).num_seconds() as f64 / 86_400.0,
        },
        value_score: row.try_get("value_score")?,
        advert,
    })
}
