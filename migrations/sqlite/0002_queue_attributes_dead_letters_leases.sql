-- Message attributes on the local queue (the legacy message carries its data in them).
ALTER TABLE local_queue ADD COLUMN attributes text NOT NULL DEFAULT '{}';

-- Messages the local queue could not process, with the reason (the local dead-letter queue).
CREATE TABLE local_dead_letters
(
    id            integer PRIMARY KEY AUTOINCREMENT,
    body          text        NOT NULL,
    attributes    text        NOT NULL,
    reason        text        NOT NULL,
    receive_count integer     NOT NULL,
    failed_at     text NOT NULL
);

-- Which worker drives a bulk change: one at a time; a dead worker's lease expires.
CREATE TABLE bulk_change_leases
(
    bulk_change_id integer PRIMARY KEY,
    owner          text        NOT NULL,
    expires_at     text NOT NULL
);
