-- AuthPool on PostgreSQL, version 1: the same state as the embedded SQLite
-- store's schema v3, plus the pool row.
--
-- Applied by authpool_server.store.postgres.migrate() inside one transaction,
-- under an advisory lock, with search_path set to the pool's schema: names
-- here are unqualified on purpose. Never edit this file once released (its
-- checksum is recorded); add 0002_*.sql instead.
--
-- Times are POSIX seconds (double precision, exactly the floats the server
-- holds); money is integer micro-units (bigint); JSON columns hold lists of
-- pairs, so their order survives.

-- The pool row: the counters that must never go back (pruning old rows does
-- not lower them) and the single-writer guard. This is also the row a
-- decision will lock (SELECT ... FOR UPDATE) when several replicas share the
-- schema, so that sequence numbers are assigned under it in commit order.
CREATE TABLE pool_state (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    fencing_token bigint  NOT NULL DEFAULT 0 CHECK (fencing_token >= 0),
    last_sequence bigint  NOT NULL DEFAULT 0 CHECK (last_sequence >= 0),
    -- Bumped by every server that opens the store; a write from an older
    -- opener is refused (one writer per schema until replicas are supported).
    writer_epoch  bigint  NOT NULL DEFAULT 0
);
INSERT INTO pool_state DEFAULT VALUES;

-- Live leases (ended_at IS NULL) and, for a while, ended ones (for late usage).
CREATE TABLE leases (
    lease_id        text             PRIMARY KEY,
    client_id       text             NOT NULL,
    session_id      text             NOT NULL,
    subscription_id text             NOT NULL,
    fallback        boolean          NOT NULL,
    granted_at      double precision NOT NULL,
    expires_at      double precision NOT NULL,
    fencing_token   bigint           NOT NULL,
    acked_token     bigint           NOT NULL,
    last_used_at    double precision NOT NULL,
    wanted_type     text             NOT NULL,
    labels          jsonb            NOT NULL,  -- [[key, value], ...]
    history         jsonb            NOT NULL,  -- [[fencing token, subscription id], ...]
    ended_at        double precision
);
CREATE INDEX leases_ended_at ON leases (ended_at) WHERE ended_at IS NOT NULL;

-- Usage reports, idempotent by the caller's request id.
CREATE TABLE usage (
    request_id             text             PRIMARY KEY,
    lease_id               text             NOT NULL,
    client_id              text             NOT NULL,
    subscription_id        text             NOT NULL,
    fallback               boolean          NOT NULL,
    at                     double precision NOT NULL,
    cost_micros            bigint           NOT NULL,
    input_tokens           bigint           NOT NULL,
    output_tokens          bigint           NOT NULL,
    model                  text             NOT NULL,
    outcome                text             NOT NULL,
    provider_remaining_ppm integer,
    provider_reset_at      double precision NOT NULL DEFAULT 0
);
CREATE INDEX usage_at ON usage (at);

-- What operators set on subscriptions (drain, resume).
CREATE TABLE subscription_flags (
    subscription_id text             PRIMARY KEY,
    draining        boolean          NOT NULL,
    resumed_at      double precision NOT NULL
);

-- The event log, and the replication log replicas will follow. Sequence
-- numbers are assigned by the writer (never a SEQUENCE, which has gaps).
CREATE TABLE events (
    sequence        bigint           PRIMARY KEY CHECK (sequence > 0),
    at              double precision NOT NULL,
    type            text             NOT NULL,
    subscription_id text             NOT NULL,
    client_id       text             NOT NULL,
    lease_id        text             NOT NULL,
    fencing_token   bigint           NOT NULL,
    attributes      jsonb            NOT NULL  -- [[key, value], ...]
);
CREATE INDEX events_at ON events (at);

-- Webhook notifications: written with the event that caused them, then
-- upserted with every delivery attempt. `body` is text, not jsonb: it is the
-- exact bytes that were signed and must be sent again unchanged.
CREATE TABLE outbox (
    notification_id text             PRIMARY KEY,
    event_sequence  bigint           NOT NULL,
    rule            text             NOT NULL,
    severity        text             NOT NULL,
    body            text             NOT NULL,
    state           text             NOT NULL,
    attempts        integer          NOT NULL,
    next_attempt_at double precision NOT NULL,
    last_error      text             NOT NULL,
    updated_at      double precision NOT NULL
);
CREATE INDEX outbox_state ON outbox (state, updated_at);
