"""The job engine: every operation on the jobs table, in terms of named queries.

It knows kombu's message format (see :mod:`pgbroker.message`) but not Celery, and
can be used and tested on its own::

    engine = JobEngine(Database.get(conninfo, Options()))
    engine.enqueue("default", {"body": "...", "headers": {}, "properties": {}})
    deliveries = engine.claim(["default"], limit=10, consumer="me")
"""
from __future__ import annotations

import json
import logging
import os
import socket
import queue as _queue
import threading
import time
import traceback as _traceback
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Sequence

import psycopg

from .db import Database
from . import enqueue as _enqueue
from .errors import DatabaseUnavailable, InvalidState, UniqueKeyBusy
from . import telemetry
from . import unique as _unique
from .message import Row, from_row, to_row
from .types import Job, JobState

logger = logging.getLogger(__name__)


def error_entry(attempt: int | None, error: str, tb: str | None = None) -> str:
    """One ``errors`` entry as JSON: {attempt, at, error, traceback?}."""
    entry: dict[str, Any] = {
        "attempt": attempt,
        "at": datetime.now(timezone.utc).isoformat(),
        "error": error,
    }
    if tb:
        entry["traceback"] = tb
    return json.dumps(entry)


def describe(exc: BaseException, with_traceback: bool = True) -> tuple[str, str | None]:
    """(``repr``-like text, formatted traceback) of an exception, for ``errors`` entries."""
    text = f"{type(exc).__name__}: {exc}"
    tb = "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__)) if with_traceback else None
    return text, tb


@dataclass(frozen=True)
class Outcome:
    """What happened to one delivery (job id + attempt), written by the :class:`Settler`.

    ``op`` is ``completed``, ``discarded``, ``cancelled``, ``snoozed`` (scheduled again in
    ``delay`` seconds, without spending an attempt), ``acked`` (delivery acknowledged, task
    still running) or ``error`` (append an error entry only, whatever the state).
    """

    job_id: int
    attempt: int
    op: str
    error: str | None = None
    delay: float | None = None


_KEEP = object()

_RANK = {"acked": 1, "completed": 2, "discarded": 2, "cancelled": 2, "snoozed": 2}


#: The columns of a no-ack row that :meth:`JobEngine.restore` puts back.
_RESTORED = ("id", "task_id", "queue", "task", "priority", "attempt", "max_attempts", "redelivered", "scheduled_at",
             "expires_at", "inserted_at", "headers", "properties", "body", "content_type", "content_encoding", "meta")


class JobEngine:
    """Operations on one schema's jobs, queues and consumers."""

    def __init__(self, db: Database):
        self.db = db
        self.schema = db.options.schema
        self._settler: Settler | None = None
        self._settler_lock = threading.Lock()
        self._controls: tuple[float, frozenset[str]] | None = None

    # -- publishing ----------------------------------------------------------------------------

    def enqueue(self, queue: str, message: dict, conn: psycopg.Connection | None = None) -> int | None:
        """Store one kombu message for ``queue``; returns the job id.

        With ``conn``, or inside ``pgbroker.atomic()``, the row is written on the
        caller's connection and so belongs to the caller's transaction (and so does
        its NOTIFY). None when the write waits for the end of an async ``atomic()``
        block or for the caller's commit. A unique job whose key is held returns the
        holder's id (see :mod:`pgbroker.unique`).
        """
        row = to_row(queue, message, self.db.options.max_message_size)
        if row.unique_key is not None and not row.retry:
            job_id, new = self._store_unique([row], conn)[0]
            _enqueued([row], [not new])
            return job_id
        stored = self.db.fetchone("enqueue", conn, **_single(_not_unique(row)))
        _enqueued([row], [False])
        return stored["id"] if stored else None

    def enqueue_many(
        self, items: Sequence[tuple[str, dict]], conn: psycopg.Connection | None = None, copies: bool = False
    ) -> list[int]:
        """Store many messages in one statement; returns the ids of the rows stored (a unique
        job whose key is held stores none; unique jobs cost two more statements).

        A Celery task id that appears twice in one call keeps only the last message,
        unless ``copies`` (then no row carries its task id).
        """
        limit = self.db.options.max_message_size
        rows: dict[Any, Row] = {}
        for i, (queue, message) in enumerate(items):
            row = to_row(queue, message, limit)
            if copies:
                row = _not_unique(replace(row, task_id=None))
            rows[row.task_id if row.task_id is not None else ("anon", i)] = row
        unique = [r for r in rows.values() if r.unique_key is not None and not r.retry]
        plain = [_not_unique(r) for r in rows.values() if r.unique_key is None or r.retry]
        ids = [r["id"] for r in self.db.fetchall("enqueue_many", conn, **_arrays(plain))] if plain else []
        _enqueued(plain, [False] * len(plain))
        if not unique:
            return ids
        stored = self._store_unique(unique, conn)
        _enqueued(unique, [not new for _, new in stored])
        return ids + [i for i, new in stored if new]

    def _store_unique(self, rows: list[Row], conn: psycopg.Connection | None) -> list[tuple[int | None, bool]]:
        """Store unique jobs; a held key stores nothing and records the holder as what
        the publish became (:func:`pgbroker.unique.duplicate_of`). (job id, stored by
        this call) in ``rows`` order; the id is None when the write was deferred."""
        keys = list(dict.fromkeys(r.unique_key for r in rows))
        self.db.fetchall("unique_release", keys=keys)  # on the pool, committed at once (see the query)
        if conn is None and _enqueue.binding_for(self.db.options) is None:
            inserted = self._insert_unique_waiting(rows, keys)
        else:
            inserted = self.db.fetchall("enqueue_unique", conn, **_arrays(rows))
        if isinstance(inserted, _enqueue.Deferred):  # written at the caller's commit: nothing known yet
            return [(None, True) for _ in rows]
        stored = {r["task_id"]: r["id"] for r in inserted}
        held = [r for r in rows if r.task_id not in stored]
        held_ids = {r.task_id for r in held}
        if held:
            holders = {h["unique_key"]: h for h in self.db.fetchall("unique_holders", conn, keys=keys)}
            for r in held:
                holder = holders.get(r.unique_key)
                if holder is not None:
                    _unique.record_duplicate(r.task_id, holder["task_id"])
                    stored[r.task_id] = holder["id"]
        return [(stored.get(r.task_id), r.task_id not in held_ids) for r in rows]

    def _insert_unique_waiting(self, rows: list[Row], keys: list[str]) -> list[dict]:
        """The unique insert on the pool. A key just published in a transaction that is
        still open makes it wait for that commit or rollback; at most ``pool_timeout``
        (from the same thread, that transaction could never end)."""
        try:
            with self.db.transaction() as own:
                own.execute("SELECT set_config('lock_timeout', %s, true)",
                            (f"{int(self.db.options.pool_timeout * 1000)}ms",))
                return self.db.fetchall("enqueue_unique", own, **_arrays(rows))
        except psycopg.errors.LockNotAvailable:
            raise UniqueKeyBusy(
                f"unique key(s) {keys} held by a job published in a transaction that has not committed or rolled "
                f"back within {self.db.options.pool_timeout:g}s (pool_timeout)") from None

    def enqueue_copies(self, queues: Sequence[str], message: dict) -> list[int]:
        """Store a copy of one message for each of ``queues`` (a routed publish that
        matched several). The copies carry no task id, so they do not replace each other."""
        return self.enqueue_many([(q, message) for q in queues], copies=True)

    def enqueue_fanout(self, exchange: str, message: dict) -> int:
        """Store a copy of ``message`` for every queue bound to ``exchange`` in the
        database (whichever process bound it); returns how many copies."""
        row = _not_unique(to_row(exchange, message, self.db.options.max_message_size))  # copies: no key
        params = {k: v for k, v in vars(row).items() if k not in ("task_id", "queue", "retry", "unique_key")}
        return len(self.db.fetchall("enqueue_fanout", exchange=exchange, **params))

    # -- consuming -----------------------------------------------------------------------------

    def claim(self, queues: Sequence[str], limit: int, consumer: str) -> list[tuple[dict, str]]:
        """Claim up to ``limit`` available jobs of ``queues`` for ``consumer``.

        Returns ``(kombu message dict, queue)`` pairs in delivery order
        (priority, then age). The rows are ``executing`` and owned by ``consumer``.
        One statement, whose commit does not wait for the WAL flush (see the query).
        Paused and limited queues (:meth:`set_queue`) are claimed from in a transaction
        that locks their rows first, so their limits hold across every worker.
        """
        controlled = self._controlled()
        limited = [q for q in queues if q in controlled]
        rows: list[dict] = []
        if limited:  # first: their limits bound them, and a busy plain queue must not starve them
            rows = self.db.run_in_transaction([  # one round trip; the claim still sees the lock holders' claims
                ("queue_controls_lock", {"queues": limited}),
                ("claim_controlled", {"queues": limited, "limit": limit, "consumer": consumer})])
        plain = [q for q in queues if q not in controlled]
        if plain and len(rows) < limit:
            rows += self.db.fetchall("claim", queues=plain, limit=limit - len(rows), consumer=consumer)
        rows.sort(key=lambda r: (-r["priority"], r["id"]))
        claimed = [(from_row(r), r["queue"]) for r in rows]
        if telemetry.enabled("job.claimed"):
            for r, (message, _) in zip(rows, claimed):
                headers = message["headers"]
                telemetry.emit("job.claimed", {"queue_time": r["queue_time"]}, telemetry.job_metadata(
                    r["id"], headers.get("id"), headers.get("task"), r["queue"], r["attempt"], consumer=consumer))
        return claimed

    def take(self, queues: Sequence[str], limit: int) -> list[tuple[dict, str, str]]:
        """Like :meth:`claim` for consumers that never acknowledge: the rows are deleted
        as they are delivered (at most once). Messages past their queue's
        x-message-ttl are deleted without being returned; when a whole page was stale,
        the next page is taken (a fresh message behind expired ones is not missed).
        Returns (message, queue, the row as it was: for :meth:`restore`)."""
        while True:
            rows = self.db.fetchall("claim_no_ack", queues=list(queues), limit=limit)
            fresh = [r for r in rows if not r["stale"]]
            if fresh or not rows:
                break
        fresh.sort(key=lambda r: (-r["priority"], r["id"]))
        return [(from_row(r), r["queue"], r) for r in fresh]

    def restore(self, rows: Sequence[dict]) -> int:
        """Put rows :meth:`take` returned and nobody received back, as they were."""
        columns = {c: [r[c] for r in rows] for c in _RESTORED}
        columns["attempt"] = [a - 1 for a in columns["attempt"]]  # the take counted a delivery
        return self.db.fetchone("restore_no_ack", **columns)["n"]

    def requeue(self, job_id: int, attempt: int) -> bool:
        """Make a delivery available again (redelivered); False if it was no longer ours."""
        return bool(self.db.fetchone("requeue", id=job_id, attempt=attempt)["n"])

    def settle(self, outcomes: Iterable[Outcome]) -> None:
        """Write outcomes now, in one transaction (the :class:`Settler` batches calls to this).

        The commit waits for the WAL flush, once per batch: an outcome the worker has
        written survives a server crash or failover (an early-acknowledged job whose
        outcome was lost would stay ``executing`` until its worker exits).
        """
        merged: dict[tuple[int, int], Outcome] = {}
        errors: list[Outcome] = []
        for o in outcomes:
            if o.op == "error":
                errors.append(o)
                continue
            key = (o.job_id, o.attempt)
            prev = merged.get(key)
            if prev is None or _RANK[o.op] >= _RANK[prev.op]:
                merged[key] = o
        statements: list[tuple[str, dict]] = []
        if merged:
            ms = list(merged.values())
            statements.append(("settle", {
                "ids": [o.job_id for o in ms], "attempts": [o.attempt for o in ms],
                "ops": [o.op for o in ms], "errors": [o.error for o in ms], "delays": [o.delay for o in ms],
            }))
        if errors:
            statements.append(("append_errors", {
                "ids": [o.job_id for o in errors], "errors": [o.error for o in errors],
            }))
        self.db.run_in_transaction(statements)

    @property
    def settler(self) -> "Settler":
        """This process's background writer of outcomes (started on first use)."""
        if self._settler is None:
            with self._settler_lock:
                if self._settler is None:
                    self._settler = Settler(self)
        return self._settler

    # -- time ------------------------------------------------------------------------------------

    def stage(self, limit: int = 1000) -> int:
        """Make due scheduled/retryable jobs available; returns how many."""
        return self.db.fetchone("stage", limit=limit)["n"]

    def next_due(self) -> tuple[float | None, float]:
        """Seconds until the next scheduled job is due (negative if overdue, None if none),
        and the server's clock (epoch seconds)."""
        row = self.db.fetchone("next_due")
        return row["seconds"], row["server_now"]

    # -- consumers and rescue ----------------------------------------------------------------------

    def heartbeat(
        self, consumer: str, hostname: str, pid: int, connections: Sequence[str], queues: Sequence[str] = ()
    ) -> None:
        """Register or refresh a consumer process, its open connections and consumed queues."""
        self.db.fetchall(
            "consumer_heartbeat", id=consumer, hostname=hostname, pid=pid, connections=list(connections),
            queues=list(queues),
        )

    def unregister_consumer(self, consumer: str) -> None:
        self.db.fetchall("consumer_unregister", id=consumer)

    def rescue(self, after: float, wait: bool = False, lease: float | None = None) -> dict[str, int] | None:
        """Rescue executing jobs of processes silent for ``after`` seconds, or of closed
        connections (up to ``rescue_batch_size``). None when this call is not the run's
        leader: another process is rescuing, or (with ``lease`` seconds) ran it within
        the interval. ``wait`` waits for a running rescue instead and needs no lease."""
        row = self.db.fetchone("rescue", after=after, batch=self.db.options.rescue_batch_size,
                               **leader_params("rescue", lease, wait))
        return row if row["leader"] else None

    # -- queues ------------------------------------------------------------------------------------

    def declare_queue(self, queue: str, arguments: dict | None = None, auto_delete: bool = False) -> None:
        """Create a queue (or mark it used). ``x-expires`` and ``x-message-ttl`` in
        ``arguments`` (milliseconds, as AMQP has them) make it expire / its messages;
        an ``auto_delete`` queue goes once consumed and then unused for ``rescue_after``."""
        arguments = arguments or {}
        self.db.fetchall(
            "queue_declare", queue=queue, arguments=json.dumps(arguments, default=str),
            expires=_seconds(arguments, "x-expires"), message_ttl=_seconds(arguments, "x-message-ttl"),
            auto_delete=bool(auto_delete),
        )

    def prune(self, rounds: int = 10, lease: float | None = None) -> dict[str, int] | None:
        """Delete finished jobs and beat fires past their retention (options
        ``prune_*_after``), up to ``rounds`` batches of ``prune_batch_size`` per state;
        None when this call is not the run's leader (another process is pruning, or with
        ``lease`` seconds, ran it within the interval)."""
        o = self.db.options
        total = {"completed": 0, "cancelled": 0, "discarded": 0, "fires": 0}
        since: dict[str, Any] = {"since_completed": None, "since_cancelled": None, "since_discarded": None}
        for _ in range(rounds):
            row = self.db.fetchone("jobs_prune", batch=o.prune_batch_size, completed=o.prune_completed_after,
                                   cancelled=o.prune_cancelled_after, discarded=o.prune_discarded_after,
                                   fires=o.prune_beat_fires_after, **since, **leader_params("prune-jobs", lease))
            lease = None  # the run's first batch took the lease; the next ones only need the lock
            if not row["leader"]:
                return None
            for key in total:
                total[key] += row[key]
            for state in ("completed", "cancelled", "discarded"):
                since[f"since_{state}"] = row[f"last_{state}"] or since[f"since_{state}"]
            if max(row[k] for k in total) < o.prune_batch_size:
                break
        return total

    def sweep_queues(self) -> dict[str, int]:
        """Delete expired queues and messages past their queue's TTL (see the query)."""
        return self.db.fetchone("queues_sweep", auto_delete_after=self.db.options.rescue_after)

    # -- routing -------------------------------------------------------------------------------

    def declare_exchange(self, exchange: str, type: str) -> None:
        self.db.fetchall("exchange_declare", exchange=exchange, type=type)

    def exchange_type(self, exchange: str) -> str | None:
        row = self.db.fetchone("exchange_type", exchange=exchange)
        return row["type"] if row else None

    def delete_exchange(self, exchange: str) -> None:
        self.db.fetchall("exchange_delete", exchange=exchange)

    def bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        self.db.fetchall(
            "binding_add", exchange=exchange, routing_key=routing_key or "", pattern=pattern or "", queue=queue
        )

    def unbind(self, exchange: str, routing_key: str, queue: str) -> None:
        self.db.fetchall("binding_remove", exchange=exchange, routing_key=routing_key or "", queue=queue)

    def bindings(self, exchange: str) -> list[tuple[str, str, str]]:
        """``exchange``'s routing table: ``(routing_key, pattern, queue)`` rows."""
        return [(r["routing_key"], r["pattern"], r["queue"]) for r in self.db.fetchall("bindings_of", exchange=exchange)]

    # -- cancelling ------------------------------------------------------------------------------

    def cancel(self, task_ids: Sequence[str], by: str, running: bool = False) -> list[dict]:
        """Cancel the not yet started jobs of these Celery task ids for good; returns
        one row per job cancelled: its ``task_id``, and its kombu ``message`` (JSON) when
        it is in a Celery group, else None. With ``running``, also record ``by`` on
        running jobs (their worker is asked to terminate them and reports the outcome)."""
        rows = self.db.fetchall("jobs_cancel", task_ids=list(task_ids), by=by, running=running)
        return [r for r in rows if r["cancelled"]]

    def cancel_where(self, by: str, batch: int = 1000, **where: Any) -> Iterator[list[dict]]:
        """Cancel not yet started jobs matching ``where`` (:func:`job_filter`), a batch
        per transaction; yields the rows of each batch, as :meth:`cancel` returns them
        (``task_id`` is None for plain messages)."""
        while True:
            rows = self.db.fetchall("jobs_cancel_where", by=by, batch=batch, **job_filter(**where))
            if not rows:
                return
            yield rows

    def executing_task_ids(self, **where: Any) -> list[str]:
        """Celery task ids of executing jobs matching ``where``."""
        return [r["task_id"] for r in self.db.fetchall("jobs_executing_where", **job_filter(**where))]

    def count_jobs(self, **where: Any) -> int:
        return self.db.fetchone("jobs_count", **job_filter(**where))["n"]

    def list_jobs(self, limit: int = 50, before: int | None = None, **where: Any) -> list[Job]:
        """Matching jobs, newest first (``before``: only ids below it, for the next page)."""
        rows = self.db.fetchall("jobs_list", limit=limit, before=before, **job_filter(**where))
        return [Job.from_row(r) for r in rows]

    def retry_jobs(self, task_ids: Sequence[str], result_keys: Sequence[str | None] | None = None) -> list[str]:
        """Make discarded/cancelled jobs of these task ids available again; returns those
        retried. ``result_keys`` (parallel to ``task_ids``): the stored results to delete
        with the retried ones."""
        keys = list(result_keys) if result_keys is not None else [None] * len(task_ids)
        return [r["task_id"] for r in self.db.fetchall("jobs_retry", task_ids=list(task_ids), result_keys=keys)]

    def queue_stats(self, queue: str | None = None) -> list[dict]:
        return self.db.fetchall("queue_stats", queue=queue)

    def set_queue(self, queue: str, paused: bool | None = None, concurrency: Any = _KEEP,
                  rate: Any = _KEEP) -> dict:
        """Set a queue's controls; ``concurrency``/``rate`` (``(limit, period seconds)``)
        None removes that limit, and left out keeps it."""
        limit, period = (None, None) if rate is _KEEP or rate is None else rate
        row = self.db.fetchone("queue_control_set", queue=queue, paused=paused,
                               concurrency=None if concurrency is _KEEP else concurrency,
                               set_concurrency=concurrency is not _KEEP, rate_limit=limit, rate_period=period,
                               set_rate=rate is not _KEEP)
        self._controls = None
        return row

    def _controlled(self) -> frozenset[str]:
        """Names of paused or limited queues, re-read at most every ``routing_cache_ttl``
        seconds (a stale answer only sends a queue's claim the longer way: the plain
        claim never takes from a controlled queue)."""
        now = time.monotonic()
        cached = self._controls
        if cached is None or now >= cached[0]:
            names = frozenset(r["name"] for r in self.db.fetchall("queues_controlled"))
            cached = self._controls = (now + self.db.options.routing_cache_ttl, names)
        return cached[1]

    def consumers(self) -> list[dict]:
        """Live consumer processes (workers) and what they consume."""
        return self.db.fetchall("consumers_list")

    def queue_exists(self, queue: str) -> bool:
        return self.db.fetchone("queue_exists", queue=queue)["found"]

    def queue_size(self, queue: str) -> int:
        return self.db.fetchone("queue_size", queue=queue)["n"]

    def purge(self, queue: str) -> int:
        return self.db.fetchone("queue_purge", queue=queue)["n"]

    def delete_queue(self, queue: str) -> int:
        with self.db.transaction() as conn:
            n = self.db.fetchone("queue_purge", conn, queue=queue)["n"]
            self.db.fetchall("queue_delete", conn, queue=queue)
        return n

    # -- inspection --------------------------------------------------------------------------------

    def jobs(self, task_ids: Sequence[str]) -> list[Job]:
        """The job rows of these Celery task ids."""
        return [Job.from_row(r) for r in self.db.fetchall("jobs_by_task_id", task_ids=list(task_ids))]

    def scheduled_listing(self, consumer: str, queues: Sequence[str], limit: int = 1000) -> list[dict]:
        """Kombu message dicts of the scheduled jobs of ``queues`` that process ``consumer``
        lists in ``celery inspect scheduled`` (see the query)."""
        rows = self.db.fetchall("jobs_scheduled_listing", consumer=consumer, queues=list(queues), limit=limit)
        return [from_row(r) for r in rows]


class Settler:
    """Writes delivery outcomes in batches from a background thread (group commit).

    A batch is what was submitted while the previous one was being written, plus
    what arrives within ``ack_linger`` seconds: one transaction per batch. While
    the database is unreachable the batch is kept and retried; an outcome the
    database refuses is logged and dropped without holding back the others.
    Outcomes never written (the process died) leave their jobs ``executing`` for
    the rescuer, which redelivers them.
    """

    def __init__(self, engine: JobEngine):
        self.engine = engine
        self._queue: _queue.SimpleQueue[Outcome | None] = _queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="pgbroker-settler", daemon=True)
        self._thread.start()

    def submit(self, outcome: Outcome) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(outcome)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is pending, then stop the thread."""
        self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout)

    def _write(self, batch: list[Outcome]) -> None:
        """Write a batch; wait out a database outage; never let one bad outcome block the rest."""
        backoff = 0.05
        while True:
            try:
                self.engine.settle(batch)
                return
            except DatabaseUnavailable as exc:  # keep the batch until the database is back
                logger.warning("pgbroker: writing %d outcomes failed (%s); retrying", len(batch), exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception as exc:
                if len(batch) == 1:
                    logger.error("pgbroker: dropping outcome %r that the database refuses: %s", batch[0], exc)
                    return
                for outcome in batch:  # isolate the culprit
                    self._write([outcome])
                return

    def _run(self) -> None:
        limit = self.engine.db.options.ack_batch_size
        linger = self.engine.db.options.ack_linger
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + linger
            while len(batch) < limit:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except _queue.Empty:
                    break
                if item is None:  # close(): finish this batch first
                    self._queue.put(None)
                    break
                batch.append(item)
            self._write(batch)
            with self._idle:
                self._pending -= len(batch)
                if not self._pending:
                    self._idle.notify_all()


def leader_params(service: str, lease: float | None = None, wait: bool = False) -> dict:
    """The parameters of the ``leader`` SQL fragment for one run of ``service``."""
    return {"service": service, "lease": lease, "wait": wait, "who": f"{socket.gethostname()}/{os.getpid()}"}


def job_filter(states: Sequence[str] | None = None, queue: str | None = None, task: str | None = None,
               meta: dict | None = None, task_ids: Sequence[str] | None = None) -> dict:
    """The parameters of the ``job_filter`` SQL fragment; None matches everything.
    An unknown state name raises :class:`~pgbroker.errors.InvalidState`."""
    if states is not None:
        states = [states] if isinstance(states, str) else list(states)
        bad = [s for s in states if s not in JobState._value2member_map_]
        if bad:
            raise InvalidState(f"unknown job state(s) {bad}; states are {[s.value for s in JobState]}")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict to match job metadata against, got {meta!r}")
    return {"states": states, "queue": queue, "task": task, "meta": json.dumps(meta) if meta is not None else None,
            "task_ids": list(task_ids) if task_ids is not None else None}


def _enqueued(rows: Sequence[Row], duplicates: Sequence[bool]) -> None:
    """Emit ``job.enqueued`` for stored rows (nothing to build when nobody listens)."""
    if telemetry.enabled("job.enqueued"):
        for row, duplicate in zip(rows, duplicates):
            telemetry.emit("job.enqueued", {"size": len(row.body)}, {
                "queue": row.queue, "task": row.task, "task_id": row.task_id, "unique_duplicate": duplicate})


def _not_unique(row: Row) -> Row:
    """``row`` stored the plain way: a retry keeps its job's key (the row is updated),
    and a copy or a retry whose job is gone takes none."""
    if row.unique_key is None:
        return row
    headers = json.loads(row.headers)
    headers.pop("pgbroker_unique", None)
    return replace(row, unique_key=None, headers=json.dumps(headers))


def _single(row: Row) -> dict:
    """The parameters of ``enqueue`` for one row."""
    return {k: v for k, v in vars(row).items() if k != "unique_key"}


def _arrays(rows: Sequence[Row]) -> dict:
    """The parallel-array parameters of ``enqueue_many``/``enqueue_unique``."""
    columns = {f.name: [getattr(r, f.name) for r in rows] for f in fields(Row)}
    return {
        "task_ids": columns["task_id"], "queues": columns["queue"], "tasks": columns["task"],
        "priorities": columns["priority"], "scheduled": columns["scheduled_at"],
        "expires": columns["expires_at"], "retries": columns["retry"], "headers": columns["headers"],
        "properties": columns["properties"], "bodies": columns["body"],
        "content_types": columns["content_type"], "content_encodings": columns["content_encoding"],
    }


def _seconds(arguments: dict, name: str) -> float | None:
    """An AMQP queue argument in milliseconds, as seconds (None when absent)."""
    value = arguments.get(name)
    return None if value is None else float(value) / 1000.0


def engine_for(db: Database) -> JobEngine:
    """The process-wide JobEngine of a Database (one Settler per process and database)."""
    engine = getattr(db, "_engine", None)
    if engine is None:
        engine = db._engine = JobEngine(db)
    return engine
