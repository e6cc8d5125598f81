-- pgbroker schema, version 4: chord sizes.
-- The number of header parts that complete a chord, as Celery's canvas counts them
-- (set_chord_size): a chain ending in a group inside a header counts each of its tasks.
ALTER TABLE {schema}.counters ADD COLUMN size integer;
