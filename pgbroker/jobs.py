"""The job API: read, filter, retry and cancel jobs; inspect and control queues.

Every function takes a ``source``: a Celery app whose broker is pgbroker, a
:class:`~pgbroker.db.Database`, a :class:`~pgbroker.engine.JobEngine` or a database
URL (``schema=`` then names the schema, which must exist: see ``pgbroker migrate``)::

    import pgbroker.jobs as jobs

    job = jobs.get(app, result.id)           # Job: state, attempt, max_attempts, errors, …
    failed = jobs.list(app, state="discarded", queue="emails", meta={"tenant": 7})
    jobs.retry(app, [j.task_id for j in failed])
    jobs.cancel(app, task="shop.send_receipt", meta={"order": 42})   # Cancelled(cancelled=…, revoked=…)
    jobs.pause(app, "emails"); jobs.limit(app, "emails", concurrency=5, rate="100/m")

The same operations are the ``pgbroker jobs`` and ``pgbroker queues`` commands.
"""
from __future__ import annotations

import builtins
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import telemetry
from .config import Options, conninfo_from_url, validate_name
from .engine import _KEEP, JobEngine, engine_for
from .errors import InvalidJobOption
from .types import Job

__all__ = ["get", "get_many", "list", "count", "retry", "cancel", "Cancelled", "queues", "pause", "resume", "limit",
           "status", "parse_rate"]

_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*([smhd])\s*$")


def _engine(source: Any, schema: str | None = None) -> JobEngine:
    from .db import Database, database_for

    if isinstance(source, JobEngine):
        return source
    if isinstance(source, Database):
        return engine_for(source)
    if isinstance(source, str):
        # An administrative call: a mistyped schema is an error, not a new empty schema.
        db = Database.get(conninfo_from_url(source), Options(schema=schema or "pgbroker", auto_migrate=False))
    elif hasattr(source, "conf") and hasattr(source, "connection_for_write"):
        db = database_for(source)
    else:
        raise TypeError(f"expected a Celery app, Database, JobEngine or URL, got {source!r}")
    db.ensure_ready()
    return engine_for(db)


def get(source: Any, task_id: str, schema: str | None = None) -> Job | None:
    """The job of a Celery task id, with its attempt count and budget, timestamps and
    every error entry (one per failed attempt: attempt, at, error, traceback); None when
    there is none (never published, or pruned)."""
    found = _engine(source, schema).jobs([task_id])
    return found[0] if found else None


def get_many(source: Any, task_ids: Sequence[str], schema: str | None = None) -> builtins.list[Job]:
    """The jobs of these Celery task ids, in one query (those that exist)."""
    return _engine(source, schema).jobs(builtins.list(task_ids))


def list(source: Any, state: str | Sequence[str] | None = None, queue: str | None = None, task: str | None = None,
         meta: dict | None = None, limit: int = 50, before: int | None = None, schema: str | None = None) -> builtins.list[Job]:
    """Jobs matching every given filter, newest first; ``before`` (a job id) pages on.
    ``meta`` matches jobs whose meta contains it. An unknown state raises InvalidState."""
    return _engine(source, schema).list_jobs(limit=limit, before=before, states=state, queue=queue, task=task,
                                             meta=meta)


def count(source: Any, state: str | Sequence[str] | None = None, queue: str | None = None, task: str | None = None,
          meta: dict | None = None, schema: str | None = None) -> int:
    """How many jobs match the filters."""
    return _engine(source, schema).count_jobs(states=state, queue=queue, task=task, meta=meta)


def retry(source: Any, task_ids: Sequence[str], schema: str | None = None) -> builtins.list[str]:
    """Run discarded or cancelled jobs once more, now; returns the task ids retried (jobs
    in other states are left alone). When the attempt budget is spent it grows by one;
    errors are kept and ``meta.retried`` counts manual retries. The task's stored outcome
    (with pgbroker as this process's result backend) is deleted, so that ``get()`` waits
    for the new run, and workers that remember a revoke of the task forget it."""
    from kombu.utils.encoding import bytes_to_str

    from .backend import backend_for

    engine = _engine(source, schema)
    task_ids = builtins.list(task_ids)
    backend = backend_for(engine.db)
    keys = [bytes_to_str(backend.get_key_for_task(t)) for t in task_ids] if backend is not None else None
    return engine.retry_jobs(task_ids, keys)


@dataclass(frozen=True)
class Cancelled:
    """What :func:`cancel` did: jobs cancelled before they started, and running ones
    asked to terminate (Celery's revoke with ``terminate=True``)."""

    cancelled: int
    revoked: int
    task_ids: builtins.list[str] = field(default_factory=builtins.list)


def cancel(source: Any, task_ids: Sequence[str] | None = None, queue: str | None = None, task: str | None = None,
           meta: dict | None = None, revoke: bool = True, by: str | None = None, schema: str | None = None,
           progress: Callable[[int], None] | None = None, states: Sequence[str] | None = None) -> Cancelled:
    """Cancel jobs by task id and/or by queue, task name and metadata (at least one).

    Available, scheduled and retryable jobs (or only those of ``states`` among them) are
    cancelled for good, in batches (they never start, whatever the workers do);
    ``progress(n)`` is called after each batch.
    Executing ones are revoked with ``terminate=True`` through Celery's remote control
    (the worker reports them cancelled) unless ``revoke=False``.
    """
    if task_ids is None and queue is None and task is None and meta is None:
        raise InvalidJobOption("cancel needs task ids or a filter (queue, task, meta); "
                               "to empty a whole queue, pass queue=")
    engine = _engine(source, schema)
    by = by or f"pgbroker.jobs.cancel on {socket.gethostname()}/{os.getpid()}"
    where = {"queue": queue, "task": task, "meta": meta,
             "task_ids": builtins.list(task_ids) if task_ids is not None else None}
    from .backend import bare_app, mark_revoked

    cancelled: builtins.list[str] = []
    total = 0
    for batch in engine.cancel_where(by, states=states, **where):
        total += len(batch)
        tasks = [r for r in batch if r["task_id"] is not None]
        cancelled += [r["task_id"] for r in tasks]
        mark_revoked(engine.db, tasks)
        if progress is not None:
            progress(len(batch))
    running = engine.executing_task_ids(**where) if revoke else []
    if running:  # the broadcast goes through the transport, which records who asked on the jobs
        if hasattr(source, "control"):
            source.control.revoke(running, terminate=True)
        else:
            with bare_app(engine.db) as app:  # workers of any app listen on the default control exchange
                app.control.revoke(running, terminate=True)
    result = Cancelled(cancelled=total, revoked=len(running), task_ids=cancelled + running)
    telemetry.emit("job.cancelled", {"cancelled": result.cancelled, "revoked": result.revoked},
                   {"queue": queue, "task": task, "by": by})
    return result


def parse_rate(rate: Any) -> tuple[int, float] | None:
    """A rate limit as ``(jobs, period seconds)``: ``"100/m"``, ``"5/2s"``, ``(10, 1.0)``,
    or None (no limit). Zero, negative or malformed rates raise InvalidJobOption."""
    if rate is None:
        return None
    if isinstance(rate, str):
        match = _RATE_RE.match(rate)
        if not match:
            raise InvalidJobOption(f"rate {rate!r} is not N/PERIOD, e.g. '100/m', '5/2s' (units s, m, h, d)")
        n, multiple, unit = match.groups()
        rate = (int(n), float(multiple or 1) * _PERIODS[unit])
    try:
        n, period = rate
    except (TypeError, ValueError):
        raise InvalidJobOption(f"rate must be 'N/PERIOD' or (N, seconds), got {rate!r}") from None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidJobOption(f"a rate limit needs at least 1 job per period, got {n!r}")
    if isinstance(period, bool) or not isinstance(period, (int, float)) or not period > 0 or period != period:
        raise InvalidJobOption(f"a rate limit period must be > 0 seconds, got {period!r}")
    return n, float(period)


def queues(source: Any, queue: str | None = None, schema: str | None = None) -> builtins.list[dict]:
    """Per queue: jobs per state, ``oldest_available`` (seconds the oldest available job
    has waited, None when none), ``paused``, ``concurrency``, ``rate_limit``/``rate_period``."""
    return _engine(source, schema).queue_stats(queue)


def pause(source: Any, queue: str, schema: str | None = None) -> dict:
    """Stop every worker from starting jobs of ``queue`` (persisted; running jobs finish).

    Like :func:`resume` and :func:`limit`, returns the queue's controls (``paused``,
    ``concurrency``, ``rate_limit``, ``rate_period``) and ``created``: True when no
    producer or worker had declared the queue yet (controls can be set ahead of them,
    but it may be a typo)."""
    return _engine(source, schema).set_queue(validate_name("queue", queue), paused=True)


def resume(source: Any, queue: str, schema: str | None = None) -> dict:
    """Let workers start jobs of ``queue`` again."""
    return _engine(source, schema).set_queue(validate_name("queue", queue), paused=False)


def limit(source: Any, queue: str, concurrency: Any = _KEEP, rate: Any = _KEEP, schema: str | None = None) -> dict:
    """Set cluster-wide limits of ``queue``: ``concurrency`` (most executing jobs across
    every worker) and ``rate`` (most jobs started per period, see :func:`parse_rate`).
    None removes a limit; a limit left out is kept. Enforced in the claim."""
    if concurrency is not _KEEP and concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1):
        raise InvalidJobOption(f"concurrency must be an integer >= 1 (or None: no limit), got {concurrency!r}")
    parsed = rate if rate is _KEEP else parse_rate(rate)
    return _engine(source, schema).set_queue(validate_name("queue", queue), concurrency=concurrency, rate=parsed)


def status(source: Any, schema: str | None = None) -> dict:
    """The state of a pgbroker schema at a glance: database, schema version, live
    workers (consumers) with their queues and heartbeat, and job counts per state."""
    from .schema import LATEST

    engine = _engine(source, schema)
    stats = engine.queue_stats()
    totals = {state: sum(q[state] for q in stats) for state in
              ("available", "scheduled", "executing", "retryable", "completed", "discarded", "cancelled")}
    with engine.db.connection() as conn:
        from .schema import current_version

        version = current_version(conn, engine.schema)
    return {"database": engine.db.safe_url, "schema": engine.schema, "version": version, "latest": LATEST,
            "consumers": engine.consumers(), "queues": len(stats), "jobs": totals,
            "paused": [q["queue"] for q in stats if q["paused"]]}
