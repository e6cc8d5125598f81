"""Telemetry: a fixed catalogue of events, each with fixed measurement and metadata keys.

Subscribe a handler and it is called, in the process where the event happens, with
``(name, measurements, metadata)``::

    from pgbroker import telemetry

    def log_slow(name, measurements, metadata):
        if measurements["duration"] > 1.0:
            print("slow", metadata["task"], metadata["task_id"])

    telemetry.subscribe(log_slow, ["job.completed"])

The catalogue (:data:`EVENTS`) is a contract: names and keys change only with a
major version, and a test fails if they do. Times are seconds (floats). A handler
that raises is logged and stays subscribed; events are never lost because of it,
nor does a job fail. With no subscriber, emitting costs one dictionary lookup.

Where events fire: ``job.enqueued`` in the publishing process; ``job.claimed`` in the
consuming process; ``job.started``, ``job.retried``, ``job.snoozed``, ``job.failed``
in the process running the task (a prefork pool child: subscribe at import time of
the app module so children inherit the handler); ``job.completed`` in the worker's
main process; maintenance events (``jobs.rescued``, ``jobs.pruned``,
``results.pruned``) in whichever worker ran them; ``beat.fired`` in the beat. :mod:`pgbroker.otel` bridges them all to
OpenTelemetry metrics.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

logger = logging.getLogger(__name__)

__all__ = ["EVENTS", "Event", "subscribe", "unsubscribe", "emit", "enabled", "job_metadata"]


@dataclass(frozen=True)
class Event:
    """One catalogued event: what it means and the keys it always carries."""

    name: str
    doc: str
    measurements: tuple[str, ...]
    metadata: tuple[str, ...]


_JOB = ("job_id", "task_id", "task", "queue", "attempt")

#: Every event pgbroker emits. Measurements are numbers; metadata values are
#: strings, numbers or None.
EVENTS: dict[str, Event] = {e.name: e for e in (
    Event("job.enqueued", "A message was published to a queue (one event per message; with "
          "unique_duplicate, its unique key was held and nothing was stored). size: body bytes.",
          ("size",), ("queue", "task", "task_id", "unique_duplicate")),
    Event("job.claimed", "A job was handed to a consumer (one event per job). queue_time: seconds "
          "since it was due.",
          ("queue_time",), _JOB + ("consumer",)),
    Event("job.started", "A task began running.", (), _JOB + ("worker",)),
    Event("job.completed", "A task returned; its job is completed.", ("duration",), _JOB + ("worker",)),
    Event("job.retried", "A task asked Celery to retry it (self.retry, autoretry_for).",
          ("delay",), _JOB + ("worker", "error")),
    Event("job.snoozed", "A task raised pgbroker.Snooze; it runs again after the delay.",
          ("delay",), _JOB + ("worker",)),
    Event("job.failed", "A task raised and will not be retried; its job is discarded.",
          ("duration",), _JOB + ("worker", "error")),
    Event("job.discarded", "A job was discarded without running: unknown task, undecodable or invalid message.",
          (), _JOB + ("reason",)),
    Event("job.cancelled", "Jobs were cancelled through pgbroker.jobs.cancel (or `pgbroker jobs cancel`).",
          ("cancelled", "revoked"), ("queue", "task", "by")),
    Event("jobs.rescued", "A rescue run: jobs of dead consumers or closed connections taken back.",
          ("redelivered", "discarded", "completed", "dead_consumers", "duration"), ("consumer",)),
    Event("jobs.pruned", "A prune run by the leader: finished jobs and beat fires deleted.",
          ("completed", "cancelled", "discarded", "fires", "duration"), ("consumer",)),
    Event("results.pruned", "A result prune run by the leader: expired results and chord counters deleted.",
          ("results", "counters", "duration"), ("schema",)),
    Event("beat.fired", "A beat entry fired and its task was published (once per fire, cluster-wide).",
          ("lateness",), ("entry", "task", "task_id", "fire_at")),
)}

def job_metadata(job_id, task_id, task, queue, attempt, **extra) -> dict[str, Any]:
    """The metadata of a ``job.*`` event about one job: the keys every such event
    carries, in the catalogue's order, then the event's own (``extra``)."""
    return {"job_id": job_id, "task_id": task_id, "task": task, "queue": queue, "attempt": attempt, **extra}


Handler = Callable[[str, Mapping[str, float], Mapping[str, Any]], None]

_handlers: dict[str, tuple[Handler, ...]] = {}
_lock = threading.Lock()


def subscribe(handler: Handler, events: Iterable[str] | None = None) -> Callable[[], None]:
    """Call ``handler(name, measurements, metadata)`` for ``events`` (default: all of
    them). Returns a function that unsubscribes it. An unknown event name raises
    ``ValueError`` (a typo would otherwise never fire)."""
    names = list(EVENTS) if events is None else list(events)
    unknown = [n for n in names if n not in EVENTS]
    if unknown:
        raise ValueError(f"unknown telemetry event(s) {unknown}; the catalogue is {sorted(EVENTS)}")
    with _lock:
        for name in names:
            _handlers[name] = _handlers.get(name, ()) + (handler,)
    return lambda: unsubscribe(handler, names)


def unsubscribe(handler: Handler, events: Iterable[str] | None = None) -> None:
    """Stop calling ``handler`` for ``events`` (default: all)."""
    with _lock:
        for name in list(EVENTS) if events is None else events:
            kept = tuple(h for h in _handlers.get(name, ()) if h is not handler)
            if kept:
                _handlers[name] = kept
            else:
                _handlers.pop(name, None)


def enabled(name: str) -> bool:
    """Whether anyone listens to ``name`` (lets callers skip building the event)."""
    return name in _handlers


def emit(name: str, measurements: Mapping[str, float], metadata: Mapping[str, Any]) -> None:
    """Deliver an event to its subscribers (its keys are the catalogue's, in its order;
    the contract test holds every emitter to that)."""
    for handler in _handlers.get(name, ()):
        try:
            handler(name, measurements, metadata)
        except Exception:
            logger.exception("pgbroker: telemetry handler %r failed on %s", handler, name)
