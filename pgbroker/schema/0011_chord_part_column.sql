-- pgbroker schema, version 11: chord_parts.task_id becomes chord_parts.part.
-- A counted part is a task id and, when Celery gives it, ":<its place in the
-- header>" (one signature used twice in a header is two parts), so the column is
-- named for what it holds. A migration of its own: version 10 is already applied
-- to databases that ran it, and an applied migration is never run again. (For a
-- while version 10 itself named the column part: those databases keep theirs.)
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = {schema_name}
               AND table_name = 'chord_parts' AND column_name = 'task_id') THEN
        ALTER TABLE {schema}.chord_parts RENAME COLUMN task_id TO part;
    END IF;
END $$;
