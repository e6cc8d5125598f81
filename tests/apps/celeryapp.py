"""The Celery app the acceptance tests run under real ``celery worker`` processes.

Configured from the environment the test sets: ``BROKER_URL``, ``PGBROKER_SCHEMA``,
``TEST_DB_URL`` (where tasks record their side effects, in ``<schema>.effects``)
and ``TEST_READY_DIR`` (the worker touches ``<name>.ready`` there when ready).
Task code is ordinary Celery code: nothing here knows about pgbroker.
"""
from __future__ import annotations

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
        "heartbeat_interval": 0.5,
        "rescue_after": 2.0,
        "max_result_size": 100_000,
        "prune_interval": float(os.environ.get("PRUNE_INTERVAL", "60")),
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


@signals.worker_ready.connect
def _ready(**kwargs):
    ready_dir = os.environ.get("TEST_READY_DIR")
    if ready_dir:
        Path(ready_dir, os.environ.get("TEST_WORKER_NAME", "worker") + ".ready").touch()
