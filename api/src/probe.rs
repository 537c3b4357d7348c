//! The registry's probes of relays: it connects to each registered relay's
//! advertised address and runs the relay handshake far enough to see the
//! relay prove its key, timing the round trip. Results feed reputation
//! (docs/REPUTATION.md): reachability and latency the relay cannot fake.
//!
//! One instance probes per round: the round holds a Postgres advisory lock,
//! so several registry instances on one database do not multiply the probes.

use std::time::{Duration, Instant};

use ferry_proto::wire::io::{read_frame, write_frame};
use ferry_proto::wire::{Frame, WIRE_VERSION, transcript};
use ferry_proto::{PublicKey, SecretKey};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::{AppState, reputation};

/// The longest one probe (connect and handshake) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Probes in flight at once.
pub const PROBE_CONCURRENCY: usize = 32;
/// Probe results older than this are forgotten.
const PROBE_RETENTION: &str = "7 days";
/// The advisory lock that makes one instance probe per round.
const PROBE_LOCK: i64 = 0x6665_7272_7970;

/// Probes every registered relay each `interval`, forever.
pub(crate) async fn run(state: AppState, interval: Duration) {
    let key = match SecretKey::generate() {
        Ok(key) => key,
        Err(error) => {
            tracing::error!(%error, "no randomness for the probe key; relays are not probed");
            return;
        }
    };
    let mut timer = tokio::time::interval(interval);
    loop {
        timer.tick().await;
        if let Err(error) = round(&state, &key).await {
            tracing::warn!(%error, "probing relays failed");
        }
    }
}

async fn round(state: &AppState, key: &SecretKey) -> Result<(), sqlx::Error> {
    let pool = state.ledger.pool();
    let mut lock = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(PROBE_LOCK)
        .fetch_one(&mut *lock)
        .await?;
    if !locked {
        return Ok(());
    }
    let probed = probe_all(state, key).await;
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(PROBE_LOCK).execute(&mut *lock).await?;
    probed
}

async fn probe_all(state: &AppState, me: &SecretKey) -> Result<(), sqlx::Error> {
    let pool = state.ledger.pool();
    let relays: Vec<(Vec<u8>, String)> =
        sqlx::query_as("SELECT key_bytes, address FROM relays").fetch_all(pool).await?;
    let mut tasks = JoinSet::new();
    // Each relay's key, parsed once (none for a row that is not a key, which
    // validation at publication rules out), and its round trip if it answered.
    type Probed = (Vec<u8>, Option<PublicKey>, Option<f64>);
    let mut results: Vec<Probed> = Vec::with_capacity(relays.len());
    for (key_bytes, address) in relays {
        if tasks.len() >= PROBE_CONCURRENCY
            && let Some(Ok(result)) = tasks.join_next().await
        {
            results.push(result);
        }
        let me = me.clone();
        tasks.spawn(async move {
            let relay = <[u8; 32]>::try_from(key_bytes.as_slice())
                .ok()
                .and_then(|bytes| PublicKey::from_bytes(&bytes).ok());
            let rtt_ms = match &relay {
                Some(relay) => probe(&address, relay, &me).await,
                None => None,
            };
            (key_bytes, relay, rtt_ms)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok(result) = joined {
            results.push(result);
        }
    }
    let keys: Vec<&[u8]> = results.iter().map(|(key, _, _)| key.as_slice()).collect();
    let oks: Vec<bool> = results.iter().map(|(_, _, rtt)| rtt.is_some()).collect();
    let rtts: Vec<Option<f64>> = results.iter().map(|(_, _, rtt)| *rtt).collect();
    sqlx::query(
        "INSERT INTO relay_probes (key_bytes, ok, rtt_ms) \
         SELECT * FROM unnest($1::bytea[], $2::bool[], $3::float8[]) ON CONFLICT DO NOTHING",
    )
    .bind(&keys)
    .bind(&oks)
    .bind(&rtts)
    .execute(pool)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM relay_probes WHERE at < now() - interval '{PROBE_RETENTION}'"
    )))
    .execute(pool)
    .await?;
    for relay in results.iter().filter_map(|(_, relay, _)| relay.as_ref()) {
        reputation::recompute(pool, relay).await?;
    }
    Ok(())
}

/// Connects to `address` and checks that the relay there proves `expected`;
/// returns the round trip (connect to the relay's signed hello) in ms.
pub(crate) async fn probe(address: &str, expected: &PublicKey, me: &SecretKey) -> Option<f64> {
    let attempt = async {
        let started = Instant::now();
        let mut stream = TcpStream::connect(address).await.ok()?;
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).ok()?;
        let client = me.public();
        let hello = Frame::ClientHello { version: WIRE_VERSION, client, nonce };
        write_frame(&mut stream, &hello).await.ok()?;
        let Frame::RelayHello { version, relay, nonce: relay_nonce, signature } =
            read_frame(&mut stream).await.ok()?
        else {
            return None;
        };
        let elapsed = started.elapsed();
        let signed = transcript(b'R', version, &client, &nonce, &relay, &relay_nonce);
        (relay == *expected && relay.verify(&signed, &signature).is_ok())
            .then_some(elapsed.as_secs_f64() * 1000.0)
    };
    tokio::time::timeout(PROBE_TIMEOUT, attempt).await.ok().flatten()
}
