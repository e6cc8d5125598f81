"""Per-process background duties of a consuming process.

One :class:`Maintainer` per process and database: it registers this process as a
consumer with the list of its open broker connections and the queues they consume,
heartbeats, and on each tick stages due scheduled jobs; with each heartbeat it
sweeps expired queues. Staging and sweeping are single idempotent statements using
SKIP LOCKED, which any number of processes can run at once.

The leader-run services share one shape: an interval (``rescue_interval``,
``prune_interval``), a batch limit (``rescue_batch_size``, ``prune_batch_size``), a
leader per run (the service's row in ``services``, won by one process per interval
with a conditional update, plus an advisory lock so that runs never overlap; the
others skip), and a telemetry event per run (``jobs.rescued``, ``jobs.pruned``,
``results.pruned``).
"""
from __future__ import annotations

import atexit
import itertools
import logging
import os
import socket
import threading
import time
import uuid

from . import telemetry
from .engine import JobEngine

logger = logging.getLogger(__name__)


class Maintainer:
    """Heartbeat + stager + rescuer thread for one consuming process."""

    def __init__(self, engine: JobEngine):
        self.engine = engine
        self.options = engine.db.options
        self.hostname = socket.gethostname()
        self.consumer_id = f"{self.hostname}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._connections: set[str] = set()
        self._queues: dict[str, set[str]] = {}  # connection -> queues it consumes
        self._numbers = itertools.count(1)
        self._stop = threading.Event()
        self._woken = threading.Event()
        self._wake_lock = threading.Lock()
        #: When (monotonic) the stager looks next: infinity while it is looking, so that
        #: the jobs scheduled meanwhile (wake_at) count at the next plan.
        self._next_look = float("inf")
        self._clock_offset = 0.0  # the server's clock minus ours (seconds)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def open_connection(self) -> str:
        """Register a new broker connection of this process before it claims anything.

        Returns the owner id its claims carry (``<consumer id>#<n>``). Starts the
        maintenance thread on first use.
        """
        owner = f"{self.consumer_id}#{next(self._numbers)}"
        with self._lock:
            self._connections.add(owner)
            self._beat()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pgbroker-maintainer", daemon=True)
                self._thread.start()
                atexit.register(self.stop)
        return owner

    def consume(self, owner: str, queues) -> None:
        """Connection ``owner`` consumes ``queues``: listed with the next heartbeat, which
        is written now so that they cannot expire meanwhile."""
        with self._lock:
            self._queues.setdefault(owner, set()).update(queues)
            self._beat()

    def cancel(self, owner: str, queues) -> None:
        with self._lock:
            self._queues.get(owner, set()).difference_update(queues)

    def close_connection(self, owner: str) -> None:
        """Forget a closed connection: its unacknowledged jobs become rescuable at once, and
        the queues it consumed can expire."""
        with self._lock:
            self._connections.discard(owner)
            self._queues.pop(owner, None)
        try:
            self._beat()
        except Exception:  # the database may be what closed it; the thread will retry
            pass

    def stop(self, timeout: float = 5.0) -> None:
        """Write pending outcomes, unregister, and release this process's unfinished jobs."""
        with self._lock:
            if self._thread is None or self._stop.is_set():
                return
            self._stop.set()
        self._woken.set()
        self._thread.join(timeout)
        try:
            self.engine.settler.flush(timeout)
            self.engine.unregister_consumer(self.consumer_id)
            self.engine.rescue(self.options.rescue_after, wait=True)  # this process's jobs, at once
        except Exception as exc:  # the database may be gone; the rescuer elsewhere will do it
            logger.warning("pgbroker: could not unregister consumer %s: %s", self.consumer_id, exc)

    def wake_at(self, epoch: float) -> None:
        """A job of a queue this process consumes is due at ``epoch`` (the server's
        clock): stage then if the stager would sleep longer (called from any thread)."""
        at = time.monotonic() + epoch - self._clock_offset - time.time()
        with self._wake_lock:
            if at < self._next_look:
                self._next_look = at
                self._woken.set()

    def _beat(self) -> None:
        queues = set().union(*self._queues.values())
        self.engine.heartbeat(self.consumer_id, self.hostname, os.getpid(), sorted(self._connections), sorted(queues))

    def beat(self) -> None:
        """Heartbeat and sweep expired queues."""
        with self._lock:
            self._beat()
        swept = self.engine.sweep_queues()
        if swept["queues"]:
            logger.info("pgbroker: %d expired queue(s) deleted with %d message(s)", swept["queues"], swept["emptied"])
        if swept["discarded"]:
            logger.warning("pgbroker: %d task message(s) discarded: not delivered within their queue's "
                           "x-message-ttl", swept["discarded"])

    @property
    def _rescue_interval(self) -> float:
        return self.options.rescue_interval or self.options.heartbeat_interval

    def rescue(self) -> None:
        """Take back the jobs of dead consumers and closed connections (one process at a time)."""
        started = time.monotonic()
        rescued = self.engine.rescue(self.options.rescue_after, lease=self._rescue_interval)
        if rescued is None:
            return
        if rescued["redelivered"] or rescued["discarded"] or rescued["completed"]:
            logger.warning(
                "pgbroker: rescued jobs (%d dead consumer(s)): %d redelivered, %d discarded, "
                "%d completed (their result was stored)",
                rescued["dead"], rescued["redelivered"], rescued["discarded"], rescued["completed"],
            )
        telemetry.emit("jobs.rescued", {
            "redelivered": rescued["redelivered"], "discarded": rescued["discarded"],
            "completed": rescued["completed"],
            "dead_consumers": rescued["dead"], "duration": time.monotonic() - started}, {"consumer": self.consumer_id})

    def prune(self) -> None:
        """Delete finished jobs past their retention (one process at a time)."""
        started = time.monotonic()
        pruned = self.engine.prune(lease=self.options.prune_interval)
        if pruned is None:
            return
        if any(pruned.values()):
            logger.info("pgbroker: pruned %(completed)d completed, %(cancelled)d cancelled, %(discarded)d "
                        "discarded jobs and %(fires)d beat fires", pruned)
        telemetry.emit("jobs.pruned", {**pruned, "duration": time.monotonic() - started}, {"consumer": self.consumer_id})

    def _run(self) -> None:
        """Every duty on its own interval: heartbeat, rescue, prune; staging between them."""
        opts = self.options
        duties = [(self.beat, opts.heartbeat_interval), (self.rescue, self._rescue_interval),
                  (self.prune, opts.prune_interval)]
        due = [0.0, 0.0, time.monotonic() + opts.prune_interval]
        while not self._stop.is_set():
            try:
                for i, (duty, interval) in enumerate(duties):
                    if time.monotonic() >= due[i]:
                        due[i] = time.monotonic() + interval
                        duty()
                self.engine.stage()
                next_due, server_now = self.engine.next_due()
                self._clock_offset = server_now - time.time()
                wait = min(opts.polling_interval, min(due) - time.monotonic())
                if next_due is not None:
                    wait = min(wait, next_due)
            except Exception as exc:
                logger.warning("pgbroker: maintenance failed (%s); retrying", exc)
                wait = 1.0
            # Overdue rows locked by another process's stager must not make us spin.
            self._sleep(max(wait, 0.01))

    def _sleep(self, wait: float) -> None:
        """Sleep ``wait`` seconds, or less if :meth:`wake_at` asks (before or meanwhile)."""
        with self._wake_lock:
            self._next_look = min(self._next_look, time.monotonic() + wait)
        while not self._stop.is_set():
            with self._wake_lock:
                self._woken.clear()
                left = self._next_look - time.monotonic()
            if left <= 0:
                break
            self._woken.wait(left)
        with self._wake_lock:
            self._next_look = float("inf")


_lock = threading.Lock()


def maintainer_for(engine: JobEngine) -> Maintainer:
    """This process's Maintainer for ``engine``'s database (cached on the engine, like
    :func:`~pgbroker.engine.engine_for`; forked children get new engines, hence their own)."""
    with _lock:
        m = getattr(engine, "_maintainer", None)
        if m is None:
            m = engine._maintainer = Maintainer(engine)
        return m


def shutdown(db) -> None:
    """Stop this process's background work on ``db``'s database and schema and close the
    pools, for every configuration of it (each set of options has its own Database);
    for tests and embedding apps."""
    for same in db.same_schema():
        _shutdown(same)


def shutdown_all() -> None:
    """Stop this process's background work on every database and close its pools."""
    from .db import Database

    for db in Database.all():
        _shutdown(db)


def _shutdown(db) -> None:
    from .engine import engine_for

    engine = engine_for(db)
    with _lock:
        m = engine.__dict__.pop("_maintainer", None)
    if m is not None:
        m.stop()
    if engine._settler is not None:
        engine._settler.close()
    waiter = db.__dict__.pop("_result_waiter", None)  # the result backend's listener and pruner
    if waiter is not None:
        waiter.close()
    pruner = db.__dict__.pop("_result_pruner", None)
    if pruner is not None:
        pruner.set()
    db.close()
