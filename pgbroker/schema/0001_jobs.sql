-- pgbroker schema, version 1: jobs, queues, consumers.
-- {schema} is the validated, quoted schema name; {schema_name} the same name as a literal.

CREATE TYPE {schema}.job_state AS ENUM (
    'available', 'scheduled', 'executing', 'retryable', 'completed', 'discarded', 'cancelled'
);

-- One row per message; for Celery tasks one row per task id across retries.
CREATE TABLE {schema}.jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id          text,
    queue            text NOT NULL,
    task             text,
    state            {schema}.job_state NOT NULL DEFAULT 'available',
    -- kombu/RabbitMQ priority: 0..9, higher is delivered first.
    priority         smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    -- deliveries so far (claims), including Celery retries and rescues.
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer,
    redelivered      boolean NOT NULL DEFAULT false,
    -- the consumer acknowledged the delivery before the task finished (task_acks_late=False).
    acked            boolean NOT NULL DEFAULT false,
    scheduled_at     timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz,
    inserted_at      timestamptz NOT NULL DEFAULT now(),
    attempted_at     timestamptz,
    completed_at     timestamptz,
    discarded_at     timestamptz,
    cancelled_at     timestamptz,
    attempted_by     text,
    -- one entry per failed attempt or final reason: {attempt, at, error, traceback?}
    errors           jsonb NOT NULL DEFAULT '[]',
    -- the kombu message, unchanged (headers/properties in kombu's JSON dialect).
    headers          jsonb NOT NULL DEFAULT '{}',
    properties       jsonb NOT NULL DEFAULT '{}',
    body             text NOT NULL,
    content_type     text,
    content_encoding text,
    meta             jsonb NOT NULL DEFAULT '{}'
) WITH (
    -- rows are updated in place several times (claim, ack, settle): leave room for HOT updates,
    -- and vacuum the hot table early.
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);

-- Celery reuses a task id for its retries: the retry message replaces the job's message.
CREATE UNIQUE INDEX jobs_task_id_key ON {schema}.jobs (task_id) WHERE task_id IS NOT NULL;
-- The claim: available rows of a queue in delivery order.
CREATE INDEX jobs_claim_idx ON {schema}.jobs (queue, priority DESC, id) WHERE state = 'available';
-- The stager: scheduled/retryable rows by due time.
CREATE INDEX jobs_due_idx ON {schema}.jobs (scheduled_at) WHERE state IN ('scheduled', 'retryable');
-- The rescuer: executing rows by owner.
CREATE INDEX jobs_executing_idx ON {schema}.jobs (attempted_by) WHERE state = 'executing';
-- Expiry of undelivered rows.
CREATE INDEX jobs_expires_idx ON {schema}.jobs (expires_at)
    WHERE expires_at IS NOT NULL AND state IN ('available', 'scheduled', 'retryable');

-- Queues declared through kombu (queue_declare), with their declaration arguments.
CREATE TABLE {schema}.queues (
    name        text PRIMARY KEY,
    arguments   jsonb NOT NULL DEFAULT '{}',
    declared_at timestamptz NOT NULL DEFAULT now()
);

-- Live consumer processes and their open broker connections. jobs.attempted_by is
-- '<consumer id>#<connection>'. A job whose connection closed and that was never
-- acknowledged goes back to its queue; a job of a process that stopped heartbeating
-- is rescued whatever its state.
CREATE TABLE {schema}.consumers (
    id           text PRIMARY KEY,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    connections  text[] NOT NULL DEFAULT '{}',
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- LISTEN/NOTIFY channel of a queue: an identifier of at most 63 bytes whatever the queue name.
-- pgbroker.notify.channel_name() computes the same in Python.
CREATE FUNCTION {schema}.notify_channel(queue text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT 'pgb_' || left(md5({schema_name} || ':' || queue), 32) $$;
