-- Every statement pgbroker runs against its tables, by name.
-- Format: "-- name: <query>" then comment lines saying what and why, then the statement.
-- "-- fragment: <name>" defines text that queries include as {<name>}.
-- {schema} is the validated, quoted schema; parameters are psycopg's %(name)s, never spliced.

-- fragment: insert_jobs
-- The INSERT shared by every way of storing messages, from a relation `input`
-- (its ON CONFLICT clause and RETURNING follow where it is used). Unique jobs take
-- their key, states and period from the `pgbroker_unique` header; `pgbroker_meta`
-- becomes the job's meta, `pgbroker_max_attempts` its attempt budget.
INSERT INTO {schema}.jobs AS j (task_id, queue, task, state, priority, scheduled_at, expires_at,
                               headers, properties, body, content_type, content_encoding,
                               unique_key, unique_states, unique_until, meta, max_attempts)
SELECT task_id, queue, task,
       CASE WHEN scheduled_at > now() THEN
            CASE WHEN retry THEN 'retryable' ELSE 'scheduled' END
            ELSE 'available' END::{schema}.job_state,
       priority, greatest(coalesce(scheduled_at, now()), now()), expires_at,
       headers, properties, body, content_type, content_encoding,
       headers->'pgbroker_unique'->>'key',
       ARRAY(SELECT jsonb_array_elements_text(headers->'pgbroker_unique'->'states'))::{schema}.job_state[],
       statement_timestamp() + make_interval(secs => (headers->'pgbroker_unique'->>'period')::float8),
       coalesce(headers->'pgbroker_meta', '{}'), (headers->>'pgbroker_max_attempts')::integer
FROM input ORDER BY ord

-- fragment: wake_inserted
-- After `ins`: rows deliverable now wake their queue's listeners to claim. Rows due
-- later send 'scheduled <epoch of the earliest>' instead: a listening process whose
-- stager sleeps past that time wakes it (a countdown can be shorter than its sleep).
-- NOTIFY is transactional, so a caller's rollback also takes the wake-up back.
woke AS (
    SELECT pg_notify({schema}.notify_channel(queue),
                     CASE WHEN ready THEN '' ELSE 'scheduled ' || extract(epoch FROM due) END)
    FROM (SELECT queue, state = 'available' AS ready, min(scheduled_at) AS due FROM ins GROUP BY 1, 2) q
)
SELECT ins.id, ins.task_id FROM ins, (SELECT count(*) FROM woke) w

-- fragment: store_jobs
-- A Celery task id seen before is a retry: its row takes the new message instead
-- of a second row being created, keeping attempt, errors and unique key (a
-- cancelled job stays cancelled).
ins AS (
    {insert_jobs}
    ON CONFLICT (task_id) WHERE task_id IS NOT NULL DO UPDATE SET
        queue = excluded.queue, task = excluded.task, state = excluded.state,
        priority = excluded.priority, scheduled_at = excluded.scheduled_at,
        expires_at = excluded.expires_at, headers = excluded.headers,
        properties = excluded.properties, body = excluded.body,
        content_type = excluded.content_type, content_encoding = excluded.content_encoding,
        attempted_by = NULL, acked = false, completed_at = NULL, discarded_at = NULL
        WHERE j.state <> 'cancelled'
    RETURNING j.id, j.task_id, j.queue, j.state, j.scheduled_at
), {wake_inserted}

-- fragment: many_input
-- Many messages as parallel arrays, one element per message.
WITH input AS (
    SELECT * FROM unnest(
        %(task_ids)s::text[], %(queues)s::text[], %(tasks)s::text[], %(priorities)s::smallint[],
        %(scheduled)s::timestamptz[], %(expires)s::timestamptz[], %(retries)s::boolean[],
        %(headers)s::jsonb[], %(properties)s::jsonb[], %(bodies)s::text[],
        %(content_types)s::text[], %(content_encodings)s::text[]
    ) WITH ORDINALITY AS r(task_id, queue, task, priority, scheduled_at, expires_at, retry,
                           headers, properties, body, content_type, content_encoding, ord)
)

-- fragment: leader
-- Leadership of one run of service %(service)s. The service's advisory lock for this
-- transaction keeps runs from overlapping; with %(lease)s (seconds) the run must also
-- win the service's row in `services` (last run at least 0.9 of that ago, so exactly
-- one of the processes ticking each interval runs it); with %(wait)s (a worker giving
-- back its own jobs at shutdown) it waits for the lock and needs no lease.
leased AS (
    UPDATE {schema}.services SET ran_at = now(), ran_by = %(who)s
    WHERE NOT %(wait)s AND %(lease)s::float8 IS NOT NULL AND name = %(service)s
      AND ran_at <= now() - make_interval(secs => %(lease)s::float8 * 0.9)
    RETURNING 1
), leader AS (
    SELECT CASE WHEN %(wait)s
                THEN (SELECT true FROM pg_advisory_xact_lock(hashtext({schema_name} || ':' || %(service)s)))
                ELSE pg_try_advisory_xact_lock(hashtext({schema_name} || ':' || %(service)s))
                     AND (%(lease)s::float8 IS NULL OR EXISTS (SELECT 1 FROM leased)) END AS ok
)

-- name: enqueue
-- Store one message (the publish hot path: VALUES plans much cheaper than unnest).
WITH input AS (
    SELECT * FROM (VALUES (
        %(task_id)s::text, %(queue)s::text, %(task)s::text, %(priority)s::smallint,
        %(scheduled_at)s::timestamptz, %(expires_at)s::timestamptz, %(retry)s::boolean,
        %(headers)s::jsonb, %(properties)s::jsonb, %(body)s::text,
        %(content_type)s::text, %(content_encoding)s::text, 1
    )) AS r(task_id, queue, task, priority, scheduled_at, expires_at, retry,
            headers, properties, body, content_type, content_encoding, ord)
), {store_jobs};

-- name: enqueue_many
-- Store many messages in one statement.
{many_input}, {store_jobs};

-- name: unique_release
-- Free the unique keys about to be published whose holder left its unique states or
-- outlived its period. Always its own transaction, even for a publish inside the
-- caller's: freeing such a key is right whatever becomes of the publish, and a row
-- lock held until the caller commits would stall the worker recording the holder's
-- outcome. (Concurrent publishers of a key are ordered by the unique index.)
UPDATE {schema}.jobs SET unique_key = NULL
WHERE unique_key = ANY(%(keys)s::text[])
  AND (unique_until <= now() OR NOT (state = ANY(unique_states)));

-- name: enqueue_unique
-- Store unique messages: a key held by another job stores nothing (a concurrent
-- publisher's uncommitted row is waited for, never duplicated).
{many_input}, ins AS (
    {insert_jobs}
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
    RETURNING j.id, j.task_id, j.queue, j.state, j.scheduled_at
), {wake_inserted};

-- name: unique_holders
-- The jobs holding these unique keys.
SELECT unique_key, id, task_id, state FROM {schema}.jobs WHERE unique_key = ANY(%(keys)s::text[]);

-- fragment: pick_available
-- The first %(limit)s deliverable jobs of the queues `q` (name, room: the most to
-- take from it), in delivery order, locked. Each queue is read through
-- jobs_claim_idx in order (the LATERAL keeps the planner on the index whatever the
-- statistics say); SKIP LOCKED lets concurrent consumers take disjoint batches;
-- MATERIALIZED keeps the planner from re-running the LIMITed subquery per row (which
-- could touch more rows than asked for). The transaction's commit need not wait for
-- the WAL flush (set_config(..., true) lasts for it).
picked AS MATERIALIZED (
    SELECT c.id FROM q
    CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS relax
    CROSS JOIN LATERAL (
        SELECT id, priority FROM {schema}.jobs
        WHERE state = 'available' AND queue = q.name
        ORDER BY priority DESC, id
        LIMIT least(q.room, %(limit)s)
        FOR UPDATE SKIP LOCKED
    ) c
    ORDER BY c.priority DESC, c.id
    LIMIT %(limit)s
)

-- fragment: claim_picked
-- Deliver the picked jobs to consumer %(consumer)s.
claimed AS (
    UPDATE {schema}.jobs AS j
    SET state = 'executing', attempt = j.attempt + 1, attempted_at = statement_timestamp(),
        attempted_by = %(consumer)s, acked = false
    FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.attempt, j.queue, j.priority, j.redelivered, j.headers::text AS headers,
              j.properties::text AS properties, j.body, j.content_type, j.content_encoding,
              extract(epoch FROM statement_timestamp() - j.scheduled_at)::float8 AS queue_time
)

-- name: claim
-- Take up to %(limit)s deliverable jobs of the given queues for one consumer, in
-- delivery order, in one statement (its own transaction): a claim lost in a server
-- crash leaves its jobs available, delivered again later. Paused and limited queues
-- are left to claim_controlled (whatever this process believes about them).
WITH q AS (
    SELECT name, %(limit)s AS room FROM unnest(%(queues)s::text[]) AS u(name)
    WHERE NOT EXISTS (SELECT 1 FROM {schema}.queues AS c WHERE c.name = u.name
                      AND (c.paused OR c.concurrency IS NOT NULL OR c.rate_limit IS NOT NULL))
), {pick_available}, {claim_picked}
SELECT * FROM claimed;

-- name: queues_controlled
-- The queues whose claims go through claim_controlled.
SELECT name FROM {schema}.queues WHERE paused OR concurrency IS NOT NULL OR rate_limit IS NOT NULL;

-- name: queue_controls_lock
-- Serialise the claims of controlled queues: every named row, whatever its controls
-- say now (one resumed or limited meanwhile is still serialised), in name order (no
-- deadlock). The claim that follows is another statement, so it sees every claim
-- committed by the transactions this one waited for, and the controls as they are.
SELECT name FROM {schema}.queues WHERE name = ANY(%(queues)s::text[]) ORDER BY name FOR UPDATE;

-- name: claim_controlled
-- The claim of paused or limited queues (after queue_controls_lock, same transaction):
-- a paused queue gives nothing; a queue takes at most `concurrency` minus its
-- executing jobs, and at most what is left of `rate_limit` in the current window;
-- the window's count then grows by what was claimed.
WITH q AS (
    SELECT c.name, greatest(0, least(
        coalesce(c.concurrency - (SELECT count(*) FROM {schema}.jobs AS x
                                  WHERE x.state = 'executing' AND x.queue = c.name), %(limit)s),
        coalesce(c.rate_limit - CASE WHEN c.rate_window = w.now THEN c.rate_count ELSE 0 END, %(limit)s)
    ))::integer AS room
    FROM {schema}.queues AS c
    CROSS JOIN LATERAL (
        SELECT floor(extract(epoch FROM statement_timestamp()) / c.rate_period)::bigint AS now
    ) AS w
    WHERE c.name = ANY(%(queues)s::text[]) AND NOT c.paused
), {pick_available}, {claim_picked}, counted AS (
    UPDATE {schema}.queues AS c SET
        rate_count = n.claimed + CASE WHEN c.rate_window = floor(extract(epoch FROM statement_timestamp())
                                                                 / c.rate_period)::bigint
                                      THEN c.rate_count ELSE 0 END,
        rate_window = floor(extract(epoch FROM statement_timestamp()) / c.rate_period)::bigint
    FROM (SELECT queue, count(*) AS claimed FROM claimed GROUP BY queue) AS n
    WHERE c.name = n.queue AND c.rate_limit IS NOT NULL
)
SELECT * FROM claimed;

-- name: settle
-- Record the outcome of deliveries, batched. Fenced by (id, attempt) and state:
-- a delivery that was rescued or re-claimed since cannot change the row. Each row is
-- looked up by primary key: the state is compared as text so that the planner never
-- reads jobs_executing_idx instead (a generic plan made while few jobs were executing
-- would scan every executing job on each call). Its commit waits for the WAL flush
-- (once per batch): an early-acknowledged job is not redelivered, so an outcome lost
-- in a server crash or failover would leave it executing until its worker exits, and
-- a completed one would run again. A job leaving a concurrency-limited queue frees a
-- slot: that queue's consumers are woken to claim; a snoozed job wakes its queue's
-- stagers.
-- op: completed | discarded | cancelled | acked (delivery acknowledged, task still running)
-- | snoozed (scheduled again in `delay` seconds; like Oban, max_attempts grows by one so
-- the snooze spends no attempt, and meta.snoozed counts them).
WITH settled AS (
    UPDATE {schema}.jobs AS j SET
        state = CASE s.op WHEN 'acked' THEN j.state WHEN 'snoozed' THEN 'scheduled'
                     ELSE s.op::{schema}.job_state END,
        scheduled_at = CASE WHEN s.op = 'snoozed' THEN now() + make_interval(secs => s.delay) ELSE j.scheduled_at END,
        max_attempts = CASE WHEN s.op = 'snoozed' THEN j.max_attempts + 1 ELSE j.max_attempts END,
        meta = CASE WHEN s.op = 'snoozed'
                    THEN j.meta || jsonb_build_object('snoozed', coalesce((j.meta->>'snoozed')::int, 0) + 1)
                    ELSE j.meta END,
        acked = j.acked OR s.op = 'acked',
        completed_at = CASE WHEN s.op = 'completed' THEN now() ELSE j.completed_at END,
        discarded_at = CASE WHEN s.op = 'discarded' THEN now() ELSE j.discarded_at END,
        cancelled_at = CASE WHEN s.op = 'cancelled' THEN now() ELSE j.cancelled_at END,
        cancelled_by = CASE WHEN s.op = 'cancelled' THEN coalesce(j.cancelled_by, 'worker ' || j.attempted_by)
                            ELSE j.cancelled_by END,
        errors = CASE WHEN s.error IS NULL THEN j.errors ELSE j.errors || jsonb_build_array(s.error) END
    FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[], %(ops)s::text[], %(errors)s::jsonb[],
                %(delays)s::float8[])
         AS s(id, attempt, op, error, delay)
    WHERE j.id = s.id AND j.attempt = s.attempt AND j.state::text = 'executing'
    RETURNING j.queue, j.state, j.scheduled_at
), woke AS (
    SELECT pg_notify({schema}.notify_channel(c.name), '') FROM {schema}.queues AS c
    WHERE c.concurrency IS NOT NULL
      AND c.name IN (SELECT queue FROM settled WHERE state <> 'executing')
), snoozed AS (  -- as for a job published for later (wake_inserted)
    SELECT pg_notify({schema}.notify_channel(queue), 'scheduled ' || extract(epoch FROM min(scheduled_at)))
    FROM settled WHERE state = 'scheduled' GROUP BY queue
)
SELECT (SELECT count(*) FROM woke) + (SELECT count(*) FROM snoozed) AS woke;

-- name: append_errors
-- Add error entries to jobs whatever their state (a retried attempt's error: the
-- retry message has already moved the row on).
UPDATE {schema}.jobs AS j SET errors = j.errors || e.entries
FROM (
    SELECT id, jsonb_agg(error ORDER BY ord) AS entries
    FROM unnest(%(ids)s::bigint[], %(errors)s::jsonb[]) WITH ORDINALITY AS s(id, error, ord)
    GROUP BY id
) e
WHERE j.id = e.id;

-- name: requeue
-- Give a delivery back (reject with requeue, channel closed with unacked messages):
-- the job keeps its id, hence its place in the queue, and is marked redelivered.
-- (The state is compared as text for the reason given at settle.)
WITH back AS (
    UPDATE {schema}.jobs AS j
    SET state = 'available', redelivered = true, attempted_by = NULL, acked = false
    WHERE j.id = %(id)s AND j.attempt = %(attempt)s AND j.state::text = 'executing'
    RETURNING j.queue
), woke AS (
    SELECT pg_notify({schema}.notify_channel(queue), '') FROM back
)
SELECT (SELECT count(*) FROM back) AS n, (SELECT count(*) FROM woke) AS woke;

-- name: stage
-- Make due scheduled/retryable jobs available and wake their queues.
WITH due AS (
    SELECT id FROM {schema}.jobs
    WHERE state IN ('scheduled', 'retryable') AND scheduled_at <= now()
    ORDER BY scheduled_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), staged AS (
    UPDATE {schema}.jobs AS j SET state = 'available' FROM due WHERE j.id = due.id
    RETURNING j.queue
), woke AS (
    SELECT pg_notify({schema}.notify_channel(queue), '') FROM (SELECT DISTINCT queue FROM staged) q
)
SELECT (SELECT count(*) FROM staged) AS n, (SELECT count(*) FROM woke) AS woke;

-- name: next_due
-- Seconds until the earliest scheduled/retryable job is due (NULL when none), and the
-- server's clock (epoch), which dates the times 'scheduled' notifications carry.
SELECT extract(epoch FROM min(scheduled_at) - now())::float8 AS seconds,
       extract(epoch FROM now())::float8 AS server_now
FROM {schema}.jobs WHERE state IN ('scheduled', 'retryable');

-- name: consumer_heartbeat
-- Register or refresh a consumer process, its open connections and the queues it
-- consumes (which keeps them from expiring).
WITH touched AS (
    -- (SKIP LOCKED: a row a claim holds is touched at the next heartbeat, never waited
    -- for, which could deadlock with claims locking several queues in name order.)
    UPDATE {schema}.queues SET last_used_at = now(), consumed = true WHERE name IN (
        SELECT name FROM {schema}.queues WHERE name = ANY(%(queues)s::text[]) FOR UPDATE SKIP LOCKED)
)
INSERT INTO {schema}.consumers (id, hostname, pid, connections, queues)
VALUES (%(id)s, %(hostname)s, %(pid)s, %(connections)s::text[], %(queues)s::text[])
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), connections = excluded.connections,
                               queues = excluded.queues;

-- name: consumer_unregister
DELETE FROM {schema}.consumers WHERE id = %(id)s;

-- name: rescue
-- Forget consumer processes that stopped heartbeating, and take back executing jobs
-- whose owner is gone: the process is dead, or (for a delivery never acknowledged)
-- the connection that claimed it has closed. Such a job becomes available again,
-- marked redelivered; one the worker had already acknowledged (early ack: at most
-- once) and whose process died is discarded with the reason, unless the task's
-- result (pgbroker's backend, same schema) says it succeeded: its process was lost
-- after storing the result and before the worker recorded the outcome (as when a
-- whole process group gets SIGTERM), so it is completed. Jobs of live connections
-- stay theirs however long they are held.
-- Run by the leader of service 'rescue' (others see leader = false), at most
-- %(batch)s jobs per run.
WITH {leader}, dead AS (
    DELETE FROM {schema}.consumers
    WHERE heartbeat_at < now() - make_interval(secs => %(after)s) AND (SELECT ok FROM leader)
    RETURNING id
), lost AS (
    SELECT j.id, j.acked AND EXISTS (
               SELECT 1 FROM {schema}.results AS r WHERE r.task_id = j.task_id AND r.state = 'SUCCESS'
           ) AS succeeded
    FROM {schema}.jobs AS j
    LEFT JOIN {schema}.consumers AS c ON c.id = split_part(j.attempted_by, '#', 1)
    WHERE j.state = 'executing'
      AND (c.id IS NULL
           OR c.id IN (SELECT id FROM dead)
           OR (NOT j.acked AND NOT j.attempted_by = ANY(c.connections)))
      AND (SELECT ok FROM leader)
    LIMIT %(batch)s
    FOR UPDATE OF j SKIP LOCKED
), rescued AS (
    UPDATE {schema}.jobs AS j SET
        state = CASE WHEN lost.succeeded THEN 'completed' WHEN j.acked THEN 'discarded'
                     ELSE 'available' END::{schema}.job_state,
        redelivered = j.redelivered OR NOT lost.succeeded, attempted_by = NULL,
        completed_at = CASE WHEN lost.succeeded THEN now() ELSE j.completed_at END,
        discarded_at = CASE WHEN j.acked AND NOT lost.succeeded THEN now() END,
        errors = CASE WHEN lost.succeeded THEN j.errors ELSE j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempt, 'at', now(), 'error',
            CASE WHEN j.acked
                 THEN 'worker lost after acknowledging the message (task_acks_late=False); not redelivered'
                 ELSE 'delivery lost: ' || coalesce(j.attempted_by, '?') || ' went away; redelivered'
            END)) END
    FROM lost WHERE j.id = lost.id
    RETURNING j.queue, j.state
), woke AS (
    SELECT pg_notify({schema}.notify_channel(queue), '') FROM (
        SELECT DISTINCT queue FROM rescued WHERE state = 'available'
    ) q
)
SELECT (SELECT ok FROM leader) AS leader, (SELECT count(*) FROM dead) AS dead,
       (SELECT count(*) FROM rescued WHERE state = 'available') AS redelivered,
       (SELECT count(*) FROM rescued WHERE state = 'discarded') AS discarded,
       (SELECT count(*) FROM rescued WHERE state = 'completed') AS completed,
       (SELECT count(*) FROM woke) AS woke;

-- name: queue_declare
-- Declaring a queue again counts as using it (x-expires); its arguments and flags
-- are the first declaration's, as a broker keeps them.
INSERT INTO {schema}.queues (name, arguments, expires, message_ttl, auto_delete)
VALUES (%(queue)s, %(arguments)s::jsonb, make_interval(secs => %(expires)s::float8),
        make_interval(secs => %(message_ttl)s::float8), %(auto_delete)s)
ON CONFLICT (name) DO UPDATE SET last_used_at = now();

-- name: queue_exists
-- Declared, or holding messages not yet delivered (Celery's default routing publishes
-- without declaring). Finished jobs of a deleted queue, waiting to be pruned, do not
-- make it exist; each test reads one partial index.
SELECT EXISTS (SELECT 1 FROM {schema}.queues WHERE name = %(queue)s)
    OR EXISTS (SELECT 1 FROM {schema}.jobs WHERE queue = %(queue)s AND state = 'available')
    OR EXISTS (SELECT 1 FROM {schema}.jobs WHERE queue = %(queue)s AND state IN ('scheduled', 'retryable'))
    AS found;

-- name: queue_size
-- Messages not yet delivered: available, plus scheduled/retryable ones waiting for their time.
SELECT count(*) AS n FROM {schema}.jobs
WHERE queue = %(queue)s AND state IN ('available', 'scheduled', 'retryable');

-- name: queue_purge
WITH gone AS (
    DELETE FROM {schema}.jobs
    WHERE queue = %(queue)s AND state IN ('available', 'scheduled', 'retryable')
    RETURNING 1
)
SELECT count(*) AS n FROM gone;

-- name: queue_delete
DELETE FROM {schema}.queues WHERE name = %(queue)s;

-- name: jobs_by_task_id
SELECT * FROM {schema}.jobs WHERE task_id = ANY(%(task_ids)s::text[]) ORDER BY id;

-- fragment: job_filter
-- The jobs an admin call selects: each NULL parameter matches everything.
(%(states)s::text[] IS NULL OR state::text = ANY(%(states)s::text[]))
AND (%(queue)s::text IS NULL OR queue = %(queue)s)
AND (%(task)s::text IS NULL OR task = %(task)s)
AND (%(meta)s::jsonb IS NULL OR meta @> %(meta)s::jsonb)
AND (%(task_ids)s::text[] IS NULL OR task_id = ANY(%(task_ids)s::text[]))

-- name: jobs_list
-- Jobs matching the filter, newest first, one page (keyset: ids below %(before)s).
SELECT * FROM {schema}.jobs
WHERE {job_filter} AND (%(before)s::bigint IS NULL OR id < %(before)s)
ORDER BY id DESC LIMIT %(limit)s;

-- name: jobs_count
SELECT count(*) AS n FROM {schema}.jobs WHERE {job_filter};

-- fragment: chord_member
-- The kombu message of a cancelled job in a Celery group (else NULL): its result
-- backend still counts it as a returned part of the group's chord, as a worker
-- does when it skips a revoked task.
CASE WHEN j.headers->>'group' IS NOT NULL AND j.state = 'cancelled' THEN jsonb_build_object(
    'headers', j.headers, 'properties', j.properties, 'body', j.body,
    'content-type', j.content_type, 'content-encoding', j.content_encoding)::text END AS message

-- name: jobs_cancel_where
-- Cancel up to %(batch)s matching jobs that have not started (available, scheduled,
-- retryable), returning their task ids and the message of those in a group. FOR
-- UPDATE waits for a concurrent claim instead of skipping its rows: once it commits
-- they are executing, no longer match, and the caller revokes them.
WITH target AS (
    SELECT id FROM {schema}.jobs
    WHERE state IN ('available', 'scheduled', 'retryable') AND {job_filter}
    ORDER BY id LIMIT %(batch)s
    FOR UPDATE
)
UPDATE {schema}.jobs AS j SET state = 'cancelled', cancelled_at = now(), cancelled_by = %(by)s
FROM target WHERE j.id = target.id AND j.state IN ('available', 'scheduled', 'retryable')
RETURNING j.task_id, {chord_member};

-- name: jobs_executing_where
-- The Celery task ids of matching executing jobs (to be revoked).
SELECT task_id FROM {schema}.jobs WHERE state = 'executing' AND task_id IS NOT NULL AND {job_filter};

-- name: jobs_retry
-- Run discarded or cancelled jobs once more, now: like Oban's retry, the attempt budget
-- grows by one when it is spent; errors are kept, and meta.retried counts manual retries.
-- Its message loses its ETA (a worker would hold a countdown's task until then), and a
-- cancelled job's says so (pgbroker_unrevoke): the workers that remember its revoke
-- forget it when they receive it. The stored outcome of each retried task
-- (%(result_keys)s, parallel to the task ids) is deleted with it, so that get() waits
-- for the new run. (Found by task id: the state is compared as text so that the
-- planner never scans jobs_finished_idx instead, as at settle.)
WITH again AS (
    UPDATE {schema}.jobs AS j SET
        state = 'available', scheduled_at = now(), attempted_by = NULL, acked = false,
        completed_at = NULL, discarded_at = NULL, cancelled_at = NULL, cancelled_by = NULL,
        max_attempts = CASE WHEN j.max_attempts IS NULL THEN NULL ELSE greatest(j.max_attempts, j.attempt + 1) END,
        meta = j.meta || jsonb_build_object('retried', coalesce((j.meta->>'retried')::int, 0) + 1),
        headers = j.headers || '{"eta": null}'
                  || CASE WHEN j.state::text = 'cancelled' THEN '{"pgbroker_unrevoke": true}'::jsonb ELSE '{}' END
    WHERE j.task_id = ANY(%(task_ids)s::text[]) AND j.state::text IN ('discarded', 'cancelled')
    RETURNING j.task_id, j.queue
), woke AS (
    SELECT pg_notify({schema}.notify_channel(queue), '') FROM (SELECT DISTINCT queue FROM again) q
), forgotten AS (
    DELETE FROM {schema}.results AS r
    USING again, unnest(%(task_ids)s::text[], %(result_keys)s::text[]) AS k(task_id, key)
    WHERE k.task_id = again.task_id AND r.key = k.key
    RETURNING 1
)
SELECT again.task_id FROM again, (SELECT count(*) FROM woke) w, (SELECT count(*) FROM forgotten) f;

-- name: testing_make_due
-- pgbroker.testing's drain(with_scheduled=True): a queue's scheduled and retryable jobs are due now.
UPDATE {schema}.jobs SET scheduled_at = now() WHERE queue = %(queue)s AND state IN ('scheduled', 'retryable')
RETURNING id;

-- name: queue_stats
-- Per queue (declared or holding jobs): jobs per state, the age of the oldest
-- available job (seconds), and its controls.
WITH counts AS (
    SELECT queue,
           count(*) FILTER (WHERE state = 'available') AS available,
           count(*) FILTER (WHERE state = 'scheduled') AS scheduled,
           count(*) FILTER (WHERE state = 'executing') AS executing,
           count(*) FILTER (WHERE state = 'retryable') AS retryable,
           count(*) FILTER (WHERE state = 'completed') AS completed,
           count(*) FILTER (WHERE state = 'discarded') AS discarded,
           count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
           extract(epoch FROM now() - min(scheduled_at) FILTER (WHERE state = 'available'))::float8
               AS oldest_available
    FROM {schema}.jobs GROUP BY queue
)
SELECT coalesce(c.queue, q.name) AS queue,
       coalesce(c.available, 0) AS available, coalesce(c.scheduled, 0) AS scheduled,
       coalesce(c.executing, 0) AS executing, coalesce(c.retryable, 0) AS retryable,
       coalesce(c.completed, 0) AS completed, coalesce(c.discarded, 0) AS discarded,
       coalesce(c.cancelled, 0) AS cancelled, c.oldest_available,
       coalesce(q.paused, false) AS paused, q.concurrency, q.rate_limit, q.rate_period
FROM counts AS c FULL JOIN {schema}.queues AS q ON q.name = c.queue
WHERE %(queue)s::text IS NULL OR coalesce(c.queue, q.name) = %(queue)s
ORDER BY 1;

-- name: queue_control_set
-- Set a queue's controls (the queue row is created if needed: `created` says so, a
-- queue no producer or worker has declared, perhaps a typo). Each NULL `set_*`
-- leaves that control as it is.
INSERT INTO {schema}.queues AS q (name, paused, concurrency, rate_limit, rate_period)
VALUES (%(queue)s, coalesce(%(paused)s::boolean, false), %(concurrency)s::integer, %(rate_limit)s::integer,
        %(rate_period)s::float8)
ON CONFLICT (name) DO UPDATE SET
    paused = coalesce(%(paused)s::boolean, q.paused),
    concurrency = CASE WHEN %(set_concurrency)s THEN excluded.concurrency ELSE q.concurrency END,
    rate_limit = CASE WHEN %(set_rate)s THEN excluded.rate_limit ELSE q.rate_limit END,
    rate_period = CASE WHEN %(set_rate)s THEN excluded.rate_period ELSE q.rate_period END
RETURNING name, paused, concurrency, rate_limit, rate_period,
          NOT EXISTS (SELECT 1 FROM {schema}.queues WHERE name = %(queue)s) AS created;

-- name: consumers_list
-- Live consumer processes (workers), oldest first.
SELECT id, hostname, pid, started_at, heartbeat_at, queues, cardinality(connections) AS connections,
       extract(epoch FROM now() - heartbeat_at)::float8 AS silent_for
FROM {schema}.consumers ORDER BY started_at, id;

-- name: result_set
-- Store a result (or group meta) and wake whoever waits for it, on commit. With
-- keep_success, a SUCCESS already stored is never overwritten (a late duplicate
-- delivery must not replace it), as Celery's key/value backends promise.
WITH stored AS (
    INSERT INTO {schema}.results AS r (key, state, value, expires_at, task_id, name, worker, queue,
                                       retries, group_id, parent_id, date_done)
    VALUES (%(key)s, %(state)s, %(value)s, now() + make_interval(secs => %(expires)s::float8),
            %(task_id)s, %(task_name)s, %(worker)s, %(queue)s, %(retries)s, %(group_id)s, %(parent_id)s,
            %(date_done)s)
    ON CONFLICT (key) DO UPDATE SET state = excluded.state, value = excluded.value,
        updated_at = now(), expires_at = excluded.expires_at, task_id = excluded.task_id,
        name = excluded.name, worker = excluded.worker, queue = excluded.queue,
        retries = excluded.retries, group_id = excluded.group_id, parent_id = excluded.parent_id,
        date_done = excluded.date_done
        WHERE NOT %(keep_success)s OR r.state IS DISTINCT FROM 'SUCCESS' OR r.expires_at <= now()
    RETURNING r.key, r.value
)
-- The payload is the key, then (when it fits in NOTIFY's 8000 bytes) a newline and the
-- value in base64, so that a waiting get() needs no query to read it. A key that
-- cannot be a payload (too long, or with a newline) is not announced: its waiters
-- re-read every result_polling_interval.
SELECT pg_notify({schema}.notify_channel(':results'),
                 key || coalesce(CASE WHEN octet_length(key) + octet_length(v.data) < 7999 THEN E'\n' || v.data END, ''))
FROM stored, LATERAL (SELECT CASE WHEN octet_length(value) <= 5900 THEN encode(value, 'base64') END AS data) AS v
WHERE octet_length(key) < 8000 AND strpos(key, E'\n') = 0;

-- name: result_get_many
SELECT key, value FROM {schema}.results
WHERE key = ANY(%(keys)s::text[]) AND (expires_at IS NULL OR expires_at > now());

-- name: result_delete
WITH counter AS (DELETE FROM {schema}.counters WHERE key = %(key)s RETURNING 1)
DELETE FROM {schema}.results WHERE key = %(key)s;

-- name: result_expire
-- Give a result and the counter of the same key (chords) a new lifetime (NULL: forever).
WITH counter AS (
    UPDATE {schema}.counters SET expires_at = now() + make_interval(secs => %(seconds)s::float8)
    WHERE key = %(key)s
)
UPDATE {schema}.results SET expires_at = now() + make_interval(secs => %(seconds)s::float8)
WHERE key = %(key)s;

-- name: counter_incr
INSERT INTO {schema}.counters AS c (key, value) VALUES (%(key)s, 1)
ON CONFLICT (key) DO UPDATE SET value = c.value + 1
RETURNING c.value;

-- name: chord_part_count
-- Count one header part of a chord (task id and place in the header) once: the
-- counter's new value, or no row when this part had counted already (a duplicate
-- delivery). The counter and the part expire with the results.
WITH part AS (
    INSERT INTO {schema}.chord_parts (key, part, expires_at)
    VALUES (%(key)s, %(part)s, now() + make_interval(secs => %(expires)s::float8))
    ON CONFLICT DO NOTHING
    RETURNING key
)
INSERT INTO {schema}.counters AS c (key, value, expires_at)
SELECT key, 1, now() + make_interval(secs => %(expires)s::float8) FROM part
ON CONFLICT (key) DO UPDATE SET value = c.value + 1, expires_at = excluded.expires_at
RETURNING c.value;

-- name: chord_size_set
-- Record how many header parts complete a chord; parts may already have counted.
INSERT INTO {schema}.counters AS c (key, value, size, expires_at)
VALUES (%(key)s, 0, %(size)s, now() + make_interval(secs => %(expires)s::float8))
ON CONFLICT (key) DO UPDATE SET size = excluded.size;

-- name: chord_size_get
SELECT size FROM {schema}.counters WHERE key = %(key)s;

-- name: chord_counter_get
SELECT value FROM {schema}.counters WHERE key = %(key)s;

-- name: chords_counted_here
-- Whether any of these chord counters is in this schema (its chord's backend is pgbroker here).
SELECT EXISTS (SELECT FROM {schema}.counters WHERE key = ANY(%(keys)s)) AS found;

-- name: results_prune
-- Delete up to %(batch)s expired results, as many expired counters and as many
-- expired chord parts (counted together with the counters). Only the
-- leader of service 'prune-results' deletes anything; the others see leader = false.
WITH {leader}, gone AS (
    DELETE FROM {schema}.results WHERE key IN (
        SELECT key FROM {schema}.results
        WHERE expires_at <= now() AND (SELECT ok FROM leader)
        ORDER BY expires_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
    RETURNING 1
), gone_counters AS (
    DELETE FROM {schema}.counters WHERE key IN (
        SELECT key FROM {schema}.counters
        WHERE expires_at <= now() AND (SELECT ok FROM leader)
        LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
    RETURNING 1
), gone_parts AS (
    DELETE FROM {schema}.chord_parts WHERE (key, part) IN (
        SELECT key, part FROM {schema}.chord_parts
        WHERE expires_at <= now() AND (SELECT ok FROM leader)
        ORDER BY expires_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
    RETURNING 1
)
SELECT (SELECT ok FROM leader) AS leader, (SELECT count(*) FROM gone) AS results,
       (SELECT count(*) FROM gone_counters) + (SELECT count(*) FROM gone_parts) AS counters;

-- name: database_identity
-- Which database a connection reaches: the same values from two connections mean
-- the same database of the same server (a caller's transaction can then hold jobs).
-- The system identifier is read only where the role may (managed servers may not
-- allow it); the server's start time and port then still tell servers apart. The
-- port is the server's setting, the same over TCP and the Unix socket (where the
-- port of the connection is NULL).
SELECT current_database() AS database,
       CASE WHEN has_function_privilege('pg_control_system()', 'EXECUTE')
            THEN (SELECT system_identifier::text FROM pg_control_system()) END AS system,
       pg_postmaster_start_time()::text AS started,
       current_setting('port')::int AS port;

-- name: claim_no_ack
-- The claim of consumers that never acknowledge (remote control, replies, events):
-- the rows are deleted as they are delivered (at most once, as a broker does for
-- no-ack consumers), so that this traffic leaves nothing behind. Messages older
-- than their queue's x-message-ttl are deleted without being delivered (stale).
-- Queue controls do not apply (they are for acknowledged deliveries: tasks).
WITH q AS (
    SELECT name, %(limit)s AS room FROM unnest(%(queues)s::text[]) AS u(name)
), {pick_available}
DELETE FROM {schema}.jobs AS j USING picked
WHERE j.id = picked.id
RETURNING j.id, j.attempt + 1 AS attempt, j.queue, j.priority, j.redelivered, j.headers::text AS headers,
          j.properties::text AS properties, j.body, j.content_type, j.content_encoding,
          j.inserted_at < now() - (SELECT message_ttl FROM {schema}.queues WHERE name = j.queue) AS stale,
          -- and what restore_no_ack needs besides (small columns: the message is above)
          j.task_id, j.task, j.max_attempts, j.scheduled_at, j.expires_at, j.inserted_at, j.meta::text AS meta;

-- name: restore_no_ack
-- Put back no-ack messages a consumer took and never delivered (it was cancelled, or
-- its channel closed, first): the rows as they were, under their own ids, so they keep
-- their place in the queue; their queues' consumers are woken.
WITH back AS (
    INSERT INTO {schema}.jobs AS j (id, task_id, queue, task, priority, attempt, max_attempts, redelivered,
                                    scheduled_at, expires_at, inserted_at, headers, properties, body,
                                    content_type, content_encoding, meta)
    OVERRIDING SYSTEM VALUE
    SELECT * FROM unnest(
        %(id)s::bigint[], %(task_id)s::text[], %(queue)s::text[], %(task)s::text[], %(priority)s::smallint[],
        %(attempt)s::integer[], %(max_attempts)s::integer[], %(redelivered)s::boolean[],
        %(scheduled_at)s::timestamptz[], %(expires_at)s::timestamptz[], %(inserted_at)s::timestamptz[],
        %(headers)s::jsonb[], %(properties)s::jsonb[], %(body)s::text[], %(content_type)s::text[],
        %(content_encoding)s::text[], %(meta)s::jsonb[])
    ON CONFLICT DO NOTHING
    RETURNING j.queue
), woke AS (
    SELECT pg_notify({schema}.notify_channel(queue), '') FROM (SELECT DISTINCT queue FROM back) q
)
SELECT (SELECT count(*) FROM back) AS n, (SELECT count(*) FROM woke) AS woke;

-- name: exchange_declare
-- The first declaration's type stands (a broker refuses a different one).
INSERT INTO {schema}.exchanges (name, type) VALUES (%(exchange)s, %(type)s)
ON CONFLICT (name) DO NOTHING;

-- name: exchange_type
SELECT type FROM {schema}.exchanges WHERE name = %(exchange)s;

-- name: exchange_delete
WITH unbound AS (DELETE FROM {schema}.bindings WHERE exchange = %(exchange)s)
DELETE FROM {schema}.exchanges WHERE name = %(exchange)s;

-- name: binding_add
-- Bind a queue to an exchange (the queue row is created if it was never declared).
WITH queue AS (
    INSERT INTO {schema}.queues (name) VALUES (%(queue)s) ON CONFLICT (name) DO NOTHING
)
INSERT INTO {schema}.bindings (exchange, routing_key, queue, pattern)
VALUES (%(exchange)s, %(routing_key)s, %(queue)s, %(pattern)s)
ON CONFLICT (exchange, routing_key, queue) DO UPDATE SET pattern = excluded.pattern;

-- name: binding_remove
DELETE FROM {schema}.bindings
WHERE exchange = %(exchange)s AND routing_key = %(routing_key)s AND queue = %(queue)s;

-- name: bindings_of
-- An exchange's routing table, as kombu's exchange types read it.
SELECT routing_key, pattern, queue FROM {schema}.bindings WHERE exchange = %(exchange)s ORDER BY queue;

-- name: enqueue_fanout
-- A copy of one message for every queue bound to a fanout exchange, whichever
-- process bound it, in one statement. The copies carry no task id (the same
-- Celery task in several queues is several jobs).
WITH input AS (
    SELECT NULL::text AS task_id, b.queue, %(task)s::text AS task, %(priority)s::smallint AS priority,
           %(scheduled_at)s::timestamptz AS scheduled_at, %(expires_at)s::timestamptz AS expires_at,
           false AS retry, %(headers)s::jsonb AS headers, %(properties)s::jsonb AS properties,
           %(body)s::text AS body, %(content_type)s::text AS content_type,
           %(content_encoding)s::text AS content_encoding, row_number() OVER (ORDER BY b.queue) AS ord
    FROM (SELECT DISTINCT queue FROM {schema}.bindings WHERE exchange = %(exchange)s) b
), {store_jobs};

-- name: queues_sweep
-- Delete queues unused for longer than their x-expires (no live consumer lists
-- them, not declared since), and auto-delete queues once consumed and then unused
-- for %(auto_delete_after)s seconds, with their messages and bindings; and drop
-- messages older than their queue's x-message-ttl that nobody took: deleted when
-- they are not Celery tasks (events, control), discarded with the reason when they are.
WITH gone AS (
    DELETE FROM {schema}.queues AS q
    WHERE (q.expires IS NOT NULL AND q.last_used_at < now() - q.expires
           OR q.auto_delete AND q.consumed
              AND q.last_used_at < now() - make_interval(secs => %(auto_delete_after)s::float8))
      AND NOT EXISTS (SELECT 1 FROM {schema}.consumers AS c WHERE q.name = ANY(c.queues))
    RETURNING q.name
), emptied AS (
    DELETE FROM {schema}.jobs AS j USING gone WHERE j.queue = gone.name
    RETURNING 1
), stale AS (
    SELECT j.id, j.task_id FROM {schema}.jobs AS j
    JOIN {schema}.queues AS q ON q.name = j.queue
    WHERE q.message_ttl IS NOT NULL AND j.state = 'available' AND j.inserted_at < now() - q.message_ttl
    FOR UPDATE OF j SKIP LOCKED
), dropped AS (
    DELETE FROM {schema}.jobs AS j USING stale
    WHERE j.id = stale.id AND stale.task_id IS NULL
    RETURNING 1
), discarded AS (
    UPDATE {schema}.jobs AS j SET state = 'discarded', discarded_at = now(),
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempt, 'at', now(), 'error', 'not delivered within the queue''s x-message-ttl'))
    FROM stale WHERE j.id = stale.id AND stale.task_id IS NOT NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS queues, (SELECT count(*) FROM emptied) AS emptied,
       (SELECT count(*) FROM dropped) AS dropped, (SELECT count(*) FROM discarded) AS discarded;

-- name: jobs_cancel
-- Cancel the jobs of these Celery task ids that have not started: a cancelled job
-- is never delivered, whatever happens to the workers. Running jobs are left to
-- their worker (which reports a terminated task as cancelled); with %(running)s
-- they only record `by`, who asked for them to be terminated. Returns the task ids
-- cancelled here, with the message of those in a group (a chord counts its parts).
UPDATE {schema}.jobs AS j SET
    state = CASE WHEN j.state = 'executing' THEN j.state ELSE 'cancelled' END,
    cancelled_at = CASE WHEN j.state = 'executing' THEN j.cancelled_at ELSE now() END,
    cancelled_by = %(by)s
WHERE j.task_id = ANY(%(task_ids)s::text[])
  AND (j.state IN ('available', 'scheduled', 'retryable') OR (%(running)s AND j.state = 'executing'))
RETURNING j.task_id, j.state = 'cancelled' AS cancelled, {chord_member};

-- name: jobs_scheduled_listing
-- The Celery tasks of the given queues waiting for their ETA, as one consuming
-- process lists them for `celery inspect scheduled`. They wait in the database,
-- not in a worker, so each is listed by exactly one of the live processes that
-- consume its queue (job id modulo their number): the workers' answers add up to
-- the whole schedule, without duplicates.
WITH consuming AS (
    SELECT q.name AS queue, c.id,
           row_number() OVER (PARTITION BY q.name ORDER BY c.id) - 1 AS rank,
           count(*) OVER (PARTITION BY q.name) AS n
    FROM {schema}.consumers AS c CROSS JOIN LATERAL unnest(c.queues) AS q(name)
    WHERE q.name = ANY(%(queues)s::text[])
)
SELECT j.id, j.attempt, j.queue, j.priority, j.redelivered, j.headers::text AS headers,
       j.properties::text AS properties, j.body, j.content_type, j.content_encoding
FROM consuming AS me JOIN {schema}.jobs AS j ON j.queue = me.queue
WHERE me.id = %(consumer)s AND j.state IN ('scheduled', 'retryable') AND j.task_id IS NOT NULL
  AND j.id %% me.n = me.rank
ORDER BY j.scheduled_at, j.id
LIMIT %(limit)s;

-- name: beat_entry_save
-- Create or redefine a beat entry. A changed definition (task, schedule, arguments,
-- options, policy) takes the caller's next fire and anchor; an unchanged one keeps its
-- state, so syncing beat_schedule at every start changes nothing. `enabled` NULL
-- keeps the stored flag (a synced entry someone disabled stays disabled).
INSERT INTO {schema}.beat_entries AS e (name, task, schedule, args, kwargs, options, missed, max_missed,
                                        catch_up_on_enable, enabled, source, trigger, anchor_at, next_fire_at)
VALUES (%(entry)s, %(task)s, %(schedule)s, %(args)s, %(kwargs)s, %(options)s, %(missed)s, %(max_missed)s,
        %(catch_up_on_enable)s, coalesce(%(enabled)s, true), %(source)s, %(trigger)s, %(anchor_at)s,
        %(next_fire_at)s)
ON CONFLICT (name) DO UPDATE SET
    task = excluded.task, schedule = excluded.schedule, args = excluded.args, kwargs = excluded.kwargs,
    options = excluded.options, missed = excluded.missed, max_missed = excluded.max_missed,
    catch_up_on_enable = excluded.catch_up_on_enable, trigger = excluded.trigger,
    enabled = coalesce(%(enabled)s, e.enabled), source = excluded.source,
    anchor_at = CASE WHEN e.schedule = excluded.schedule THEN e.anchor_at ELSE excluded.anchor_at END,
    next_fire_at = CASE WHEN e.schedule = excluded.schedule AND e.next_fire_at IS NOT NULL
                        THEN e.next_fire_at ELSE excluded.next_fire_at END,
    updated_at = now()
WHERE (e.task, e.schedule, e.args, e.kwargs, e.options, e.missed, e.max_missed, e.catch_up_on_enable,
       e.trigger, e.source, e.enabled)
      IS DISTINCT FROM
      (excluded.task, excluded.schedule, excluded.args, excluded.kwargs, excluded.options, excluded.missed,
       excluded.max_missed, excluded.catch_up_on_enable, excluded.trigger, excluded.source,
       coalesce(%(enabled)s, e.enabled))
RETURNING name, pg_notify({schema}.notify_channel('pgbroker.beat'), name)

-- name: beat_entries_list
-- Every entry (or those named), with database time for "next in".
SELECT e.*, now() AS db_now FROM {schema}.beat_entries AS e
WHERE %(names)s::text[] IS NULL OR e.name = ANY(%(names)s::text[])
ORDER BY e.name

-- name: beat_config_prune
-- Entries that came from beat_schedule and are no longer in it.
DELETE FROM {schema}.beat_entries
WHERE source = 'config' AND NOT (name = ANY(%(keep)s::text[]))
RETURNING name

-- name: beat_entry_remove
WITH gone AS (DELETE FROM {schema}.beat_entries WHERE name = %(entry)s RETURNING name)
SELECT name, pg_notify({schema}.notify_channel('pgbroker.beat'), name) FROM gone

-- name: beat_entry_enable
-- Enable or disable; `next_fire_at` is the caller's (NULL keeps it: catching up).
UPDATE {schema}.beat_entries
SET enabled = %(enabled)s, next_fire_at = coalesce(%(next_fire_at)s, next_fire_at), updated_at = now()
WHERE name = %(entry)s
RETURNING name, pg_notify({schema}.notify_channel('pgbroker.beat'), name)

-- name: beat_entry_run_now
-- Ask for one fire at the next tick of any beat (keyed by the time of the request).
UPDATE {schema}.beat_entries SET run_requested_at = clock_timestamp(), updated_at = now()
WHERE name = %(entry)s
RETURNING name, run_requested_at, pg_notify({schema}.notify_channel('pgbroker.beat'), name)

-- name: beat_next_due
-- Seconds until the earliest fire, requested run or unfinished trigger scan (NULL: none),
-- leaving out the entries named in %(skip)s (they failed to fire a moment ago).
SELECT extract(epoch FROM min(due) - now())::float8 AS seconds FROM (
    SELECT min(next_fire_at) AS due FROM {schema}.beat_entries
    WHERE enabled AND NOT (name = ANY(%(skip)s::text[]))
    UNION ALL SELECT now() FROM {schema}.beat_entries
    WHERE run_requested_at IS NOT NULL AND NOT (name = ANY(%(skip)s::text[]))
    UNION ALL SELECT now() FROM {schema}.beat_fires WHERE NOT done
) d

-- name: beat_lock_due
-- One entry that is due (or has a run requested), locked for this beat's transaction;
-- another beat skips it and takes the next. Database time decides what is due.
SELECT e.*, now() AS db_now FROM {schema}.beat_entries AS e
WHERE ((e.enabled AND e.next_fire_at <= now()) OR e.run_requested_at IS NOT NULL)
  AND NOT (e.name = ANY(%(skip)s::text[]))
ORDER BY e.next_fire_at NULLS FIRST
LIMIT 1
FOR UPDATE SKIP LOCKED

-- name: beat_fire_record
-- Record one fire; no row back means it was recorded before (the fire happened).
INSERT INTO {schema}.beat_fires (entry, fire_at, fired_by, manual, done, cursor)
VALUES (%(entry)s, %(fire_at)s, %(fired_by)s, %(manual)s, %(done)s, %(cursor)s)
ON CONFLICT (entry, fire_at) DO NOTHING
RETURNING fire_at

-- name: beat_entry_error
UPDATE {schema}.beat_entries SET last_error = %(error)s WHERE name = %(entry)s

-- name: beat_fire_sent
UPDATE {schema}.beat_fires SET task_id = %(task_id)s WHERE entry = %(entry)s AND fire_at = %(fire_at)s

-- name: beat_entry_advance
-- After an entry's fires: where it stands now.
UPDATE {schema}.beat_entries
SET next_fire_at = %(next_fire_at)s, last_fire_at = coalesce(%(last_fire_at)s, last_fire_at),
    fires = fires + %(fired)s, last_error = NULL,
    run_requested_at = CASE WHEN run_requested_at <= %(handled_request)s THEN NULL ELSE run_requested_at END
WHERE name = %(entry)s

-- name: beat_fire_lock_open
-- An unfinished trigger scan, locked for one page (another beat takes another fire).
SELECT f.entry, f.fire_at, f.cursor, f.enqueued, e.trigger, e.task, e.options, e.args, e.kwargs
FROM {schema}.beat_fires AS f JOIN {schema}.beat_entries AS e ON e.name = f.entry
WHERE NOT f.done
ORDER BY f.fire_at
LIMIT 1
FOR UPDATE OF f SKIP LOCKED

-- name: beat_fire_progress
UPDATE {schema}.beat_fires
SET cursor = %(cursor)s, enqueued = enqueued + %(enqueued)s, done = %(done)s
WHERE entry = %(entry)s AND fire_at = %(fire_at)s

-- name: beat_fire_orphans
-- Unfinished scans whose entry was removed (the join above never sees them).
UPDATE {schema}.beat_fires AS f SET done = true
WHERE NOT f.done AND NOT EXISTS (SELECT 1 FROM {schema}.beat_entries e WHERE e.name = f.entry)

-- name: beat_fires_of
SELECT * FROM {schema}.beat_fires WHERE entry = %(entry)s ORDER BY fire_at DESC LIMIT %(limit)s

-- name: trigger_rows_claim
-- trigger_once: of these row keys, the ones never enqueued before (recorded now).
INSERT INTO {schema}.trigger_rows (trigger, row_key)
SELECT %(trigger)s, k FROM unnest(%(keys)s::text[]) AS k
ON CONFLICT DO NOTHING
RETURNING row_key

-- fragment: trigger_matching
-- The rows of a trigger's filter (the application's SELECT, run as written), by key.
SELECT m.{key} AS key FROM ({filter}) AS m

-- name: trigger_page
-- The next page of a trigger's matching rows after the cursor (keyset pagination).
{trigger_matching}
WHERE %(first)s OR m.{key} > %(after)s
ORDER BY m.{key}
LIMIT %(limit)s

-- name: trigger_matches
-- Whether one row still matches its trigger's filter.
SELECT EXISTS ({trigger_matching} WHERE m.{key} = %(key)s) AS matches

-- name: jobs_prune
-- Delete up to %(batch)s finished jobs per final state older than that state's
-- retention (seconds; NULL keeps them), and as many finished beat fires older than
-- %(fires)s. Only the leader of service 'prune-jobs' deletes; the others see
-- leader = false. Rows are locked one batch at a time, and
-- SKIP LOCKED never waits for a row someone else holds. Each state is read as its
-- own range of jobs_finished_idx (the literal IN lets the planner use that partial
-- index); `since_*` is where the previous batch of a state stopped, so the scan
-- skips the entries of the rows it just deleted.
WITH {leader}, old AS (
    SELECT s.state, now() - make_interval(secs => s.keep) AS cutoff, coalesce(s.since, '-infinity') AS since
    FROM (VALUES ('completed'::{schema}.job_state, %(completed)s::float8, %(since_completed)s::timestamptz),
                 ('cancelled'::{schema}.job_state, %(cancelled)s::float8, %(since_cancelled)s::timestamptz),
                 ('discarded'::{schema}.job_state, %(discarded)s::float8, %(since_discarded)s::timestamptz)
         ) AS s(state, keep, since)
    WHERE s.keep IS NOT NULL AND (SELECT ok FROM leader)
), gone AS (
    -- (= ANY(ARRAY(…)) keeps the delete on the primary key: a join could scan the table.)
    DELETE FROM {schema}.jobs AS j WHERE j.id = ANY(ARRAY(
        SELECT c.id FROM old CROSS JOIN LATERAL (
            SELECT id FROM {schema}.jobs
            WHERE state IN ('completed', 'discarded', 'cancelled') AND state = old.state
              AND coalesce(completed_at, discarded_at, cancelled_at) < old.cutoff
              AND coalesce(completed_at, discarded_at, cancelled_at) >= old.since
            ORDER BY state, coalesce(completed_at, discarded_at, cancelled_at)
            LIMIT %(batch)s FOR UPDATE SKIP LOCKED
        ) c))
    RETURNING j.state, coalesce(j.completed_at, j.discarded_at, j.cancelled_at) AS finished
), gone_fires AS (
    DELETE FROM {schema}.beat_fires AS f WHERE f.ctid = ANY(ARRAY(
        SELECT ctid FROM {schema}.beat_fires
        WHERE done AND fired_at < now() - make_interval(secs => %(fires)s) AND (SELECT ok FROM leader)
        ORDER BY fired_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED
    ))
    RETURNING 1
)
SELECT (SELECT ok FROM leader) AS leader,
       (SELECT count(*) FROM gone WHERE state = 'completed') AS completed,
       (SELECT count(*) FROM gone WHERE state = 'cancelled') AS cancelled,
       (SELECT count(*) FROM gone WHERE state = 'discarded') AS discarded,
       (SELECT count(*) FROM gone_fires) AS fires,
       (SELECT max(finished) FROM gone WHERE state = 'completed') AS last_completed,
       (SELECT max(finished) FROM gone WHERE state = 'cancelled') AS last_cancelled,
       (SELECT max(finished) FROM gone WHERE state = 'discarded') AS last_discarded;
