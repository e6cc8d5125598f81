-- pgbroker schema, version 10: a chord counts each header part once.
-- A part delivered again (acks_late and a worker lost after the task's result was
-- stored) must not count twice: that would run the chord's callback before its last
-- part, or a second time. Each counted part leaves a row here, kept until it expires
-- with the results (a late duplicate still finds it after the chord completed).
CREATE TABLE {schema}.chord_parts (
    key        text NOT NULL,
    task_id    text NOT NULL,
    expires_at timestamptz,
    PRIMARY KEY (key, task_id)
);
CREATE INDEX chord_parts_expires_idx ON {schema}.chord_parts (expires_at) WHERE expires_at IS NOT NULL;
