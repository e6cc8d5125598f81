-- pgbroker schema, version 3: queryable result metadata.
-- The encoded meta in results.value stays the source of truth for Celery (result,
-- traceback, children, extended fields, in the app's serializer); these columns
-- copy its scalar fields so that results can be searched with plain SQL.

ALTER TABLE {schema}.results
    ADD COLUMN task_id   text,
    ADD COLUMN name      text,
    ADD COLUMN worker    text,
    ADD COLUMN queue     text,
    ADD COLUMN retries   integer,
    ADD COLUMN group_id  text,
    ADD COLUMN parent_id text,
    ADD COLUMN date_done timestamptz;
CREATE INDEX results_task_id_idx ON {schema}.results (task_id) WHERE task_id IS NOT NULL;
CREATE INDEX counters_expires_idx ON {schema}.counters (expires_at) WHERE expires_at IS NOT NULL;
