-- The registry API's own state. Nonces of signed requests are remembered for
-- the clock-skew window so that a captured request cannot be replayed; every
-- registry instance shares them through this table, so instances stay
-- stateless.
CREATE TABLE request_nonces (
    key_bytes BYTEA NOT NULL CHECK (octet_length(key_bytes) = 32),
    nonce     BYTEA NOT NULL CHECK (octet_length(nonce) = 16),
    seen_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (key_bytes, nonce)
);

CREATE INDEX request_nonces_by_age ON request_nonces (seen_at);
