-- Carrier limits shared by every worker on this database, per account (`pond:<distributor id>`,
-- `rev:<client code>`). Times are seconds since the epoch on the database's clock, the one clock
-- all workers agree on.
--
-- rate_limits: the account's pace. Calls go out in slots `1 / rate` apart from `next_at` on (a
-- GCRA timeline all workers reserve slices of); a 429 sets `held_until` (the carrier's wait hint,
-- capped) and lowers `rate` once per `generation`; the rate climbs back while calls succeed.
CREATE TABLE rate_limits (
    key text PRIMARY KEY,
    configured_rate double precision NOT NULL,
    rate double precision NOT NULL,
    ceiling double precision,
    next_at double precision NOT NULL,
    held_until double precision NOT NULL DEFAULT 0,
    climbed_at double precision NOT NULL,
    generation bigint NOT NULL DEFAULT 0,
    throttled bigint NOT NULL DEFAULT 0,
    max_concurrency integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- rate_limit_shares: each worker's share of the account's concurrency, a lease it renews every
-- half second; a share past `expires_at` (its worker died) no longer counts.
CREATE TABLE rate_limit_shares (
    key text NOT NULL REFERENCES rate_limits (key),
    owner text NOT NULL,
    wanted integer NOT NULL,
    slots integer NOT NULL,
    expires_at double precision NOT NULL,
    PRIMARY KEY (key, owner)
);
