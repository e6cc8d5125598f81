"""Celery worker integration: the job row tells what really happened to the task.

The transport sees deliveries and acks; only the worker knows whether a task
succeeded, failed, was retried or revoked, and an early ack
(``task_acks_late=False``) arrives before the task even starts. This module
records the outcome on the job row through the :class:`~pgbroker.engine.Settler`,
fenced by the delivery's (job id, attempt), which travels in the ``pgbroker_job``
message header: success from the worker's main process (:class:`WorkerHooks`),
failures, retries and revokes from Celery's signals wherever they fire (pool
children included).

It is installed automatically for ``celery worker`` whose broker is a
``pgbroker://`` URL (pgbroker registers a ``celery pgbroker`` command, and the
``celery`` program imports it at start-up). A worker started from Python
(``app.Worker(...)``, Celery's test worker) calls :func:`install` first.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from datetime import datetime, timezone
from typing import Any

from celery import bootsteps, signals
from celery.app.defaults import DEFAULTS
from celery.concurrency.thread import TaskPool as ThreadsPool
from celery.worker import control as _control
from celery.exceptions import Retry, TaskRevokedError
from celery.worker.request import Request
from celery.worker.consumer.gossip import Gossip
from celery.worker.consumer.mingle import Mingle
from kombu import Connection
from kombu.serialization import prepare_accept_content
from kombu.transport import resolve_transport

from . import pool, telemetry
from .config import mask_url
from .db import database_for
from .errors import InvalidSnooze
from .engine import JobEngine, Outcome, describe, engine_for, error_entry
from .maintenance import maintainer_for
from .transport import Channel, Transport

logger = logging.getLogger(__name__)

#: ``worker_lost_wait`` (seconds) of pgbroker's workers when the app keeps Celery's default.
LOST_WAIT = 1.0
#: ``worker_timer_precision`` (seconds) of pgbroker's workers when the app keeps Celery's default.
TIMER_PRECISION = 0.1

_apps: dict[int, Any] = {}
_engines: dict[tuple[int, int], JobEngine] = {}
_lock = threading.Lock()


def uses_pgbroker(app) -> bool:
    """True when ``app``'s broker is the pgbroker transport."""
    try:
        conn = Connection(app.conf.broker_url, transport=app.conf.broker_transport)
        cls = resolve_transport(conn.transport_cls)
        return isinstance(cls, type) and issubclass(cls, Transport)
    except Exception:
        return False


def install(app) -> None:
    """Report task outcomes of ``app``'s tasks to their job rows, and let mingle and
    gossip run over pgbroker. Idempotent."""
    with _lock:
        if id(app) in _apps:
            return
        _apps[id(app)] = app
        Channel.task_outcomes_from_worker = True
        app.steps["consumer"].add(WorkerHooks)
        # Celery runs mingle (start-up sync of revokes and clocks) and gossip (worker
        # events between workers) only over transports it lists as able to broadcast.
        for step in (Mingle, Gossip):
            step.compatible_transports = frozenset(step.compatible_transports) | {Transport.driver_type}


def _engine(app) -> JobEngine:
    key = (id(app), os.getpid())
    engine = _engines.get(key)
    if engine is None:
        engine = _engines[key] = engine_for(database_for(app))
    return engine


def _job_of(request) -> tuple[int, int] | None:
    """(job id, attempt) of a Celery request context, Request or request dict."""
    job = request.get("pgbroker_job") if isinstance(request, dict) else getattr(request, "pgbroker_job", None)
    if job is None:
        for attr in ("request_dict", "_request_dict"):
            job = (getattr(request, attr, None) or {}).get("pgbroker_job")
            if job is not None:
                break
    if not job:
        return None
    return int(job[0]), int(job[1])


_started: dict[str, float] = {}  # task id -> monotonic start, for the durations of failures
_failed_outside_body: set[str] = set()  # task ids whose failure _on_internal_error recorded


def _job_event(name: str, task, request, measurements: dict, **extra) -> None:
    """Emit a job telemetry event of a task run (``task_id``/``task`` from the request)."""
    if not telemetry.enabled(name):
        return
    job = _job_of(request) or (None, None)
    getter = request.get if isinstance(request, dict) else (lambda k: getattr(request, k, None))
    telemetry.emit(name, measurements, telemetry.job_metadata(
        job[0], getter("id"), getattr(task, "name", None) or getter("task"), getter("pgbroker_queue"), job[1],
        worker=getter("hostname"), **extra))


def _duration(task_id) -> float | None:
    started = _started.pop(task_id, None)
    return None if started is None else time.monotonic() - started


@signals.task_prerun.connect
def _on_prerun(sender=None, task_id=None, task=None, **kwargs):
    if task_id is not None and (telemetry.enabled("job.failed") or telemetry.enabled("job.started")):
        _started[task_id] = time.monotonic()
        _job_event("job.started", task, task.request, {})


@signals.task_postrun.connect
def _on_postrun(sender=None, task_id=None, **kwargs):
    _started.pop(task_id, None)


def _record(task, request, op: str, error: str | None = None, tb: str | None = None) -> None:
    app = getattr(task, "app", None)
    if app is None or id(app) not in _apps:
        return
    job = _job_of(request)
    if job is None:
        return
    entry = error_entry(job[1], error, tb) if error else None
    _engine(app).settler.submit(Outcome(job[0], job[1], op, entry))


@signals.task_failure.connect
def _on_failure(sender=None, exception=None, einfo=None, **kwargs):
    if sender.request.id is None and kwargs.get("task_id") in _failed_outside_body:
        _failed_outside_body.discard(kwargs["task_id"])  # _on_internal_error recorded it
        return
    text, tb = describe(exception, with_traceback=False)
    _record(sender, sender.request, "discarded", text, getattr(einfo, "traceback", None))
    _job_event("job.failed", sender, sender.request, {"duration": _duration(sender.request.id)}, error=text)


@signals.task_internal_error.connect
def _on_internal_error(sender=None, request=None, exception=None, einfo=None, **kwargs):
    """An error outside the task's body (its result could not be stored: too large, …).
    Celery stores the FAILURE, but its ``task_failure`` then no longer carries the
    request, so the job's outcome is recorded from this signal's."""
    text, _ = describe(exception, with_traceback=False)
    _record(sender, request, "discarded", text, getattr(einfo, "traceback", None))
    _job_event("job.failed", sender, request or {}, {"duration": _duration(kwargs.get("task_id"))}, error=text)
    _failed_outside_body.add(kwargs.get("task_id"))  # Celery's task_failure follows, without the request


class Snooze(Retry):
    """``raise pgbroker.Snooze(seconds)`` in a task: run it again in ``seconds`` without
    spending an attempt or a Celery retry (the same job row goes back to ``scheduled``;
    ``meta.snoozed`` counts the snoozes). Only for tasks consumed from pgbroker."""

    def __init__(self, seconds: float):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise InvalidSnooze(f"snooze needs a number of seconds >= 0, got {seconds!r}")
        self.seconds = float(seconds)
        super().__init__(f"snoozed for {self.seconds:g}s", when=self.seconds)

    def __reduce__(self):  # crosses from pool processes to the worker
        return self.__class__, (self.seconds,)


@signals.task_retry.connect
def _on_retry(sender=None, request=None, reason=None, einfo=None, **kwargs):
    if isinstance(reason, Snooze):
        job = _job_of(request)
        if job is not None and id(getattr(sender, "app", None)) in _apps:
            _engine(sender.app).settler.submit(Outcome(job[0], job[1], "snoozed", delay=reason.seconds))
        _job_event("job.snoozed", sender, request, {"delay": reason.seconds})
        return
    exc = getattr(reason, "exc", None) or reason  # celery.exceptions.Retry wraps the cause
    text = describe(exc, with_traceback=False)[0] if isinstance(exc, BaseException) else str(exc)
    when = reason.humanize() if hasattr(reason, "humanize") else "retrying"
    _record(sender, request, "error", f"{text} ({when})", getattr(einfo, "traceback", None))
    _job_event("job.retried", sender, request, {"delay": _retry_delay(reason)}, error=text)


def _retry_delay(reason) -> float | None:
    """Seconds until the retry runs (Celery's Retry carries a countdown or an ETA)."""
    when = getattr(reason, "when", None)
    if isinstance(when, (int, float)):
        return float(when)
    if isinstance(when, datetime):
        return (when - datetime.now(when.tzinfo or timezone.utc)).total_seconds()
    return None


def forget_revoke(task_id: str | None) -> None:
    """This worker forgets a revoke of ``task_id``: its job was retried (``pgbroker.jobs.retry``)
    after the revoke cancelled it, and Celery's memory of revoked ids would drop it again."""
    from celery.worker import state

    if task_id is not None:
        state.revoked.discard(task_id)


@signals.task_revoked.connect
def _on_revoked(sender=None, request=None, terminated=None, expired=None, **kwargs):
    why = ("expired before it ran (Celery `expires`)" if expired
           else "terminated by Celery remote control" if terminated else "revoked by Celery remote control")
    _record(sender, request, "cancelled", why)


#: The consumers of this process's workers (see :func:`_on_shutting_down`).
_consumers: "weakref.WeakSet[Any]" = weakref.WeakSet()


@signals.worker_shutting_down.connect
def _on_shutting_down(**kwargs):
    """Celery's shutdown signal handler ran (SIGTERM, SIGINT, SIGQUIT; main process).

    Celery's blocking loop looks at the shutdown flag only between two waits, and runs
    one more cycle after it saw it: without this, the worker would wait up to two
    seconds on LISTEN, twice, and might claim more jobs in that last cycle.
    """
    for consumer in list(_consumers):
        connection = consumer.connection
        if connection is not None and isinstance(connection.transport, Transport):
            connection.transport.stop_consuming()


@signals.worker_init.connect
def _on_worker_init(sender=None, **kwargs):
    app = getattr(sender, "app", None)
    if app is not None and uses_pgbroker(app):
        install(app)
        # The worker's loop is Celery's blocking one (the transport waits on LISTEN
        # itself): with the pool's put-locks it would block in apply_async while every
        # process is busy, and stop answering remote control until one is free. The
        # PoolGate (see WorkerHooks) holds such requests back instead.
        sender.pool_putlocks = False
        pool.wait_for_tasks_without_the_lock()
        # That blocking pool marks the task of a process that died (OOM killer, SIGKILL)
        # lost only worker_lost_wait after the death, and keeps its slot busy until then;
        # Celery's default, 10 s, is meant for the event-loop pool, which sees the death at once.
        if sender.worker_lost_wait == DEFAULTS["worker_lost_wait"]:
            sender.worker_lost_wait = LOST_WAIT
        # Without Celery's event loop its timer is a thread that sleeps up to
        # worker_timer_precision before it sees a new entry: a countdown task that Postgres
        # made available on time would start up to 1 s late (Celery's default).
        if sender.timer_precision == DEFAULTS["worker_timer_precision"]:
            sender.timer_precision = TIMER_PRECISION


@signals.worker_ready.connect
def _on_worker_ready(sender=None, **kwargs):
    """The worker's main process prunes expired results (whatever its broker)."""
    from .backend import ResultBackend

    app = getattr(sender, "app", None)
    backend = getattr(app, "backend", None) if app is not None else None
    if isinstance(backend, ResultBackend):
        backend.start_pruner()


_celery_scheduled = _control.Panel.data["scheduled"]
#: The priority Celery's worker gives the timer entries of the ETA tasks it holds.
_ETA_ENTRY_PRIORITY = 6


@_control.inspect_command(alias="dump_schedule")
def scheduled(state, **kwargs):
    """List of ETA/countdown tasks: with pgbroker they wait in Postgres, not in a worker.

    Each scheduled job of the queues this worker consumes is listed by exactly one of
    the live workers consuming its queue, so ``celery inspect scheduled`` (and Flower)
    show the whole schedule once, in Celery's format. Other brokers: Celery's answer.
    """
    held = _celery_scheduled(state, **kwargs)
    app, consumer = state.app, state.consumer
    task_consumer = getattr(consumer, "task_consumer", None)
    if id(app) not in _apps or task_consumer is None:
        return held
    engine = _engine(app)
    queues = [q.name for q in task_consumer.queues]
    accept = prepare_accept_content(app.conf.accept_content)
    for payload in engine.scheduled_listing(maintainer_for(engine).consumer_id, queues):
        try:
            message = task_consumer.channel.Message(payload, channel=task_consumer.channel, accept=accept)
            request = Request(message, app=app, hostname=consumer.hostname)
        except Exception as exc:  # not a task this worker knows or accepts: not listed
            logger.debug("pgbroker: scheduled job not listed: %r", exc)
            continue
        held.append({"eta": request.eta.isoformat() if request.eta else None,
                     "priority": _ETA_ENTRY_PRIORITY, "request": request.info()})
    return held


class WorkerHooks(bootsteps.StartStopStep):
    """Consumer step: outcomes that only the worker's main process sees, and the
    :class:`PoolGate` of a prefork or threads pool.

    * Success: the pool hands each result back to the main process, which
      records ``completed`` (batched with the acks) instead of every pool child
      writing to the database.
    * Rejections: Celery rejects unknown tasks, invalid messages and undecodable
      bodies itself and tells signals, not the transport, why. We wrap those
      handlers (before the task consumer is created) to put the reason on the
      message, where the transport's ack/reject picks it up.
    """

    name = "pgbroker.worker-hooks"
    requires = ("celery.worker.consumer.connection:Connection",)  # so info() comes after Celery's

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        self.gate = None
        _consumers.add(c)
        if c.pool is not None and _gated(c.pool) and c.controller is not None and not c.controller.use_eventloop:
            self.gate = PoolGate(c)
            c.on_task_request = self.gate.process_task
        if c.pool is not None:
            c.pool.apply_async = _reporting_success(c.app, c.pool.apply_async, self.gate)
        c.on_unknown_task = _tagging(c.on_unknown_task, lambda body, m, exc: f"unknown task: {exc!r}")
        c.on_invalid_task = _tagging(c.on_invalid_task, lambda body, m, exc: f"invalid task message: {exc!r}")
        c.on_unknown_message = _tagging(c.on_unknown_message, lambda body, m: "not a Celery task message")
        c.on_decode_error = _tagging(
            c.on_decode_error, lambda m, exc: f"undecodable message body ({m.content_type}): {exc!r}", first=0
        )

    def start(self, c):
        # A started prefork pool has its grow (Celery sets it then): processes added by
        # --autoscale or pool_grow must take the requests waiting in the gate.
        grow = getattr(c.pool, "grow", None)
        if self.gate is not None and grow is not None and not getattr(grow, "pgbroker_gated", False):
            c.pool.grow = _then(grow, self.gate.grown)

    def info(self, c):
        """``celery inspect stats`` → broker: Celery drops the password field but shows
        the hostname, which for pgbroker (as for any transport that parses its own URL)
        is the whole URL; this step comes after Celery's (``requires``) and replaces it, masked."""
        if c.connection is None:
            return None
        broker = c.connection.info()
        broker.pop("password", None)
        broker["hostname"] = mask_url(str(broker.get("hostname") or ""))
        broker["alternates"] = [mask_url(str(url)) for url in broker.get("alternates") or ()]
        return {"broker": broker}

    def stop(self, c):
        # The consumer stops (shutdown, or a restart after a lost connection): requests
        # still waiting for a process were never acknowledged, and their channel gives
        # them back; they must not be handed over afterwards (as Celery clears its
        # event loop's semaphore).
        if self.gate is not None:
            self.gate.waiting.clear()


def _gated(pool) -> bool:
    """Whether requests should wait in a :class:`PoolGate` for this pool: prefork (see
    there), and threads, whose executor would otherwise queue every prefetched request
    out of the worker's reach: after a lost connection gave their jobs back to the
    queue, they still ran, and ran again when claimed anew."""
    return getattr(pool, "uses_semaphore", False) or isinstance(pool, ThreadsPool)


class PoolGate:
    """Hands task requests to a prefork or threads pool only while one of its processes
    (threads) is free.

    Celery's event loop does this with a semaphore; its blocking loop, which workers
    on pgbroker run, relies instead on the pool blocking the main thread until a
    process is free, and while blocked the worker answers no remote control. Here
    the requests wait in the main process instead, in order, and are handed over as
    processes finish, each checked for revocation and expiry at that moment (as the
    event loop does), so a task that expired while waiting is revoked, not run.

    Completions arrive on the pool's result thread: they schedule the hand-off on
    the worker's main thread (Celery's ``call_soon``) and interrupt its wait.
    """

    def __init__(self, consumer):
        self.consumer = consumer
        self.pool = consumer.pool
        self.waiting: deque = deque()
        self.running = 0  # handed to the pool and not finished (main thread only)

    def process_task(self, request) -> None:
        self.waiting.append(request)
        self._hand_over()

    def finished(self) -> None:
        """A job of the pool finished (any thread)."""
        self._soon(self._on_finished)

    def grown(self) -> None:
        """The pool has more processes (``--autoscale``, ``pool_grow``; any thread): they
        take waiting requests now, not when a running task finishes."""
        self._soon(self._hand_over)

    def _soon(self, fn) -> None:
        self.consumer.call_soon(fn)
        transport = getattr(self.consumer.connection, "transport", None)
        if isinstance(transport, Transport):
            transport.interrupt()

    def _on_finished(self) -> None:
        self.running = max(0, self.running - 1)
        self._hand_over()

    def _hand_over(self) -> None:
        # A stopped or terminated pool (cold shutdown) takes nothing more: what waits here
        # is unacknowledged and goes back to its queue with the connection.
        while self.waiting and self.pool.active and self.running < max(1, self.pool.num_processes or 1):
            request = self.waiting.popleft()
            try:
                request.execute_using_pool(self.pool)
            except TaskRevokedError:  # revoked or expired while it waited: never handed over
                continue
            self.running += 1


def _reporting_success(app, apply_async, gate: PoolGate | None = None):
    """Wrap ``pool.apply_async`` so that a successful result completes its job row
    (and, with a :class:`PoolGate`, that every finished job is reported to it).

    Celery calls it with ``args=(task name, task id, request dict, body, …)``; the
    request dict carries our ``pgbroker_job`` header, and the callback receives
    ``(failed, retval, runtime)`` in the main process whatever the pool.
    """

    def apply(target, args=None, kwargs=None, callback=None, error_callback=None, **options):
        job = _job_of(args[2]) if args and len(args) > 2 and isinstance(args[2], dict) else None
        done = _once(gate.finished) if gate is not None else None
        on_result, on_error = callback, error_callback

        def callback(result, *a, **kw):
            if job is not None and not result[0]:
                _engine(app).settler.submit(Outcome(job[0], job[1], "completed"))
                if telemetry.enabled("job.completed"):
                    request = dict(args[2], task=args[0], id=args[1])
                    _job_event("job.completed", None, request, {"duration": result[2]})
            if done is not None:
                done()
            return on_result(result, *a, **kw) if on_result is not None else None

        def error_callback(*a, **kw):
            if done is not None:
                done()
            return on_error(*a, **kw) if on_error is not None else None

        return apply_async(target, args, kwargs, callback=callback, error_callback=error_callback, **options)

    return apply


def _then(fn, after):
    """``fn``, then ``after()``."""

    def both(*args, **kwargs):
        result = fn(*args, **kwargs)
        after()
        return result

    both.pgbroker_gated = True
    return both


def _once(fn):
    """``fn`` callable any number of times, run only the first."""
    lock, called = threading.Lock(), []

    def once():
        with lock:
            if called:
                return
            called.append(True)
        fn()

    return once


def _tagging(handler, reason, first: int = 1):
    def tagged(*args):
        message = args[first]
        if getattr(message, "pgbroker_error", False) is None:
            message.pgbroker_error = reason(*args)
        return handler(*args)

    return tagged
