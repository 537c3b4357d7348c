//! Reputation: computed by the registry from what it can verify, and every
//! component stored beside the score so clients can judge it. The formula,
//! and why it resists a relay that pays itself, is in docs/REPUTATION.md;
//! the weights and priors here are the ones documented there.

use ferry_proto::PublicKey;
use sqlx::PgPool;

/// A relay younger than this many days may be a newcomer.
pub const NEWCOMER_DAYS: f64 = 7.0;
/// The registry's probes in the last 24 hours a newcomer needs, at least.
pub const NEWCOMER_PROBES: i64 = 3;
/// The share of those probes it answered with its key, and of its minutes
/// with a heartbeat, that a newcomer needs.
pub const NEWCOMER_RELIABILITY: f64 = 0.9;
/// A newcomer's score: just above the default client's bar (0.5), below
/// any relay that has been paid.
pub const NEWCOMER_FLOOR: f64 = 0.55;

/// Recomputes `relay`'s reputation components, score and value score from its
/// heartbeats, its settled volume and its settlement outcomes.
pub(crate) async fn recompute(pool: &PgPool, relay: &PublicKey) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH up AS ( \
             SELECT count(*)::float8 AS minutes FROM relay_uptime \
             WHERE key_bytes = $1 AND minute > now() - interval '24 hours' \
         ), expected AS ( \
             SELECT least(1440, greatest(1, ceil(extract(epoch FROM now() - first_seen) / 60)))::float8 \
                    AS minutes, \
                    extract(epoch FROM now() - first_seen)::float8 / 86400 AS age_days \
             FROM relays WHERE key_bytes = $1 \
         ), per_client AS ( \
             SELECT c.client_key, sum(t.amount) AS volume \
             FROM accounts a \
             JOIN transfers t ON t.credit_account = a.id AND t.kind = 'settlement' \
                              AND t.created_at > now() - interval '30 days' \
             JOIN channels c ON c.id = t.channel_id \
             WHERE a.holder_key = $1 \
             GROUP BY c.client_key \
         ), paid AS ( \
             SELECT coalesce(sum(volume), 0) AS volume, \
                    count(*) FILTER (WHERE volume >= 0.01) AS clients \
             FROM per_client \
         ), vouchers AS ( \
             SELECT count(*) FILTER (WHERE e->>'outcome' = 'settled') AS settled, \
                    count(*) FILTER (WHERE e->>'outcome' = 'rejected') AS rejected \
             FROM operations o, jsonb_array_elements(o.response) e \
             WHERE o.scope_key = $1 AND o.kind = 'settle' \
               AND o.created_at > now() - interval '30 days' \
         ), probes AS ( \
             SELECT count(*) FILTER (WHERE ok) AS ok, count(*) AS total, \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY rtt_ms) FILTER (WHERE ok) AS rtt \
             FROM relay_probes WHERE key_bytes = $1 AND at > now() - interval '24 hours' \
         ), parts AS ( \
             SELECT least(1, (up.minutes + 15) / (expected.minutes + 30)) AS uptime, \
                    (probes.ok + 1)::float8 / (probes.total + 2) AS reachability, \
                    (expected.age_days < $2 AND probes.total >= $3 \
                     AND probes.ok >= $4 * probes.total AND up.minutes >= $4 * expected.minutes \
                     AND vouchers.rejected = 0) AS newcomer, \
                    probes.rtt, coalesce(1 / (1 + probes.rtt / 100), 0.5) AS latency_term, \
                    paid.volume, paid.clients, vouchers.settled, vouchers.rejected, \
                    1 - exp(-paid.clients::float8 / 5) AS clients_term, \
                    1 - exp(-paid.volume::float8 / 10) AS volume_term, \
                    vouchers.rejected::float8 / (vouchers.settled + vouchers.rejected + 10) AS reject_rate, \
                    1 - exp(-expected.age_days / 30) AS age_term \
             FROM up, expected, paid, vouchers, probes \
         ), formula AS ( \
             SELECT *, least(1, greatest(0, 0.35 * uptime * reachability + 0.05 * latency_term \
                                         + 0.25 * clients_term + 0.15 * volume_term \
                                         + 0.10 * (1 - reject_rate) + 0.10 * age_term)) AS earned \
             FROM parts \
         ), scored AS ( \
             SELECT *, CASE WHEN newcomer THEN greatest(earned, $5) ELSE earned END AS score \
             FROM formula \
         ) \
         UPDATE relays SET uptime_24h = scored.uptime, reachability_24h = scored.reachability, \
             probe_rtt_ms = scored.rtt, paid_volume_30d = scored.volume, \
             paying_clients_30d = scored.clients, settled_vouchers_30d = scored.settled, \
             rejected_vouchers_30d = scored.rejected, reputation = scored.score, \
             newcomer = scored.newcomer AND scored.earned < $5, \
             value_score = least(1, scored.score * 0.05 / (0.05 + price_per_byte::float8 * 1073741824)) \
         FROM scored WHERE relays.key_bytes = $1",
    )
    .bind(relay.as_bytes().as_slice())
    .bind(NEWCOMER_DAYS)
    .bind(NEWCOMER_PROBES)
    .bind(NEWCOMER_RELIABILITY)
    .bind(NEWCOMER_FLOOR)
    .execute(pool)
    .await?;
    Ok(())
}
