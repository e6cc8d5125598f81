-- pgbroker schema, version 5: exchanges and bindings shared by every process,
-- expiring queues, and who cancelled a job.

-- Exchanges declared through kombu, so that a process that never declared one
-- still routes by its type (fanout, direct, topic).
CREATE TABLE {schema}.exchanges (
    name        text PRIMARY KEY,
    type        text NOT NULL,
    declared_at timestamptz NOT NULL DEFAULT now()
);

-- Queue bindings (kombu queue_bind): a binding made by one process routes the
-- publishes of every other. `pattern` is what kombu's exchange type derived from
-- the routing key (a regular expression for topic exchanges).
CREATE TABLE {schema}.bindings (
    exchange    text NOT NULL,
    routing_key text NOT NULL,
    queue       text NOT NULL REFERENCES {schema}.queues (name) ON DELETE CASCADE,
    pattern     text NOT NULL DEFAULT '',
    bound_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (exchange, routing_key, queue)
);
CREATE INDEX bindings_queue_idx ON {schema}.bindings (queue);

-- x-expires: a queue unused for this long (no live consumer, not declared again)
-- is deleted with its messages and bindings. x-message-ttl: its messages are
-- dropped (non-task messages) or discarded (task messages) once this old.
ALTER TABLE {schema}.queues
    ADD COLUMN expires      interval,
    ADD COLUMN message_ttl  interval,
    ADD COLUMN last_used_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX queues_expires_idx ON {schema}.queues (last_used_at) WHERE expires IS NOT NULL;

-- The queues each live consumer process consumes (they never expire meanwhile).
ALTER TABLE {schema}.consumers ADD COLUMN queues text[] NOT NULL DEFAULT '{}';

-- Who or what cancelled a job (a revoke from remote control, an API call).
ALTER TABLE {schema}.jobs ADD COLUMN cancelled_by text;
