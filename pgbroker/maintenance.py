"""Per-process background duties of a consuming process.

One :class:`Maintainer` per process and database: it registers this process as a
consumer with the list of its open broker connections and the queues they consume,
heartbeats, and on each tick stages due scheduled jobs; with each heartbeat it
rescues the jobs of dead consumers and sweeps expired queues. Every step is a single idempotent statement using SKIP LOCKED,
so any number of processes can run it at once without a leader; leadership
would only save queries.
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
        self._thread.join(timeout)
        try:
            self.engine.settler.flush(timeout)
            self.engine.unregister_consumer(self.consumer_id)
            self.engine.rescue(self.options.rescue_after)
        except Exception as exc:  # the database may be gone; the rescuer elsewhere will do it
            logger.warning("pgbroker: could not unregister consumer %s: %s", self.consumer_id, exc)

    def _beat(self) -> None:
        queues = set().union(*self._queues.values())
        self.engine.heartbeat(self.consumer_id, self.hostname, os.getpid(), sorted(self._connections), sorted(queues))

    def beat(self) -> None:
        """Heartbeat, rescue the jobs of dead consumers, sweep expired queues."""
        with self._lock:
            self._beat()
        swept = self.engine.sweep_queues()
        if swept["queues"]:
            logger.info("pgbroker: %d expired queue(s) deleted with %d message(s)", swept["queues"], swept["emptied"])
        if swept["discarded"]:
            logger.warning("pgbroker: %d task message(s) discarded: not delivered within their queue's "
                           "x-message-ttl", swept["discarded"])
        rescued = self.engine.rescue(self.options.rescue_after)
        if rescued["redelivered"] or rescued["discarded"]:
            logger.warning(
                "pgbroker: rescued jobs (%d dead consumer(s)): %d redelivered, %d discarded",
                rescued["dead"], rescued["redelivered"], rescued["discarded"],
            )

    def prune(self) -> None:
        """Delete finished jobs past their retention (one process at a time)."""
        pruned = self.engine.prune()
        if pruned and any(pruned.values()):
            logger.info("pgbroker: pruned %(completed)d completed, %(cancelled)d cancelled, %(discarded)d "
                        "discarded jobs and %(fires)d beat fires", pruned)

    def _run(self) -> None:
        opts = self.options
        next_beat = 0.0
        next_prune = time.monotonic() + opts.prune_interval
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_beat:
                    self.beat()
                    next_beat = time.monotonic() + opts.heartbeat_interval
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + opts.prune_interval
                    self.prune()
                self.engine.stage()
                due = self.engine.next_due()
                wait = min(opts.polling_interval, next_beat - time.monotonic())
                if due is not None:
                    wait = min(wait, due)
            except Exception as exc:
                logger.warning("pgbroker: maintenance failed (%s); retrying", exc)
                wait = 1.0
            # Overdue rows locked by another process's stager must not make us spin.
            self._stop.wait(max(wait, 0.01))


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
    """Stop this process's background work for ``db`` and close its pool (tests, embedding apps)."""
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
