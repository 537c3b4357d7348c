-- Cold start (docs/REPUTATION.md, "A new relay"): whether the relay's score
-- is the newcomer floor, earned from the registry's own probes and
-- heartbeats only.
ALTER TABLE relays ADD COLUMN newcomer BOOLEAN NOT NULL DEFAULT false;
