-- The double-entry ledger: accounts, idempotent operations, immutable
-- transfers and payment channels. docs/LEDGER.md explains the model and each
-- invariant; `ferry ledger check` verifies them.
--
-- Money columns are NUMERIC with at most 18 fraction digits and are read and
-- written by ferry as exact decimal text, never as floating point.

CREATE TABLE accounts (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- world: the outside world (deposits come from it, withdrawals go to it);
    -- treasury: the registry's fees; holder: an ed25519 key's own money, as a
    -- client and as a relay; escrow: one payment channel's locked funds.
    kind        TEXT NOT NULL CHECK (kind IN ('world', 'treasury', 'holder', 'escrow')),
    holder_key  BYTEA UNIQUE CHECK (octet_length(holder_key) = 32),
    balance     NUMERIC NOT NULL DEFAULT 0 CHECK (scale(balance) <= 18),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((kind = 'holder') = (holder_key IS NOT NULL)),
    -- Only the outside world's balance goes below zero: it is minus all the
    -- money deposited into the ledger and not withdrawn.
    CHECK (kind = 'world' OR balance >= 0)
);

CREATE UNIQUE INDEX accounts_one_world_and_treasury ON accounts (kind)
    WHERE kind IN ('world', 'treasury');

INSERT INTO accounts (kind) VALUES ('world'), ('treasury');

-- One row per idempotent request. The row is claimed first in the request's
-- transaction, so a concurrent retry waits for it and then replays the
-- stored response instead of moving money again.
CREATE TABLE operations (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scope_key       BYTEA NOT NULL CHECK (octet_length(scope_key) = 32),
    idempotency_key TEXT NOT NULL,
    kind            TEXT NOT NULL,
    request_hash    BYTEA NOT NULL CHECK (octet_length(request_hash) = 32),
    response        JSONB,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (scope_key, idempotency_key)
);

CREATE TABLE channels (
    id                 BYTEA PRIMARY KEY CHECK (octet_length(id) = 32),
    client_key         BYTEA NOT NULL CHECK (octet_length(client_key) = 32),
    relay_key          BYTEA NOT NULL CHECK (octet_length(relay_key) = 32),
    nonce              BYTEA NOT NULL CHECK (octet_length(nonce) = 8),
    escrow_account     BIGINT NOT NULL UNIQUE REFERENCES accounts (id),
    state              TEXT NOT NULL CHECK (state IN ('open', 'closing', 'closed')),
    -- Everything the client put in, everything paid out for vouchers (to the
    -- relay and as fees), and what was returned to the client at the end.
    deposited          NUMERIC NOT NULL CHECK (deposited > 0 AND scale(deposited) <= 18),
    settled            NUMERIC NOT NULL DEFAULT 0 CHECK (settled >= 0 AND scale(settled) <= 18),
    refunded           NUMERIC NOT NULL DEFAULT 0 CHECK (refunded >= 0 AND scale(refunded) <= 18),
    last_sequence      BIGINT NOT NULL DEFAULT 0 CHECK (last_sequence >= 0),
    opened_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    close_requested_at TIMESTAMPTZ,
    dispute_deadline   TIMESTAMPTZ,
    closed_at          TIMESTAMPTZ,
    CHECK (client_key <> relay_key),
    CHECK (settled + refunded <= deposited),
    CHECK ((state = 'open') = (dispute_deadline IS NULL) OR state = 'closed'),
    CHECK ((state = 'closed') = (closed_at IS NOT NULL))
);

CREATE INDEX channels_by_client ON channels (client_key);
CREATE INDEX channels_by_relay ON channels (relay_key);

-- Transfers carry no foreign keys: a per-row foreign-key check costs more
-- than the rest of a settlement's insert together, and the one writer of
-- transfers (ledger/src/postings.rs) has every referenced account locked FOR
-- UPDATE in the same transaction. Accounts, channels and operations are never
-- deleted (see the triggers below), and `ferry ledger check` verifies that
-- every reference resolves.
CREATE TABLE transfers (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    operation_id         BIGINT NOT NULL,
    kind                 TEXT NOT NULL CHECK (kind IN
                             ('deposit', 'withdrawal', 'funding', 'settlement', 'fee', 'refund')),
    debit_account        BIGINT NOT NULL,
    credit_account       BIGINT NOT NULL,
    amount               NUMERIC NOT NULL CHECK (amount > 0 AND scale(amount) <= 18),
    -- Each side's balance right after this transfer, for statements.
    debit_balance_after  NUMERIC NOT NULL,
    credit_balance_after NUMERIC NOT NULL,
    channel_id           BYTEA,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (debit_account <> credit_account)
);

CREATE INDEX transfers_by_debit ON transfers (debit_account, id);
CREATE INDEX transfers_by_credit ON transfers (credit_account, id);
-- No index on channel_id: a channel's transfers are its escrow account's,
-- found through the two indexes above, and every index costs each insert.

-- The ledger is history: transfers are never changed, and no row of any
-- ledger table is ever removed.
CREATE FUNCTION ledger_history_is_permanent() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger history is permanent: % on % is not allowed', TG_OP, TG_TABLE_NAME;
END;
$$;

CREATE TRIGGER transfers_are_immutable BEFORE UPDATE OR DELETE OR TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_history_is_permanent();
CREATE TRIGGER accounts_are_permanent BEFORE DELETE OR TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_history_is_permanent();
CREATE TRIGGER channels_are_permanent BEFORE DELETE OR TRUNCATE ON channels
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_history_is_permanent();
CREATE TRIGGER operations_are_permanent BEFORE DELETE OR TRUNCATE ON operations
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_history_is_permanent();
