-- pgbroker schema, version 12: auto-delete queues (kombu's Queue(auto_delete=True),
-- exclusive queues, Celery's Broadcast queues). A broker deletes such a queue when
-- its last consumer goes; here the sweep deletes it once it has been consumed and no
-- live consumer has listed it (nor has anyone declared it) for a grace period, so
-- the per-process queue of a worker that stopped or crashed does not collect every
-- later broadcast for ever.
ALTER TABLE {schema}.queues
    ADD COLUMN auto_delete boolean NOT NULL DEFAULT false,
    ADD COLUMN consumed    boolean NOT NULL DEFAULT false;
