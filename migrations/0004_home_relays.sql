-- Each client's newest signed list of home relays: where peers reach it.
CREATE TABLE home_relays (
    client_key    BYTEA PRIMARY KEY CHECK (octet_length(client_key) = 32),
    home          JSONB NOT NULL,
    issued_at_ms  BIGINT NOT NULL CHECK (issued_at_ms >= 0),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
