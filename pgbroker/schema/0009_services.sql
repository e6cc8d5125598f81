-- pgbroker schema, version 9: leader-run services run once per interval cluster-wide.
-- Each run of a service first claims its row here with a conditional update (last run
-- at least about an interval ago); a process that finds it taken skips that run.
CREATE TABLE {schema}.services (
    name   text PRIMARY KEY,
    ran_at timestamptz NOT NULL DEFAULT '-infinity',
    ran_by text
);
INSERT INTO {schema}.services (name) VALUES ('rescue'), ('prune-jobs'), ('prune-results');
