-- Shadow tables `bulkflow rebuild` fills from the events and then swaps with the live ones.
CREATE TABLE device_bulk_change_rebuild
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

CREATE TABLE m2m_device_change_rebuild
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
CREATE INDEX m2m_device_change_bulk_rebuild ON m2m_device_change_rebuild (bulk_change_id, status);

CREATE TABLE device_bulk_change_log_rebuild
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
CREATE INDEX device_bulk_change_log_device_rebuild ON device_bulk_change_log_rebuild (m2m_device_change_id);
