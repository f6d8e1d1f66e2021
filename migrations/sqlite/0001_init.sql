-- Event store: the postgres-es table layout plus a global position for checkpointed catch-up.
-- position is assigned by a trigger, in commit order.
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       integer CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        text                         NOT NULL,
    metadata       text                         NOT NULL,
    position       integer,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE UNIQUE INDEX events_position ON events (position);
-- SQLite runs one write transaction at a time, so positions follow commit order.
CREATE TRIGGER events_assign_position AFTER INSERT ON events WHEN NEW.position IS NULL
BEGIN
    UPDATE events SET position = (SELECT COALESCE(MAX(position), 0) + 1 FROM events)
     WHERE rowid = NEW.rowid;
END;

-- Where each catch-up consumer (projections, …) has read up to: (tx_id, position) order.
CREATE TABLE consumer_checkpoints
(
    consumer   text PRIMARY KEY,
    tx_id      integer      NOT NULL,
    position   integer      NOT NULL,
    updated_at text NOT NULL
);

-- The database-backed queue used when no SQS queue is configured.
CREATE TABLE local_queue
(
    id            integer PRIMARY KEY AUTOINCREMENT,
    body          text        NOT NULL,
    visible_at    text NOT NULL,
    receive_count integer     NOT NULL DEFAULT 0,
    created_at    text NOT NULL
);
CREATE INDEX local_queue_visible ON local_queue (visible_at);

-- Read models (projections), named after what the platform reads.
CREATE TABLE device_bulk_change
(
    id                   integer PRIMARY KEY,
    tenant_id            integer      NOT NULL,
    service_provider_id  integer      NOT NULL,
    change_request_type  text        NOT NULL,
    integration          text        NOT NULL,
    status               text        NOT NULL,
    status_details       text,
    requested_by         text,
    workflow_name        text        NOT NULL,
    workflow_version     integer     NOT NULL,
    workflow_hash        text        NOT NULL,
    total                integer      NOT NULL,
    processed            integer      NOT NULL DEFAULT 0,
    failed               integer      NOT NULL DEFAULT 0,
    billing_warnings     integer      NOT NULL DEFAULT 0,
    created_date         text NOT NULL,
    started_date         text,
    processed_date       text,
    processed_by         text,
    last_sequence        integer      NOT NULL
);

CREATE TABLE m2m_device_change
(
    id                   integer PRIMARY KEY,
    bulk_change_id       integer      NOT NULL,
    tenant_id            integer      NOT NULL,
    service_provider_id  integer      NOT NULL,
    iccid                text        NOT NULL,
    msisdn               text,
    change_request       text        NOT NULL,
    status               text        NOT NULL,
    status_details       text,
    is_processed         integer     NOT NULL DEFAULT 0,
    has_errors           integer     NOT NULL DEFAULT 0,
    rev_service_id       integer,
    attempts             integer     NOT NULL DEFAULT 0,
    processed_date       text,
    processed_by         text,
    last_sequence        integer      NOT NULL
);
CREATE INDEX m2m_device_change_bulk ON m2m_device_change (bulk_change_id, status);

CREATE TABLE device_bulk_change_log
(
    bulk_change_id         integer      NOT NULL,
    event_sequence         integer      NOT NULL,
    m2m_device_change_id   integer,
    log_entry_description  text        NOT NULL,
    request_text           text,
    response_text          text,
    error_text             text,
    has_errors             integer     NOT NULL,
    response_status        text        NOT NULL,
    processed_by           text,
    processed_date         text NOT NULL,
    PRIMARY KEY (bulk_change_id, event_sequence)
);
CREATE INDEX device_bulk_change_log_device ON device_bulk_change_log (m2m_device_change_id);
