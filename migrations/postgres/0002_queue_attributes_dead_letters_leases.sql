-- Message attributes on the local queue (the legacy message carries its data in them).
ALTER TABLE local_queue ADD COLUMN attributes text NOT NULL DEFAULT '{}';

-- Messages the local queue could not process, with the reason (the local dead-letter queue).
CREATE TABLE local_dead_letters
(
    id            bigserial PRIMARY KEY,
    body          text        NOT NULL,
    attributes    text        NOT NULL,
    reason        text        NOT NULL,
    receive_count integer     NOT NULL,
    failed_at     timestamptz NOT NULL
);

-- Which worker drives a bulk change: one at a time; a dead worker's lease expires.
CREATE TABLE bulk_change_leases
(
    bulk_change_id bigint PRIMARY KEY,
    owner          text        NOT NULL,
    expires_at     timestamptz NOT NULL
);
