-- pgbroker schema, version 6: beat entries and their fires, unique jobs, trigger bookkeeping.

-- Periodic entries (celery beat), editable at run time. `schedule` is pgbroker.beat's
-- JSON form of the schedule ({"every": s}, {"cron": …, "tz": …}, {"solar": …}, {"at": …});
-- `next_fire_at` is computed by Python from it and is NULL when nothing is left to fire
-- (a one-off entry that fired). `source` = 'config' for entries synced from beat_schedule.
CREATE TABLE {schema}.beat_entries (
    name              text PRIMARY KEY,
    task              text NOT NULL,
    schedule          jsonb NOT NULL,
    args              jsonb NOT NULL DEFAULT '[]',
    kwargs            jsonb NOT NULL DEFAULT '{}',
    options           jsonb NOT NULL DEFAULT '{}',
    -- Fires older than the beat's grace when it gets to them (beat down, entry locked):
    -- 'skip' them, run the 'latest' one once, or run 'all' of them (at most max_missed).
    missed            text NOT NULL DEFAULT 'latest' CHECK (missed IN ('skip', 'latest', 'all')),
    max_missed        integer NOT NULL DEFAULT 100 CHECK (max_missed > 0),
    -- Re-enabling counts the fires of the disabled time as missed (else it waits for the next).
    catch_up_on_enable boolean NOT NULL DEFAULT false,
    enabled           boolean NOT NULL DEFAULT true,
    source            text NOT NULL DEFAULT 'api',
    -- A trigger entry scans an application table on each fire (pgbroker.beat.Trigger).
    trigger           jsonb,
    anchor_at         timestamptz NOT NULL DEFAULT now(),
    next_fire_at      timestamptz,
    last_fire_at      timestamptz,
    run_requested_at  timestamptz,
    -- why the last attempt to fire failed (cleared by the next fire that works)
    last_error        text,
    fires             bigint NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX beat_entries_due_idx ON {schema}.beat_entries (next_fire_at) WHERE enabled;

-- One row per fire of an entry: the primary key is what makes each fire happen once,
-- whichever beat process gets to it. A trigger's fire scans pages of its table and
-- records its progress in `cursor` until `done`.
CREATE TABLE {schema}.beat_fires (
    entry     text NOT NULL,
    fire_at   timestamptz NOT NULL,
    fired_at  timestamptz NOT NULL DEFAULT now(),
    fired_by  text,
    task_id   text,
    manual    boolean NOT NULL DEFAULT false,
    cursor    jsonb,
    enqueued  integer NOT NULL DEFAULT 0,
    done      boolean NOT NULL DEFAULT true,
    PRIMARY KEY (entry, fire_at)
);
CREATE INDEX beat_fires_open_idx ON {schema}.beat_fires (entry) WHERE NOT done;

-- Unique jobs: a job published with a `pgbroker_unique` header ({"key", "states",
-- "period"}) holds its key while its state is one of `unique_states` and, with a
-- period, until `unique_until`. The index is the constraint: a second publish of a
-- held key is not stored (ON CONFLICT DO NOTHING). A key whose holder left those
-- states or outlived its period is released by the next publish of that key.
-- `meta` takes the `pgbroker_meta` header.
ALTER TABLE {schema}.jobs
    ADD COLUMN unique_key    text,
    ADD COLUMN unique_states {schema}.job_state[],
    ADD COLUMN unique_until  timestamptz;
CREATE UNIQUE INDEX jobs_unique_key ON {schema}.jobs (unique_key) WHERE unique_key IS NOT NULL;

-- Rows a `trigger_once` trigger has enqueued a job for, ever.
CREATE TABLE {schema}.trigger_rows (
    trigger     text NOT NULL,
    row_key     text NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (trigger, row_key)
);
