//! The relay market: advertisements, heartbeats, listings and details.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use ferry_proto::{Amount, Balance, PricePerByte, PublicKey, SignedAdvert};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::auth::Signed;
use crate::error::ErrorBody;
use crate::extract::{KeyPath, StrictQuery};
use crate::market::Entry;
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
            "SELECT key_bytes, advert::text AS advert_text, issued_at_ms, region, first_seen, last_heartbeat, load_bytes_per_sec, sessions, ",
            "uptime_24h, reachability_24h, probe_rtt_ms, ",
            "paid_volume_30d::text AS paid_volume_30d, paying_clients_30d, ",
            "settled_vouchers_30d, rejected_vouchers_30d, reputation, newcomer, value_score, ",
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
    /// Share of the registry's probes in the last 24 hours in which the
    /// relay answered and proved its key, smoothed.
    pub reachability_24h: f64,
    /// Median round trip of the registry's successful probes in the last
    /// 24 hours, in milliseconds; none before the first.
    pub probe_rtt_ms: Option<f64>,
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
    /// Whether the score is the newcomer floor: a relay younger than 7 days
    /// that the registry's own probes and heartbeats show reachable and up
    /// (docs/REPUTATION.md, "A new relay").
    pub newcomer: bool,
}

/// A relay as the market sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RelayView {
    /// The relay's own signed advertisement, exactly as it signed it; clients
    /// can verify it. (Kept as stored text: listing thousands of relays never
    /// re-parses their keys.)
    #[schema(value_type = SignedAdvert)]
    pub advert: Box<RawValue>,
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
    /// The relay's key, as stored (validated when the advertisement came).
    #[serde(skip)]
    pub(crate) key_bytes: [u8; 32],
    /// The advertised price per byte.
    #[serde(skip)]
    pub(crate) price_per_byte: PricePerByte,
    /// The advertised region.
    #[serde(skip)]
    pub(crate) region: String,
    /// When the advertisement was made.
    #[serde(skip)]
    pub(crate) issued_at_ms: u64,
}

/// A page of relays, built from the market snapshot's pre-rendered views.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RelayPage<'a> {
    /// The relays, in the requested order.
    #[schema(value_type = Vec<RelayView>)]
    pub relays: Vec<&'a RawValue>,
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
    #[serde(default, deserialize_with = "crate::extract::optional_region")]
    #[param(pattern = "^[a-z0-9-]{1,32}$")]
    pub region: Option<String>,
    /// Only live relays (the default), or all.
    pub live: Option<bool>,
    /// The order.
    #[serde(default)]
    pub sort: SortBy,
    /// At most this many relays (1 to 500; default 50).
    #[serde(default, deserialize_with = "crate::extract::optional_u32")]
    #[param(minimum = 1, maximum = 500)]
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
    params(KeyPath),
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
    KeyPath(key): KeyPath,
    signed: Signed,
) -> Result<Json<RelayView>, ApiError> {
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
    Ok(Json(load_and_list(&state, &key).await?))
}

/// `POST /v1/relays/{key}/heartbeats`: the relay is up and reports its load.
#[utoipa::path(
    post,
    path = "/v1/relays/{key}/heartbeats",
    tag = "relays",
    params(KeyPath),
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
    KeyPath(key): KeyPath,
    signed: Signed,
) -> Result<Json<RelayView>, ApiError> {
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
    Ok(Json(load_and_list(&state, &key).await?))
}

/// `GET /v1/relays`: relays, filtered, sorted and paged, from the market
/// snapshot (see [`crate::market`]). Public.
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
    StrictQuery(query): StrictQuery<ListQuery>,
) -> Result<Response, ApiError> {
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
    let snapshot = state.market.snapshot(state.ledger.pool()).await?;
    let ordered = snapshot.ordered(query.sort);
    let start = cursor.map_or(0, |cursor| {
        ordered.partition_point(|entry| entry.order(&cursor, query.sort) != Ordering::Greater)
    });
    let live_only = query.live.unwrap_or(true);
    let page: Vec<&Arc<Entry>> = ordered[start..]
        .iter()
        .filter(|e| query.max_price.is_none_or(|max| e.price <= max))
        .filter(|e| query.min_reputation.is_none_or(|min| e.reputation >= min))
        .filter(|e| query.region.as_deref().is_none_or(|region| e.region == region))
        .filter(|e| !live_only || e.live)
        .take(limit as usize)
        .collect();
    let next_cursor = match page.last() {
        Some(last) if page.len() == limit as usize => Some(Cursor::encode(last, query.sort)),
        _ => None,
    };
    let relays = page.iter().map(|entry| &*entry.json).collect();
    // Rendered here, while the snapshot the page borrows from is held.
    Ok(Json(RelayPage { relays, next_cursor }).into_response())
}

/// `GET /v1/relays/{key}`: one relay, every reputation component, and its
/// uptime over the last 24 hours. Public.
#[utoipa::path(
    get,
    path = "/v1/relays/{key}",
    tag = "relays",
    params(KeyPath),
    responses(
        (status = 200, description = "The relay, its reputation components and uptime history", body = RelayDetail),
        (status = 404, description = "unknown_relay", body = ErrorBody),
        PublicErrors,
    ),
)]
pub async fn detail(
    State(state): State<AppState>,
    KeyPath(key): KeyPath,
) -> Result<Json<RelayDetail>, ApiError> {
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

/// A listing position: the last relay's sort value and key, as an entry
/// that sorts exactly where that relay did.
struct Cursor;

impl Cursor {
    fn encode(entry: &Entry, sort: SortBy) -> String {
        let key = hex::encode(entry.key);
        match sort {
            SortBy::Price => format!("p_{}_{key}", entry.price),
            SortBy::Reputation => format!("r_{:?}_{key}", entry.reputation),
            SortBy::Value => format!("v_{:?}_{key}", entry.value_score),
        }
    }

    fn parse(text: &str, sort: SortBy) -> Result<Entry, ApiError> {
        let invalid = || {
            ApiError::bad_request("invalid_cursor", "the cursor is not one this listing returned")
        };
        let mut parts = text.splitn(3, '_');
        let (Some(tag), Some(value), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid());
        };
        let key: PublicKey = key.parse().map_err(|_| invalid())?;
        let mut position = Entry::position(*key.as_bytes());
        match (sort, tag) {
            (SortBy::Price, "p") => position.price = value.parse().map_err(|_| invalid())?,
            (SortBy::Reputation, "r") => {
                position.reputation = parse_score(value).ok_or_else(invalid)?
            }
            (SortBy::Value, "v") => {
                position.value_score = parse_score(value).ok_or_else(invalid)?
            }
            _ => return Err(invalid()),
        }
        Ok(position)
    }
}

fn parse_score(text: &str) -> Option<f64> {
    text.parse::<f64>().ok().filter(|score| score.is_finite())
}

pub(crate) async fn exists(state: &AppState, key: &PublicKey) -> Result<bool, ApiError> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM relays WHERE key_bytes = $1)")
        .bind(key.as_bytes().as_slice())
        .fetch_one(state.ledger.pool())
        .await?)
}

fn unknown_relay() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_relay", "no relay with this key is registered")
}

/// Loads a relay this instance just wrote, and lists it at once.
async fn load_and_list(state: &AppState, key: &PublicKey) -> Result<RelayView, ApiError> {
    let view = load(state, key).await?;
    state.market.update(Entry::new(&view)?);
    Ok(view)
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

/// Every registered relay, ready to list.
pub(crate) async fn load_all(pool: &PgPool) -> Result<Vec<Entry>, ApiError> {
    let rows = sqlx::query(select_relays!("")).fetch_all(pool).await?;
    rows.iter().map(|row| view(row).and_then(|view| Entry::new(&view))).collect()
}

fn view(row: &PgRow) -> Result<RelayView, ApiError> {
    let corrupt = |what: &str| ApiError::internal(&format!("stored relay row: invalid {what}"));
    let advert =
        RawValue::from_string(row.try_get("advert_text")?).map_err(|_| corrupt("advert"))?;
    let key_bytes: Vec<u8> = row.try_get("key_bytes")?;
    let price_per_byte: PricePerByte =
        row.try_get::<String, _>("price_text")?.parse().map_err(|_| corrupt("price"))?;
    let first_seen: DateTime<Utc> = row.try_get("first_seen")?;
    let paid: String = row.try_get("paid_volume_30d")?;
    Ok(RelayView {
        key_bytes: key_bytes.try_into().map_err(|_| corrupt("key"))?,
        price_per_byte,
        region: row.try_get("region")?,
        issued_at_ms: u64::try_from(row.try_get::<i64, _>("issued_at_ms")?)
            .map_err(|_| corrupt("issued_at_ms"))?,
        price_per_gib: price_per_byte.per_gib(),
        live: row.try_get("live")?,
        last_heartbeat: row.try_get("last_heartbeat")?,
        load_bytes_per_sec: row.try_get("load_bytes_per_sec")?,
        sessions: row.try_get("sessions")?,
        reputation: ReputationView {
            score: row.try_get("reputation")?,
            uptime_24h: row.try_get("uptime_24h")?,
            reachability_24h: row.try_get("reachability_24h")?,
            probe_rtt_ms: row.try_get("probe_rtt_ms")?,
            paid_volume_30d: paid.parse().map_err(|_| corrupt("paid_volume_30d"))?,
            paying_clients_30d: row.try_get("paying_clients_30d")?,
            settled_vouchers_30d: row.try_get("settled_vouchers_30d")?,
            rejected_vouchers_30d: row.try_get("rejected_vouchers_30d")?,
            age_days: (Utc::now() - first_seen).num_seconds() as f64 / 86_400.0,
            newcomer: row.try_get("newcomer")?,
        },
        value_score: row.try_get("value_score")?,
        advert,
    })
}
