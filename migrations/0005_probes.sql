-- The registry's own probes of relays: connect and handshake, proving the
-- advertised key, with the round trip time when it worked.
CREATE TABLE relay_probes (
    key_bytes  BYTEA NOT NULL,
    at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    ok         BOOLEAN NOT NULL,
    rtt_ms     DOUBLE PRECISION CHECK (rtt_ms IS NULL OR rtt_ms >= 0),
    PRIMARY KEY (key_bytes, at)
);

ALTER TABLE relays
    ADD COLUMN reachability_24h DOUBLE PRECISION NOT NULL DEFAULT 0.5,
    ADD COLUMN probe_rtt_ms DOUBLE PRECISION;
