-- Event store: the postgres-es table layout plus a global position for checkpointed catch-up.
-- position follows insert order and has gaps; tx_id (the writing transaction) lets readers take
-- only events of transactions that can no longer commit below them (see docs/ARCHITECTURE.md).
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    position       bigserial                    NOT NULL UNIQUE,
    tx_id          xid8                         NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE INDEX events_catch_up ON events (tx_id, position);

-- Where each catch-up consumer (projections, …) has read up to: (tx_id, position) order.
CREATE TABLE consumer_checkpoints
(
    consumer   text PRIMARY KEY,
    tx_id      bigint      NOT NULL,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL
);

-- The database-backed queue used when no SQS queue is configured.
CREATE TABLE local_queue
(
    id            bigserial PRIMARY KEY,
    body          text        NOT NULL,
    visible_at    timestamptz NOT NULL,
    receive_count integer     NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL
);
CREATE INDEX local_queue_visible ON local_queue (visible_at);

-- Read models (projections), named after what the platform reads.
CREATE TABLE device_bulk_change
(
    id                   bigint PRIMARY KEY,
    tenant_id            bigint      NOT NULL,
    service_provider_id  bigint      NOT NULL,
    change_request_type  text        NOT NULL,
    integration          text        NOT NULL,
    status               text        NOT NULL,
    status_details       text,
    requested_by         text,
    workflow_name        text        NOT NULL,
    workflow_version     integer     NOT NULL,
    workflow_hash        text        NOT NULL,
    total                bigint      NOT NULL,
    processed            bigint      NOT NULL DEFAULT 0,
    failed               bigint      NOT NULL DEFAULT 0,
    billing_warnings     bigint      NOT NULL DEFAULT 0,
    created_date         timestamptz NOT NULL,
    started_date         timestamptz,
    processed_date       timestamptz,
    processed_by         text,
    last_sequence        bigint      NOT NULL
);

CREATE TABLE m2m_device_change
(
    id                   bigint PRIMARY KEY,
    bulk_change_id       bigint      NOT NULL,
    tenant_id            bigint      NOT NULL,
    service_provider_id  bigint      NOT NULL,
    iccid                text        NOT NULL,
    msisdn               text,
    change_request       text        NOT NULL,
    status               text        NOT NULL,
    status_details       text,
    is_processed         boolean     NOT NULL DEFAULT false,
    has_errors           boolean     NOT NULL DEFAULT false,
    rev_service_id       bigint,
    attempts             integer     NOT NULL DEFAULT 0,
    processed_date       timestamptz,
    processed_by         text,
    last_sequence        bigint      NOT NULL
);
CREATE INDEX m2m_device_change_bulk ON m2m_device_change (bulk_change_id, status);

CREATE TABLE device_bulk_change_log
(
    bulk_change_id         bigint      NOT NULL,
    event_sequence         bigint      NOT NULL,
    m2m_device_change_id   bigint,
    log_entry_description  text        NOT NULL,
    request_text           text,
    response_text          text,
    error_text             text,
    has_errors             boolean     NOT NULL,
    response_status        text        NOT NULL,
    processed_by           text,
    processed_date         timestamptz NOT NULL,
    PRIMARY KEY (bulk_change_id, event_sequence)
);
CREATE INDEX device_bulk_change_log_device ON device_bulk_change_log (m2m_device_change_id);
