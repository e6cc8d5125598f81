-- pgbroker schema, version 7: finished jobs are found by state and finish time, so
-- the pruner deletes old ones in small index-ordered batches (no table scans, no
-- long locks).
CREATE INDEX jobs_finished_idx ON {schema}.jobs (state, coalesce(completed_at, discarded_at, cancelled_at))
    WHERE state IN ('completed', 'discarded', 'cancelled');
CREATE INDEX beat_fires_done_idx ON {schema}.beat_fires (fired_at) WHERE done;
