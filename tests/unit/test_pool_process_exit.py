"""A prefork pool process that exits releases the locks it holds when SIGTERM comes.

billiard's pool sends an exiting pool process SIGTERM as soon as it reads the
process's last message, which can be before the process has released the lock of
the queue it wrote it to. Killed by SIGTERM's default action, the process would leave
that lock held: the next pool process hangs on it with its job, and so does the
worker's shutdown. (Reproduced with a real worker by alternating tasks over their hard
time limit with short ones: 1 to 3 in 8 runs hung before the fix, 0 in 20 after.)
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

from pgbroker import pool


def test_sigterm_inside_a_lock_of_an_exiting_pool_process_releases_it():
    lock = multiprocessing.get_context("fork").Lock()  # a SemLock, as billiard's queue locks
    pid = os.fork()
    if pid == 0:  # the pool process, as billiard's exit runs it
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # billiard resets it so before exiting
            pool._on_process_shutdown()  # worker_process_shutdown
            with lock:  # writing its last message
                os.kill(os.getpid(), signal.SIGTERM)  # the pool read it already
                time.sleep(10)
        finally:
            os._exit(7)  # billiard's own exit
    _, status = os.waitpid(pid, 0)
    assert lock.acquire(timeout=5), "the dead process still holds the lock"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
