-- pgbroker schema, version 2: Celery results (key/value, as Celery's key-value backends
-- store them) and counters (chord completion).

CREATE TABLE {schema}.results (
    key        text PRIMARY KEY,
    -- Celery state of a task result (SUCCESS, FAILURE, …); NULL for group metadata.
    state      text,
    -- the encoded result meta, as the app's result_serializer produced it.
    value      bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz
);
CREATE INDEX results_expires_idx ON {schema}.results (expires_at) WHERE expires_at IS NOT NULL;

-- Atomic counters; a chord's header parts increment one each.
CREATE TABLE {schema}.counters (
    key        text PRIMARY KEY,
    value      bigint NOT NULL,
    expires_at timestamptz
);
