"""Celery result backend in Postgres: ``result_backend = "pgbroker://user@host/db"``.

Results live in ``<schema>.results`` beside the jobs (Celery's key/value layout:
``celery-task-meta-<id>``, ``celery-taskset-meta-<id>``); chords complete through an
atomic counter in ``<schema>.counters`` (no ``chord_unlock`` polling task). Storing
a result sends a NOTIFY in the same statement, carrying the stored value when it
fits, so ``AsyncResult.get()``, ``GroupResult.get()`` and ``join()`` wake as soon
as the result commits, usually without a query; they read what the notification
did not carry (all ready members of a group in one query per wake-up) and re-read
every ``result_polling_interval`` seconds (default 1) in case a notification was
missed. Expired rows are pruned by workers (:meth:`ResultBackend.cleanup`).

Options come from ``result_backend_transport_options`` (else
``broker_transport_options``): the same ``schema``, pool and ``auto_migrate``
options as the transport. Celery finds this class through the
``celery.result_backends`` entry point.
"""
from __future__ import annotations

import base64
import logging
import threading
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Iterable, Iterator, Sequence

from celery import states
from celery.app.task import Context
from celery.backends.base import KeyValueStoreBackend
from celery.exceptions import TimeoutError
from celery.result import AsyncResult, ResultSet, task_join_will_block
from kombu.message import Message as KombuMessage
from kombu.serialization import prepare_accept_content
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads as json_loads

from . import enqueue as _enqueue
from . import telemetry
from .config import Options, broker_url, conninfo_from_url, mask_url
from .db import Database
from .engine import leader_params
from .errors import DatabaseUnavailable, ResultTooLarge
from .message import channel_name

logger = logging.getLogger(__name__)

RESULTS_QUEUE = ":results"  # the notify channel results are announced on (payload: key[\nbase64 value])


class ResultWaiter:
    """One LISTEN connection per process and database, shared by every waiting thread.

    A thread registers the keys it waits for and blocks on an Event; the
    dispatcher thread sets the Events of the keys it is notified about and keeps
    what the notification carried (the stored value, when it fits) for :meth:`take`.

    Keys can also be *expected* before their task is even published
    (:meth:`ResultBackend.on_task_call`): their notifications are kept too, so a
    later ``get()`` knows the result is not stored yet without reading it. The
    expected keys are bounded (oldest dropped first) and forgotten whenever the
    LISTEN connection breaks; a key not known that way is read.

    Postgres wakes every listening connection of a database for each NOTIFY, so a
    process that has had nobody waiting for ``result_listener_idle`` seconds closes
    its LISTEN connection (forgetting the expected keys); the next :meth:`watch`
    opens it again before its caller's first read.
    """

    MAX_EXPECTED = 1000

    def __init__(self, db: Database):
        self.db = db
        self.channel = channel_name(db.options.schema, RESULTS_QUEUE)
        self._idle_after = db.options.result_listener_idle
        self._watchers: dict[str, set[threading.Event]] = {}
        self._expected: OrderedDict[str, None] = OrderedDict()
        self._notified: dict[str, bytes | None] = {}  # for watched and expected keys only
        self._lock = threading.Lock()
        self._connecting = threading.Lock()  # opening and closing the LISTEN connection
        self._closed = threading.Event()
        self._listener = db.listener()
        self._listener.listen([self.channel])
        self._listening = False  # expected keys are kept only while the LISTEN connection is up
        #: Cleared while the connection is closed for idleness (the dispatcher waits on it).
        self._wanted = threading.Event()
        self._wanted.set()
        self._last_busy = time.monotonic()
        self._connect()
        threading.Thread(target=self._run, name="pgbroker-results", daemon=True).start()

    def _connect(self) -> None:
        """(Re)connect the LISTEN connection: notifications from here on are seen. Any
        thread; a second caller waits for the first one's connection and uses it."""
        with self._connecting:
            try:
                self._listener.fds()
            except DatabaseUnavailable:
                return  # waiters read instead; the dispatcher thread tries again
            with self._lock:
                self._listening = True

    def _release_if_idle(self) -> None:
        """Close the LISTEN connection when nobody has waited for ``result_listener_idle`` s."""
        if self._watchers or time.monotonic() - self._last_busy < self._idle_after:
            return  # the common case, without the locks (checked again under them)
        with self._connecting:
            with self._lock:
                if self._watchers or not self._listening or time.monotonic() - self._last_busy < self._idle_after:
                    return
                self._listening = False
                self._wanted.clear()
                self._expected.clear()  # their notifications will not be seen
                self._notified.clear()
            self._listener.close_connection()

    def expect(self, key: str) -> None:
        """Start keeping ``key``'s notifications: call before its task is published."""
        with self._lock:
            if not self._listening:
                return
            self._expected[key] = None
            while len(self._expected) > self.MAX_EXPECTED:
                old, _ = self._expected.popitem(last=False)
                if old not in self._watchers:
                    self._notified.pop(old, None)

    def watch(self, keys: Iterable[str]) -> tuple[threading.Event, set[str]]:
        """Register a waiter for ``keys``: its Event, and the keys that were expected
        (every notification of theirs since before they were published was kept).
        Opens the LISTEN connection again if it was closed for idleness."""
        event = threading.Event()
        with self._lock:
            known = set()
            for key in keys:
                self._watchers.setdefault(key, set()).add(event)
                if self._expected.pop(key, 0) is None:
                    known.add(key)
            self._last_busy = time.monotonic()
            released = not self._wanted.is_set()
        if released:  # listening again before the caller's first read: nothing is missed
            self._connect()  # (a second watcher meanwhile waits for this connection)
            self._wanted.set()  # the dispatcher reads again (and reconnects if this failed)
        return event, known

    def unwatch(self, keys: Iterable[str], event: threading.Event) -> None:
        with self._lock:
            for key in keys:
                events = self._watchers.get(key)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._watchers[key]
                        self._notified.pop(key, None)
            self._last_busy = time.monotonic()

    def take(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        """The keys notified so far (the latest notification of each): their stored
        value when the notification carried it, else None (then it must be read).
        Kept for every thread waiting on the key until the last one stops watching."""
        with self._lock:
            return {k: self._notified[k] for k in keys if k in self._notified}

    def close(self) -> None:
        """Stop listening (the process is done with this database)."""
        self._closed.set()
        self._wanted.set()
        self._listener.wake()

    def _run(self) -> None:
        while not self._closed.is_set():
            if not self._wanted.is_set():
                self._wanted.wait()
                continue
            try:
                if not self._listening:
                    self._connect()
                notes = self._listener.wait(min(5.0, self._idle_after))
            except Exception as exc:  # waiters fall back to polling meanwhile
                if self._closed.is_set():
                    break
                logger.warning("pgbroker: result notifications interrupted (%r); reconnecting", exc)
                with self._lock:
                    self._listening = False
                    self._expected.clear()  # notifications may have been missed
                self._closed.wait(1.0)
                continue
            with self._lock:
                for note in notes:
                    key, _, data = note.payload.partition("\n")
                    events = self._watchers.get(key)
                    if events or key in self._expected:
                        self._notified[key] = _decoded(data)
                    for event in events or ():
                        event.set()
            self._release_if_idle()
        self._listener.close()


def _decoded(data: str) -> bytes | None:
    """The value a notification carried, or None: then it is read."""
    try:
        return base64.b64decode(data) if data else None
    except ValueError:
        return None


_per_db_lock = threading.Lock()  # guards the waiter and pruner cached on a Database


def _waiter_for(db: Database) -> ResultWaiter:
    """The process's ResultWaiter for ``db``, cached on it (as engine_for caches the engine)."""
    with _per_db_lock:
        waiter = getattr(db, "_result_waiter", None)
        if waiter is None:
            waiter = db._result_waiter = ResultWaiter(db)
        return waiter


def _columns(meta: dict | None = None, request: Any = None) -> dict[str, Any]:
    """The queryable columns of a result row (all None for group metadata)."""
    meta = meta or {}
    delivery = getattr(request, "delivery_info", None) or {}
    retries = getattr(request, "retries", None)
    date_done = meta.get("date_done")
    return {
        "task_id": meta.get("task_id"), "group_id": meta.get("group_id"), "parent_id": meta.get("parent_id"),
        "task_name": getattr(request, "task", None), "worker": getattr(request, "hostname", None),
        "queue": delivery.get("routing_key"), "retries": int(retries) if retries is not None else None,
        "date_done": datetime.fromisoformat(date_done) if isinstance(date_done, str) else date_done,
    }


def mark_revoked(db: Database, cancelled: Sequence[dict]) -> None:
    """Store REVOKED for cancelled tasks (rows of :meth:`JobEngine.cancel`) when pgbroker
    on ``db`` is this process's result backend, so that whoever waits for them gets an
    answer, and count a cancelled chord part as returned (as a worker does when it skips
    a revoked task), so that its chord fails instead of waiting forever. Written on the
    pool, as the cancellation was, even inside ``pgbroker.atomic()``."""
    backend = backend_for(db) if cancelled else None
    if backend is None:
        in_groups = [row for row in cancelled if row.get("message")]
        if not in_groups:
            return
        backend = _backend_of_chords(db, in_groups)
        if backend is None:
            logger.warning("pgbroker: %d cancelled task(s) in groups (%s, …) and no pgbroker result backend in this "
                           "process to count them: a chord they belong to is not told", len(in_groups),
                           in_groups[0]["task_id"])
            return
    with _enqueue.unbound():
        for row in cancelled:
            try:
                request = _chord_part_request(backend, row["task_id"], row.get("message"))
                backend.mark_as_revoked(row["task_id"], "revoked", request=request)
            except Exception:  # the job stays cancelled; the others are still marked
                logger.exception("pgbroker: cancelled task %s could not be marked REVOKED", row["task_id"])


def _backend_of_chords(db: Database, in_groups: Sequence[dict]) -> "ResultBackend | None":
    """A pgbroker result backend on ``db`` for a process that has none (``pgbroker jobs
    cancel``), when a chord of these cancelled group members is counted in ``db``'s
    schema: that chord's app keeps its results here, so its parts can be told."""
    groups = {json_loads(row["message"])["headers"]["group"] for row in in_groups}
    keys = [bytes_to_str(ResultBackend.chord_keyprefix) + group for group in groups]
    if not db.fetchone("chords_counted_here", keys=keys)["found"]:
        return None
    return bare_app(db, results=True).backend


def bare_app(db: Database, results: bool = False):
    """A Celery app of no tasks on ``db``'s database and schema: its broker (to broadcast
    remote control), and with ``results`` its result backend, pgbroker's there."""
    from celery import Celery

    url = broker_url(db.conninfo)
    app = Celery("pgbroker", broker=url, backend=url if results else None, set_as_current=False)
    app.conf.broker_transport_options = {"schema": db.options.schema}
    return app


def _chord_part_request(backend: "ResultBackend", task_id: str, message: str | None) -> Context | None:
    """Celery's request context of a chord part from its stored kombu message (protocol
    2: headers, and the body's embedded chord), else None."""
    if not message:
        return None
    try:
        message = json_loads(message)
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, embed = KombuMessage(  # kombu's decompression and decoding, as a worker's
            body, content_type=message["content-type"], content_encoding=message["content-encoding"],
            headers=message["headers"], accept=prepare_accept_content(backend.app.conf.accept_content)).decode()
    except Exception as exc:
        logger.warning("pgbroker: cancelled task %s: its message could not be read (%r); "
                       "a chord it belongs to is not told", task_id, exc)
        return None
    if not (embed or {}).get("chord"):
        return None
    return Context(message["headers"], args=args, kwargs=kwargs, **embed, id=task_id)


def backend_for(db: Database) -> "ResultBackend | None":
    """The pgbroker result backend on ``db``'s database and schema in this process: the one
    last used, else the current Celery app's when it is pgbroker there (``celery control``)."""
    for same in db.same_schema():
        if same.result_backend is not None:
            return same.result_backend
    try:
        from celery import current_app

        backend = current_app.backend
    except Exception:
        return None
    if isinstance(backend, ResultBackend) and (backend.conninfo, backend.options.schema) == (db.conninfo, db.options.schema):
        return backend
    return None


class ResultBackend(KeyValueStoreBackend):
    """Celery's key/value backend contract on a Postgres table, with NOTIFY wake-ups."""

    implements_incr = True
    supports_native_join = True
    supports_autoexpire = True

    def __init__(self, app=None, url: str | None = None, **kwargs: Any):
        super().__init__(app=app, url=url, **kwargs)
        conf = self.app.conf
        topts = conf.get("result_backend_transport_options") or conf.broker_transport_options
        self.options = Options.from_mapping(topts)
        self.url = url or conf.result_backend
        self.conninfo = conninfo_from_url(self.url)
        self.polling_interval = float(conf.get("result_polling_interval") or 1.0)
        # .part: the chord part on_chord_part_return counts; .metas: what its join read
        self._returning = threading.local()
        # A result must never be dropped because the database blinked: writes are retried
        # (with Celery's backoff, up to result_backend_max_retries) while it is unreachable.
        self.always_retry = True

    @property
    def db(self) -> Database:
        """This process's Database (looked up each time: a forked pool child must not use
        its parent's connections or LISTEN thread, and the registry is per process)."""
        db = Database.get(self.conninfo, self.options)
        db.ensure_ready()
        if db.result_backend is not self:
            db.result_backend = self
        return db

    def as_uri(self, include_password: bool = False) -> str:
        return self.url if include_password else mask_url(self.url)

    # -- the key/value contract --------------------------------------------------------------------

    def get(self, key):
        rows = self.mget([key])
        return rows[0]

    def mget(self, keys, timeout: float | None = None):
        """The stored values of ``keys`` (None where nothing is stored); ``timeout``: the
        longest wait for a pooled connection (default ``pool_timeout``)."""
        keys = [bytes_to_str(k) for k in keys]
        try:
            with self.db.connection(timeout) as conn:
                found = {r["key"]: bytes(r["value"]) for r in self.db.fetchall("result_get_many", conn, keys=keys)}
        except DatabaseUnavailable as exc:
            exc.during_read = True  # not retried by Celery's loop (see exception_safe_to_retry)
            raise
        return [found.get(k) for k in keys]

    def _write(self, key, value, state, columns: dict | None = None, keep_success: bool = False) -> None:
        if isinstance(value, str):
            value = value.encode("utf-8")
        key = bytes_to_str(key)
        if len(value) > self.options.max_result_size:
            raise ResultTooLarge(len(value), self.options.max_result_size, key)
        self.db.fetchall("result_set", key=key, state=state, value=value, keep_success=keep_success,
                         expires=self.expires if self.expires else None, **(columns or _columns()))

    def _set_with_state(self, key, value, state):
        """Celery saves a group's metadata with state SUCCESS; the ``state`` column is a
        task's state only (NULL for group metadata), so that counting by state counts tasks."""
        is_task = bytes_to_str(key).startswith(bytes_to_str(self.task_keyprefix))
        self._write(key, value, state if is_task else None)

    def set(self, key, value):
        self._write(key, value, None)

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        """Store a task's state in one statement.

        Celery's key/value backends read the stored state first and skip the write
        when it is SUCCESS (a late duplicate must not overwrite it); here that rule
        is the statement's ``ON CONFLICT … WHERE``, so it costs no extra round trip.
        """
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        self._write(self.get_key_for_task(task_id), self.encode(meta), state, _columns(meta, request),
                    keep_success=True)
        return result

    def delete(self, key):
        self.db.fetchall("result_delete", key=bytes_to_str(key))

    def incr(self, key):
        """Celery's atomic counter. For the chord part being returned (Celery counts it
        with ``incr``), a part counted already, delivered again after a lost worker, is
        not counted again: it neither completes the chord early nor runs its callback
        twice (as Celery's Redis backend counts a part once). It returns the count as it
        stands, so that a chord counted complete whose callback was never sent (the
        process that counted the last part was lost first) is completed by this delivery."""
        part = getattr(self._returning, "part", None)
        if part is None:
            return self.db.fetchone("counter_incr", key=bytes_to_str(key))["value"]
        row = self.db.fetchone("chord_part_count", key=bytes_to_str(key), part=part, expires=self.expires or None)
        if row is not None:
            return row["value"]
        logger.warning("pgbroker: chord part %s returned again (a duplicate delivery); counted once", part)
        # The counter goes once the callback is sent (Celery deletes it then). Still there
        # and complete, it means whoever counted the last part was lost before sending the
        # callback: its value lets this delivery complete the chord, or nobody ever would.
        counter = self.db.fetchone("chord_counter_get", key=bytes_to_str(key))
        return counter["value"] if counter else 0

    def expire(self, key, value):
        """Celery passes 0 for "never" (``result_expires=None`` or 0)."""
        self.db.fetchall("result_expire", key=bytes_to_str(key), seconds=value or None)

    def set_chord_size(self, group_id, chord_size):
        """Celery's canvas tells the real number of parts of a chord header (a chain
        ending in a group counts each of its tasks); the request's ``chord_size`` may
        count that group as one."""
        self.db.fetchall("chord_size_set", key=bytes_to_str(self.get_key_for_chord(group_id)), size=chord_size,
                         expires=self.expires or None)

    def on_chord_part_return(self, request, state, result, **kwargs):
        """Celery's counter-based chord completion, with the size from :meth:`set_chord_size`,
        counting each part once (see :meth:`incr`)."""
        chord = getattr(request, "chord", None)
        if getattr(request, "group", None) and isinstance(chord, dict):
            row = self.db.fetchone("chord_size_get", key=bytes_to_str(self.get_key_for_chord(request.group)))
            if row and row["size"]:
                chord["chord_size"] = row["size"]
        # A part is its task id and place in the header (a reused frozen signature puts
        # one task id in several places of a header: each counts).
        index = getattr(request, "group_index", None)
        part = getattr(request, "id", None)
        self._returning.part = part if part is None or index is None else f"{part}:{index}"
        # What the header's join read, for Celery's search of the failed part ("Dependency
        # <id> raised …", as on Redis): it only looks at results in the backend's cache,
        # which is off by default (result_cache_max=-1).
        self._returning.metas = {}
        try:
            return super().on_chord_part_return(request, state, result, **kwargs)
        finally:
            self._returning.part = self._returning.metas = None

    def is_cached(self, task_id):
        return task_id in (getattr(self._returning, "metas", None) or ()) or super().is_cached(task_id)

    def get_task_meta(self, task_id, cache=True):
        joined = getattr(self._returning, "metas", None)
        if cache and joined and task_id in joined:
            return joined[task_id]
        return super().get_task_meta(task_id, cache)

    def exception_safe_to_retry(self, exc):
        """Result writes are retried while the database is unreachable (a result is never
        dropped). Reads are not: ``AsyncResult.state``/``ready()`` raise
        :class:`DatabaseUnavailable` (after ``pool_timeout``), as other backends raise
        their connection errors, instead of retrying for ever; ``get()`` waits through
        an outage, bounded by its own timeout."""
        return isinstance(exc, DatabaseUnavailable) and not getattr(exc, "during_read", False)

    # -- expiry ------------------------------------------------------------------------------------

    def cleanup(self, lease: float | None = None) -> int:
        """Delete expired results and chord counters, in batches; returns how many results.

        Celery's ``celery.backend_cleanup`` task calls this; workers also run it every
        ``prune_interval`` seconds (:meth:`start_pruner`). Only one process at a time
        deletes: the others find the prune lock taken (or, with ``lease`` seconds, the
        run of this interval taken) and return 0.
        """
        total, counters, batch, started = 0, 0, self.options.prune_batch_size, time.monotonic()
        while True:
            row = self.db.fetchone("results_prune", batch=batch, **leader_params("prune-results", lease))
            lease = None  # the run's first batch took the lease; the next ones only need the lock
            total, counters = total + row["results"], counters + row["counters"]
            if not row["leader"] or (row["results"] < batch and row["counters"] < batch):
                break
        if row["leader"]:
            telemetry.emit("results.pruned", {"results": total, "counters": counters,
                                              "duration": time.monotonic() - started}, {"schema": self.db.options.schema})
        return total

    def start_pruner(self) -> None:
        """Run :meth:`cleanup` every ``prune_interval`` seconds in a daemon thread (once per
        process and database, until :func:`pgbroker.maintenance.shutdown`); the worker's
        main process starts it."""
        db = self.db
        with _per_db_lock:
            if getattr(db, "_result_pruner", None) is not None:
                return
            stop = db._result_pruner = threading.Event()
        threading.Thread(target=self._prune_until, args=(stop,), name="pgbroker-pruner", daemon=True).start()

    def _prune_until(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                removed = self.cleanup(lease=self.options.prune_interval)
                if removed:
                    logger.info("pgbroker: pruned %d expired results", removed)
            except Exception as exc:  # the next tick retries
                logger.warning("pgbroker: pruning expired results failed (%s)", exc)
            stop.wait(self.options.prune_interval)

    # -- waiting: NOTIFY instead of sleeping ---------------------------------------------------------

    def on_task_call(self, producer, task_id):
        """Before a task is published: if this process already waits for results (its
        LISTEN connection is open), keep the task's notifications, so that ``get()``
        needs no query until the result is stored. Never in a worker's task."""
        waiter = getattr(Database.get(self.conninfo, self.options), "_result_waiter", None)
        if waiter is not None and not task_join_will_block():
            waiter.expect(bytes_to_str(self.get_key_for_task(task_id)))
        return {}

    def iter_native(self, result, timeout=None, interval=0.5, no_ack=True, on_message=None, on_interval=None):
        """``GroupResult.join_native()``: the ready members, one query per wake-up.

        Also raises the error of a failed task the group was chained after
        (``a | fails | group(...)``: its members never run), as ``AsyncResult.get()``
        does for its own parents, and wakes when that task's result is stored.
        """
        self._ensure_not_eager()
        task_ids = set()
        for member in result.results:
            if isinstance(member, ResultSet):
                yield member.id, member.results
            else:
                task_ids.add(member.id)
        parent, check = getattr(result, "parent", None), on_interval
        if parent is not None:
            def check_parent():
                if isinstance(parent, AsyncResult):  # a GroupResult parent has no parents of its own
                    parent._maybe_reraise_parent_error()
                parent.maybe_throw()
                if on_interval:
                    on_interval()
            check = check_parent
        yield from self._wait(task_ids, timeout, check, wake_on=[parent.id] if parent else (), on_message=on_message)

    def wait_for_pending(self, result, timeout=None, interval=0.5, no_ack=True, on_message=None,
                         on_interval=None, callback=None, propagate=True):
        """``AsyncResult.get()``; ``on_message`` is called with each state the task stores
        while it is waited for (``STARTED``, ``update_state`` progress, the outcome), as
        with Celery's Redis backend."""
        self._ensure_not_eager()
        meta = self.wait_for(result.id, timeout=timeout, on_interval=on_interval, on_message=on_message)
        result._maybe_set_cache(meta)
        return result.maybe_throw(propagate=propagate, callback=callback)

    def wait_for(self, task_id, timeout=None, interval=0.5, no_ack=True, on_interval=None, on_message=None):
        """Return the task's meta once it is ready; raise Celery's TimeoutError after ``timeout``."""
        for _, meta in self._wait([task_id], timeout, on_interval, first_only=True, on_message=on_message):
            return meta
        raise TimeoutError("The operation timed out.")  # pragma: no cover - _wait raises first

    def get_many(self, task_ids, timeout=None, interval=0.5, no_ack=True, on_message=None,
                 on_interval=None, max_iterations=None, READY_STATES=states.READY_STATES):
        """Yield ``(task_id, meta)`` as results become ready: one query per wake-up."""
        yield from self._wait(task_ids, timeout, on_interval, max_iterations=max_iterations, on_message=on_message)

    def _when_reachable(self, call, deadline: float | None, timeout: float | None):
        """``call()``, tried again every ``result_polling_interval`` while the database is
        unreachable (a waiting ``get()`` rides out an outage, as a result write does);
        Celery's TimeoutError once ``deadline`` has passed. A database this process never
        reached (a wrong URL or password) is an error at once, not an outage."""
        while True:
            try:
                return call()
            except DatabaseUnavailable as exc:
                if not Database.get(self.conninfo, self.options).ready:
                    raise
                wait = self.polling_interval
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimeoutError(f"The operation timed out ({timeout}): {exc}") from exc
                logger.warning("pgbroker: reading results failed (%s); trying again in %.1f s", exc, wait)
                time.sleep(wait)

    def _wait(self, task_ids, timeout, on_interval, first_only=False, max_iterations=None,
              wake_on: Iterable[str] = (), on_message=None) -> Iterator[tuple[str, dict]]:
        """Yield (task id, meta) as the tasks' results become ready; also wake (and run
        ``on_interval``) when a result of ``wake_on`` is stored. ``on_message(meta)``
        sees every state stored meanwhile, once each, the outcome included."""
        pending = {bytes_to_str(t) for t in task_ids}
        for task_id in list(pending):  # Celery's cache of results already fetched
            cached = self._cache.get(task_id)
            if cached and cached["status"] in states.READY_STATES:
                pending.discard(task_id)
                if on_message is not None:
                    on_message(cached)
                yield task_id, cached
        if not pending:
            return
        keys = {bytes_to_str(self.get_key_for_task(t)): t for t in pending}
        watched = [*keys, *(bytes_to_str(self.get_key_for_task(t)) for t in wake_on)]
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = self._when_reachable(lambda: _waiter_for(self.db), deadline, timeout)
        event, known = waiter.watch(watched)
        iterations, woken, first = 0, False, True
        seen: dict[str, bytes] = {}  # the last value passed to on_message, per key
        try:
            while pending:
                event.clear()
                want = [k for k, t in keys.items() if t in pending]
                values = waiter.take(want)
                # Read what the notifications did not carry; at first also every key not
                # known to be unstored yet, and everything after a polling timeout (a
                # notification may have been missed).
                if woken or first:
                    read = [k for k in want if (k in values and values[k] is None)
                            or (first and k not in values and k not in known)]
                else:
                    read = want
                first = False
                if read:
                    def reading(read=read):  # waits for a connection no longer than the get() has left
                        return self.mget(read, None if deadline is None else max(0.05, deadline - time.monotonic()))

                    values.update(zip(read, self._when_reachable(reading, deadline, timeout)))
                # As Celery's Redis backend does after every wake-up: AsyncResult.get()
                # passes a check that raises a failed parent's own error (a chord whose
                # header failed raises that task's exception, not the body's ChordError).
                if on_interval:
                    on_interval()
                for key in want:
                    value = values.get(key)
                    if value is None:
                        continue
                    meta = self.decode_result(value)
                    if on_message is not None and seen.get(key) != value:
                        seen[key] = value
                        on_message(meta)
                    if meta["status"] in states.READY_STATES:
                        task_id = keys[key]
                        pending.discard(task_id)
                        self._cache[task_id] = meta
                        joined = getattr(self._returning, "metas", None)
                        if joined is not None:  # a chord header's join (on_chord_part_return)
                            joined[task_id] = meta
                        yield task_id, meta
                        if first_only:
                            return
                if not pending:
                    return
                iterations += 1
                if max_iterations and iterations >= max_iterations:
                    return
                wait = self.polling_interval
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimeoutError(f"The operation timed out ({timeout}).")
                woken = event.wait(wait)
        finally:
            waiter.unwatch(watched, event)
