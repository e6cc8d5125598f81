-- pgbroker schema, version 8: cluster-wide queue controls, and jobs' attempt budget.

-- A paused queue is not claimed from (jobs already running finish). `concurrency`
-- caps its executing jobs across every worker; `rate_limit` jobs may start per
-- `rate_period` seconds, counted in windows of that length (`rate_window` is the
-- current window's number, epoch / period; `rate_count` the jobs claimed in it).
-- The claim locks the row of a limited queue, so limits hold however many workers claim.
ALTER TABLE {schema}.queues
    ADD COLUMN paused      boolean NOT NULL DEFAULT false,
    ADD COLUMN concurrency integer CHECK (concurrency > 0),
    ADD COLUMN rate_limit  integer CHECK (rate_limit > 0),
    ADD COLUMN rate_period float8 CHECK (rate_period > 0),
    ADD COLUMN rate_window bigint NOT NULL DEFAULT 0,
    ADD COLUMN rate_count  integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT queues_rate_check CHECK ((rate_limit IS NULL) = (rate_period IS NULL));

-- Executing jobs by queue (the concurrency limit counts them) and owner (the rescuer).
DROP INDEX {schema}.jobs_executing_idx;
CREATE INDEX jobs_executing_idx ON {schema}.jobs (queue, attempted_by) WHERE state = 'executing';
