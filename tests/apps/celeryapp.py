"""The Celery app the acceptance tests run under real ``celery worker`` processes.

Configured from the environment the test sets: ``BROKER_URL``, ``PGBROKER_SCHEMA``,
``TEST_DB_URL`` (where tasks record their side effects, in ``<schema>.effects``)
and ``TEST_READY_DIR`` (the worker touches ``<name>.ready`` there when ready).
Task code is ordinary Celery code: nothing here knows about pgbroker.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psycopg
from celery import Celery, signals

SCHEMA = os.environ.get("PGBROKER_SCHEMA", "pgbroker")

app = Celery("tests", broker=os.environ.get("BROKER_URL"))
app.conf.update(
    broker_transport_options={
        "schema": SCHEMA,
        "polling_interval": float(os.environ.get("PGBROKER_POLLING_INTERVAL", "1.0")),
        "heartbeat_interval": float(os.environ.get("PGBROKER_HEARTBEAT_INTERVAL", "0.5")),
        "rescue_after": 4 * float(os.environ.get("PGBROKER_HEARTBEAT_INTERVAL", "0.5")),
        "max_result_size": 100_000,
        "prune_interval": float(os.environ.get("PRUNE_INTERVAL", "60")),
        # the tests read job rows after the fact: keep them unless a test asks
        "prune_completed_after": os.environ.get("PRUNE_JOBS_AFTER", "never"),
        "prune_cancelled_after": os.environ.get("PRUNE_JOBS_AFTER", "never"),
        "prune_discarded_after": os.environ.get("PRUNE_JOBS_AFTER", "never"),
        "join_django_atomic": os.environ.get("PGBROKER_JOIN_DJANGO") == "1",
    },
    task_ignore_result=True,
    task_routes={"tests.apps.celeryapp.routed": {"queue": "routed-q"}},
    worker_prefetch_multiplier=int(os.environ.get("PREFETCH_MULTIPLIER", "4")),
    broker_connection_retry_on_startup=True,
    event_queue_expires=float(os.environ.get("EVENT_QUEUE_EXPIRES", "60")),
)
if os.environ.get("RESULT_BACKEND"):
    serializer = os.environ.get("RESULT_SERIALIZER", "json")
    app.conf.update(result_backend=os.environ["RESULT_BACKEND"], task_ignore_result=False,
                    result_polling_interval=float(os.environ.get("RESULT_POLLING_INTERVAL", "1.0")),
                    result_extended=os.environ.get("RESULT_EXTENDED") == "1",
                    result_serializer=serializer, result_accept_content=["json", serializer],
                    result_expires=float(os.environ.get("RESULT_EXPIRES", 86400)))


def _db():
    return psycopg.connect(os.environ["TEST_DB_URL"], autocommit=True)


def effect(key: str, what: str = "ran") -> None:
    with _db() as conn:
        conn.execute(
            f'INSERT INTO "{SCHEMA}".effects (key, what, pid) VALUES (%s, %s, %s)', (key, what, os.getpid())
        )


@app.task
def record(key):
    effect(key)
    return key


@app.task
def routed(key):
    effect(key, "routed")


@app.task(time_limit=1)
def overruns(key):
    """Runs past its hard time limit: the pool kills its process."""
    effect(key, "started")
    time.sleep(30)


@app.task(soft_time_limit=1)
def softly_overruns(key):
    """Runs past its soft time limit: SoftTimeLimitExceeded fails it in its process."""
    effect(key, "started")
    time.sleep(30)


@app.task(acks_late=True)
def gated(key):
    """Record the start, wait (bounded) until the test opens the gate, record the end."""
    effect(key, "started")
    deadline = time.monotonic() + 120
    with _db() as conn:
        while time.monotonic() < deadline:
            if conn.execute(f'SELECT 1 FROM "{SCHEMA}".gates WHERE open').fetchone():
                break
            time.sleep(0.05)
    effect(key, "done")
    return key


@app.task
def gated_early(key):
    """``gated``, acknowledged when it starts (Celery's default)."""
    return gated(key)


@app.task(bind=True)
def reports_progress(self, key):
    """Store a PROGRESS state, then wait for the gate like ``gated``."""
    self.update_state(state="PROGRESS", meta={"key": key})
    return gated(key)


@app.task(autoretry_for=(ValueError,), retry_backoff=1, retry_jitter=False, max_retries=2)
def always_fails(key):
    effect(key, "attempt")
    raise ValueError(f"boom {key}")


@app.task(bind=True, max_retries=3)
def fails_twice(self, key):
    effect(key, "attempt")
    if self.request.retries < 2:
        raise self.retry(exc=RuntimeError(f"transient {self.request.retries}"), countdown=0.2)
    effect(key, "done")


@app.task(bind=True, max_retries=0)
def snoozes_twice(self, key):
    """Not ready twice (snoozed, which spends no retry: max_retries=0), then done."""
    from pgbroker import Snooze

    effect(key, "attempt")
    with _db() as conn:
        (tries,) = conn.execute(f'SELECT count(*) FROM "{SCHEMA}".effects WHERE key = %s', (key,)).fetchone()
    if tries < 3:
        raise Snooze(0.2)
    effect(key, "done")


@app.task(bind=True, max_retries=3)
def retries_in_transaction(self, key):
    """Publishes a follow-up and retries from inside pgbroker.atomic(): the retry must
    survive the rollback its exception causes; the follow-up must not."""
    import pgbroker

    effect(key, "attempt")
    with _db() as conn, conn.transaction(), pgbroker.atomic(conn):
        record.delay(f"{key}-follow-up-{self.request.retries}")
        if self.request.retries < 1:
            raise self.retry(countdown=0.1)
    effect(key, "done")


@app.task
def started_at(key):
    """Record the run and return when it started (time.time())."""
    at = time.time()
    effect(key)
    return at


@app.task
def add(x, y):
    return x + y


@app.task
def big(size):
    return "x" * size


@app.task
def unserializable():
    return object()


@app.task
def when():
    """A result only pickle (or yaml) can carry."""
    import datetime

    return {"at": datetime.date(2026, 11, 23), "tags": {"a", "b"}}


@app.task
def tsum(values):
    return sum(values)


class Boom(Exception):
    pass


@app.task
def boom(message):
    raise Boom(message)


# Beat: entries from the environment (JSON: name -> {task, schedule (seconds or the
# JSON schedule form), missed, options, …}); the scheduler looks again every second.
if os.environ.get("BEAT_SCHEDULE"):
    app.conf.beat_schedule = json.loads(os.environ["BEAT_SCHEDULE"])
app.conf.beat_max_loop_interval = float(os.environ.get("BEAT_MAX_INTERVAL", "1.0"))


@app.task
def periodic(label):
    effect(f"periodic-{label}")


# A trigger over an application table `items` (created by the tests that use it).
if os.environ.get("TEST_TRIGGERS") == "1":
    from pgbroker.beat import Trigger, TriggerTask

    items_trigger = Trigger(
        name="process_items", task="tests.apps.celeryapp.process_item",
        schedule=float(os.environ.get("TRIGGER_EVERY", "1.0")),
        query=f'SELECT id FROM "{SCHEMA}".items WHERE state = \'new\'',
        queue="items", max_attempts=2, retry_backoff=0.1, on_error="tests.apps.celeryapp.item_failed",
        trigger_once=os.environ.get("TRIGGER_ONCE") == "1", page_size=int(os.environ.get("TRIGGER_PAGE", "1000")),
    )

    @app.task(base=TriggerTask, trigger=items_trigger)
    def process_item(item_id):
        with _db() as conn:
            (fail,) = conn.execute(f'SELECT fail FROM "{SCHEMA}".items WHERE id = %s', (item_id,)).fetchone()
            if fail:
                effect(f"item-{item_id}", "attempt")
                raise Boom(f"item {item_id} fails")
            conn.execute(f'UPDATE "{SCHEMA}".items SET state = \'done\' WHERE id = %s', (item_id,))
        effect(f"item-{item_id}")

    @app.task
    def item_failed(item_id, trigger, error):
        effect(f"item-{item_id}", f"on_error {trigger}: {error}")


@app.task
def busy(key, seconds):
    """Work for ``seconds``, recording the start and the end."""
    effect(key, "start")
    time.sleep(seconds)
    effect(key, "end")


import pgbroker  # noqa: E402 - only this task and the telemetry log use pgbroker's API


@app.task(bind=True, base=pgbroker.Task, max_retries=10)
def retries_forever(self, key):
    """Always asks for a retry: per-call max_attempts and retry_backoff decide when to stop."""
    effect(key, "attempt")
    raise self.retry(exc=RuntimeError(f"attempt {self.request.retries + 1} failed"))

# Telemetry: every event of every process (workers, pool children, beats) as a JSON line.
if os.environ.get("TELEMETRY_LOG"):
    from pgbroker import telemetry

    def _log_event(name, measurements, metadata):
        line = json.dumps({"name": name, "measurements": dict(measurements), "metadata": dict(metadata),
                           "pid": os.getpid()}, default=str)
        with open(os.environ["TELEMETRY_LOG"], "a") as log:
            log.write(line + "\n")

    telemetry.subscribe(_log_event)


@signals.worker_ready.connect
def _ready(**kwargs):
    ready_dir = os.environ.get("TEST_READY_DIR")
    if ready_dir:
        Path(ready_dir, os.environ.get("TEST_WORKER_NAME", "worker") + ".ready").touch()
