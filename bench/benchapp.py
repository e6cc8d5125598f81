"""The Celery app `bench/run.py` measures. Broker from env BENCH_BROKER_URL, no result backend.

Tasks report back through files named in the environment, appended with O_APPEND so
that every pool process (prefork children, threads) can write without locking.
"""
import os
import time

from celery import Celery, signals

app = Celery("benchapp", broker=os.environ.get("BENCH_BROKER_URL", "memory://"))
app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)

_fds = {}  # env var -> fd, opened on first use (an fd inherited over fork stays correct)


def _append(env_var, data):
    fd = _fds.get(env_var)
    if fd is None:
        fd = _fds[env_var] = os.open(os.environ[env_var], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, data)


@app.task
def noop():
    _append("BENCH_COUNT_FILE", b"x")


@app.task
def latency(sent_at):
    _append("BENCH_LATENCY_FILE", f"{time.time() - sent_at}\n".encode())


@signals.worker_ready.connect
def _touch_ready_file(**_):
    open(os.environ["BENCH_READY_FILE"], "w").close()
