"""Testing helpers: a migrated, isolated pgbroker schema per test, assertions on what
was enqueued, and ``drain()`` to run jobs inline.

With pytest, add ``pytest_plugins = ["pgbroker.testing"]`` to your ``conftest.py``::

    def test_signup_sends_welcome(pgbroker_sandbox):
        pgbroker_sandbox.configure(app)           # manual mode: jobs are recorded, not run
        signup("ann@example.com")
        pgbroker_sandbox.assert_enqueued(task="accounts.send_welcome", args=["ann@example.com"])
        pgbroker_sandbox.refute_enqueued(task="accounts.send_invoice")
        assert pgbroker_sandbox.drain(app, "celery").completed == 1

The database is ``$PGBROKER_TEST_URL`` when set, else an embedded PostgreSQL
(``pgbroker[embedded]``); every test gets a fresh schema, dropped afterwards. Outside
pytest, ``with sandbox() as box:`` does the same.

``drain`` runs jobs with Celery's eager semantics (``Task.apply``: signals, retries
run at once and inline), records each outcome on its job row (completed, discarded
with the error, snoozed) and repeats until the queue is empty, so jobs enqueued by
drained jobs run too.
"""
from __future__ import annotations

import base64
import contextlib
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from .config import Options, broker_url, conninfo_from_url
from .db import Database
from .engine import Outcome, describe, engine_for, error_entry, job_filter
from .errors import TransactionError
from .types import Job

__all__ = ["Sandbox", "Enqueued", "Drained", "sandbox", "database_url", "django_database_url", "pgbroker_sandbox",
           "pgbroker_database_url"]

#: Job states that count as enqueued (waiting to run).
WAITING = ("available", "scheduled", "retryable")


def database_url() -> str:
    """A ``postgresql://`` URL to test against: ``$PGBROKER_TEST_URL``, else an embedded
    server (started once, reused by later calls and processes)."""
    url = os.environ.get("PGBROKER_TEST_URL")
    if url:
        return conninfo_from_url(url)
    from . import embedded

    return embedded.start()


def django_database_url(alias: str = "default") -> str:
    """The URL of the database Django's connection ``alias`` uses now: under Django's
    test runner, the test database (``test_<NAME>``). A sandbox there lets publishes
    join Django's transactions (``join_django_atomic``) in a ``TransactionTestCase``."""
    from urllib.parse import quote, urlencode

    from django.db import connections
    from psycopg import pq

    libpq = {o.keyword.decode() for o in pq.Conninfo.get_defaults()}
    params = {k: str(v) for k, v in connections[alias].get_connection_params().items()  # and psycopg's own
              if k in libpq and v not in (None, "")}
    dbname = params.pop("dbname", "")
    return f"postgresql:///{quote(dbname, safe='')}?{urlencode(params)}"  # host may be a socket directory


@dataclass(frozen=True)
class Enqueued:
    """A job as a test sees it: its row, and the task call decoded from its message."""

    job: Job
    task: str | None
    args: list
    kwargs: dict
    headers: dict

    @property
    def queue(self) -> str:
        return self.job.queue


@dataclass
class Drained:
    """What :meth:`Sandbox.drain` did, by outcome; ``results`` maps task ids to return values."""

    completed: int = 0
    failed: int = 0
    snoozed: int = 0
    discarded: int = 0
    results: dict[str, Any] = field(default_factory=dict)


class Sandbox:
    """One migrated pgbroker schema in a test database."""

    def __init__(self, url: str, schema: str):
        self.url = url
        self.schema = schema
        self.broker_url = broker_url(url)  # the same conninfo as self.db (shutdown closes both)
        self.transport_options = {"schema": schema, "polling_interval": 0.2}
        self.db = Database.get(url, Options.from_mapping(self.transport_options))
        self.db.ensure_ready()
        self.engine = engine_for(self.db)

    def configure(self, app) -> Any:
        """Point ``app``'s broker (and a pgbroker result backend) at this schema, in
        manual mode: publishing records jobs, and nothing runs them but :meth:`drain`.
        Connections the app pooled for an earlier broker are dropped. Returns ``app``."""
        # What Celery's after-fork hook resets (its close() would also unregister the app).
        if app._pool is not None:
            app._pool.force_close_all()
            app._pool = None
        amqp = app.__dict__.get("amqp")
        if amqp is not None:
            amqp._producer_pool = None
        app.conf.update(broker_url=self.broker_url, task_always_eager=False,
                        broker_transport_options={**(app.conf.broker_transport_options or {}),
                                                  **self.transport_options})
        if str(app.conf.result_backend or "").startswith("pgbroker"):
            app.conf.update(result_backend=self.broker_url, result_backend_transport_options=self.transport_options)
            app._backend_cache = None  # built again for this schema on first use
            app._local.__dict__.pop("backend", None)
        return app

    # -- assertions -----------------------------------------------------------------------

    def enqueued(self, task: str | None = None, queue: str | None = None, meta: dict | None = None,
                 state: str | Sequence[str] = WAITING) -> list[Enqueued]:
        """Jobs waiting to run (or in ``state``), oldest first, matching the filters."""
        rows = self.db.fetchall("jobs_list", limit=10_000, before=None,
                                **job_filter(states=state, queue=queue, task=task, meta=meta))
        return [Enqueued(Job.from_row(row), row["task"], *_call_of(row)) for row in reversed(rows)]

    def assert_enqueued(self, task: str | None = None, args: Sequence | None = None, kwargs: dict | None = None,
                        queue: str | None = None, meta: dict | None = None, count: int | None = None,
                        state: str | Sequence[str] = WAITING) -> list[Enqueued]:
        """Assert that jobs matching every given field are enqueued (exactly ``count`` of
        them, if given; else at least one); returns them. ``kwargs`` must be contained."""
        matching = self._matching(task, args, kwargs, queue, meta, state)
        if (count is None and not matching) or (count is not None and len(matching) != count):
            wanted = {k: v for k, v in dict(task=task, args=args, kwargs=kwargs, queue=queue, meta=meta).items()
                      if v is not None}
            raise AssertionError(f"expected {'a' if count is None else count} job(s) matching {wanted}, "
                                 f"found {len(matching)}; enqueued: {self._describe(state)}")
        return matching

    def refute_enqueued(self, task: str | None = None, args: Sequence | None = None, kwargs: dict | None = None,
                        queue: str | None = None, meta: dict | None = None,
                        state: str | Sequence[str] = WAITING) -> None:
        """Assert that no job matching every given field is enqueued."""
        matching = self._matching(task, args, kwargs, queue, meta, state)
        if matching:
            raise AssertionError(f"expected no job matching, found {len(matching)}: "
                                 f"{[(e.task, e.args, e.kwargs, e.queue) for e in matching]}")

    def _matching(self, task, args, kwargs, queue, meta, state) -> list[Enqueued]:
        return [e for e in self.enqueued(task=task, queue=queue, meta=meta, state=state)
                if (args is None or list(e.args) == list(args))
                and (kwargs is None or all(e.kwargs.get(k, _MISSING) == v for k, v in kwargs.items()))]

    def _describe(self, state) -> list[tuple]:
        return [(e.task, e.args, e.kwargs, e.queue) for e in self.enqueued(state=state)][:20]

    # -- running --------------------------------------------------------------------------

    def drain(self, app, queue: str = "celery", with_scheduled: bool = False, max_jobs: int = 1000) -> Drained:
        """Run ``queue``'s available jobs inline until none is left (with ``with_scheduled``,
        the scheduled and retryable ones of the start too, whatever their time; a job
        snoozed meanwhile waits for its time); at most ``max_jobs``."""
        from .worker import Snooze

        done = Drained()
        consumer = f"drain/{os.getpid()}#1"
        ran = 0
        if with_scheduled:
            self.db.fetchall("testing_make_due", queue=queue)
        while ran < max_jobs:
            self.engine.stage()
            claimed = self.engine.claim([queue], min(100, max_jobs - ran), consumer)
            if not claimed:
                return done
            for message, _ in claimed:
                ran += 1
                self.engine.settle([self._run(app, message, done, Snooze)])
        return done

    def _run(self, app, message: dict, done: Drained, Snooze) -> Outcome:
        args, kwargs, headers = _call_of(message)
        job_id, attempt = headers["pgbroker_job"]
        name, task_id = headers.get("task"), headers.get("id")
        task = app.tasks.get(name) if name else None
        if task is None:
            done.discarded += 1
            return Outcome(job_id, attempt, "discarded", error_entry(attempt, f"unknown task {name!r}"))
        carried = {k: v for k, v in headers.items() if k.startswith("pgbroker_") and k != "pgbroker_job"}
        result = task.apply(args, kwargs, task_id=task_id, retries=headers.get("retries") or 0, headers=carried)
        value = result.result
        if isinstance(value, Snooze):
            done.snoozed += 1
            return Outcome(job_id, attempt, "snoozed", delay=value.seconds)
        if result.successful():
            done.completed += 1
            done.results[task_id] = value
            return Outcome(job_id, attempt, "completed")
        done.failed += 1
        text, tb = describe(value) if isinstance(value, BaseException) else (repr(value), None)
        return Outcome(job_id, attempt, "discarded", error_entry(attempt, text, result.traceback or tb))


_MISSING = object()


def _call_of(message: dict) -> tuple[list, dict, dict]:
    """(args, kwargs, headers) of a Celery task message (a job row or a claimed message;
    protocol 2 or 1)."""
    from kombu.serialization import loads
    from kombu.utils.json import loads as json_loads

    headers, properties = (json_loads(v) if isinstance(v, str) else v
                           for v in (message["headers"], message["properties"]))
    body = message["body"]
    if properties.get("body_encoding") == "base64":
        body = base64.b64decode(body)
    content_type = message.get("content_type", message.get("content-type"))
    content_encoding = message.get("content_encoding", message.get("content-encoding"))
    decoded = loads(body, content_type, content_encoding, accept=None)
    if isinstance(decoded, (list, tuple)) and len(decoded) == 3:
        return list(decoded[0] or []), dict(decoded[1] or {}), headers
    if isinstance(decoded, dict):  # protocol 1
        return list(decoded.get("args") or []), dict(decoded.get("kwargs") or {}), {**decoded, **headers}
    return [], {}, headers


@contextlib.contextmanager
def sandbox(url: str | None = None) -> Iterator[Sandbox]:
    """A :class:`Sandbox` in a fresh schema of ``url`` (default :func:`database_url`),
    dropped with everything in it afterwards."""
    import psycopg

    from .maintenance import shutdown

    url = conninfo_from_url(url) if url else database_url()
    schema = "test_" + uuid.uuid4().hex[:12]
    box = Sandbox(url, schema)
    try:
        yield box
    finally:
        shutdown(box.db)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '5s'")
            try:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            except psycopg.errors.LockNotAvailable:
                raise TransactionError(
                    f"cannot drop the sandbox schema {schema!r}: a transaction that wrote to it is still open "
                    "(a Django TestCase runs each test in a transaction it never commits). pgbroker.testing "
                    "reads committed jobs: use a TransactionTestCase") from None


try:  # pytest fixtures, when this module is loaded as a plugin
    import pytest
except ImportError:  # pragma: no cover - pytest is optional
    pass
else:
    @pytest.fixture(scope="session")
    def pgbroker_database_url() -> str:
        """The test database URL (see :func:`database_url`)."""
        return database_url()

    @pytest.fixture
    def pgbroker_sandbox(pgbroker_database_url) -> Iterator[Sandbox]:
        """A migrated pgbroker schema of its own for this test (see :class:`Sandbox`)."""
        with sandbox(pgbroker_database_url) as box:
            yield box
