-- pgbroker schema, version 11: chord_parts.task_id becomes chord_parts.part.
-- A counted part is a task id and, when Celery gives it, ":<its place in the
-- header>" (one signature used twice in a header is two parts), so the column is
-- named for what it holds. A migration of its own: version 10 is already applied
-- to databases that ran it, and an applied migration is never run again.
ALTER TABLE {schema}.chord_parts RENAME COLUMN task_id TO part;
