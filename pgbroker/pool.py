"""Celery's prefork pool under pgbroker: pool processes that die never wedge the pool.

pgbroker's transport waits on LISTEN itself, so a worker runs Celery's blocking loop
and, with ``-P prefork``, billiard's blocking pool: its pool processes take their
tasks from one pipe guarded by a lock shared between them (the event-loop pool of
Redis and RabbitMQ workers gives each process its own pipe). A SemLock has no owner
the system could release it for, so a process that dies holding one leaves it held:
every other process waits on it for ever, with the tasks sent to the pool, and so
does the worker's exit. Two places where that happened are covered here.
"""
from __future__ import annotations

import signal

from celery import signals

from .maintenance import shutdown_all

__all__ = ["wait_for_tasks_without_the_lock"]


def wait_for_tasks_without_the_lock() -> None:
    """Make idle pool processes wait for a task without holding the task pipe's lock.

    billiard's process reads the pipe under the lock and blocks there, so while a pool
    is idle one of its processes always holds the lock: killing that process (the OOM
    killer, ``kill -9``, SIGTERM to the worker's process group as systemd sends it)
    wedged the pool. Here a process waits for the pipe to be readable first, then takes
    the lock only to read a task that is there (or finds it taken by another and waits
    again). Called in the worker's main process before its pool starts; the pool
    processes inherit it. Idempotent.
    """
    from billiard.queues import SimpleQueue

    if getattr(SimpleQueue.get_payload, "pgbroker", False):
        return

    def get_payload(self):
        while True:
            self._reader.poll(None)  # readable: a task, or end of file (the pool closed it)
            with self._rlock:
                if self._reader.poll(0):
                    return self._reader.recv_bytes()

    get_payload.pgbroker = True
    SimpleQueue.get_payload = get_payload


@signals.worker_process_shutdown.connect
def _on_process_shutdown(**kwargs):
    """A pool process exits (billiard calls this just before the process sends its last
    message to the pool): write its outcomes, stop pgbroker's threads and close its
    connections (engines inherited from the parent process are not touched: their
    threads do not exist here), then make a SIGTERM end the process cleanly.

    The pool SIGTERMs the process as soon as it reads that last message, which may be
    before the process has released the lock of the queue it wrote it to (on two busy
    cores, often). SIGTERM's default action then kills the process holding the lock:
    the next pool process hangs on it with its job (left executing), and so does the
    worker's shutdown. Exiting through an exception instead releases the lock on the
    way out.
    """
    shutdown_all()
    signal.signal(signal.SIGTERM, _exit_releasing_locks)


def _exit_releasing_locks(signum, frame) -> None:
    """SIGTERM handler of an exiting pool process: raise SystemExit, which unwinds through
    any ``with lock:`` block (billiard exits the process when it reaches its own code),
    unless the signal came inside a lock's ``__enter__`` (acquired, not yet guarded by
    the ``with``): then let the write finish; the process exits a moment later anyway."""
    if frame is not None and frame.f_code.co_name == "__enter__":
        return
    raise SystemExit(128 + signum)
