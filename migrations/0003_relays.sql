-- The relay market: each relay's newest signed advertisement, its heartbeats,
-- and its reputation (docs/REPUTATION.md). Reputation and value scores are
-- scores in [0, 1], not money, so they are double precision.
CREATE TABLE relays (
    key_bytes              BYTEA PRIMARY KEY CHECK (octet_length(key_bytes) = 32),
    advert                 JSONB NOT NULL,
    address                TEXT NOT NULL,
    price_per_byte         NUMERIC NOT NULL CHECK (price_per_byte >= 0 AND scale(price_per_byte) <= 18),
    region                 TEXT NOT NULL,
    issued_at_ms           BIGINT NOT NULL CHECK (issued_at_ms >= 0),
    first_seen             TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_heartbeat         TIMESTAMPTZ,
    load_bytes_per_sec     BIGINT NOT NULL DEFAULT 0 CHECK (load_bytes_per_sec >= 0),
    sessions               BIGINT NOT NULL DEFAULT 0 CHECK (sessions >= 0),
    uptime_24h             DOUBLE PRECISION NOT NULL DEFAULT 0,
    paid_volume_30d        NUMERIC NOT NULL DEFAULT 0,
    paying_clients_30d     BIGINT NOT NULL DEFAULT 0,
    settled_vouchers_30d   BIGINT NOT NULL DEFAULT 0,
    rejected_vouchers_30d  BIGINT NOT NULL DEFAULT 0,
    reputation             DOUBLE PRECISION NOT NULL DEFAULT 0 CHECK (reputation BETWEEN 0 AND 1),
    value_score            DOUBLE PRECISION NOT NULL DEFAULT 0 CHECK (value_score BETWEEN 0 AND 1)
);

CREATE INDEX relays_by_price ON relays (price_per_byte, key_bytes);
CREATE INDEX relays_by_reputation ON relays (reputation, key_bytes);
CREATE INDEX relays_by_value ON relays (value_score, key_bytes);

-- One row per relay per minute in which it sent a heartbeat: uptime.
CREATE TABLE relay_uptime (
    key_bytes BYTEA NOT NULL,
    minute    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (key_bytes, minute)
);

-- Settlement operations are found by relay and age for reputation.
CREATE INDEX operations_by_scope_kind_age ON operations (scope_key, kind, created_at);
