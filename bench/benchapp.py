"""The Celery app the benchmark runs; its broker comes from BENCH_BROKER_URL."""
from __future__ import annotations

import os
import time

from celery import Celery, signals

app = Celery("benchapp", broker=os.environ.get("BENCH_BROKER_URL", "memory://"))
app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True,
                result_backend=os.environ.get("BENCH_RESULT_BACKEND"))
if os.environ.get("BENCH_TRANSPORT_OPTIONS"):
    import json

    app.conf.broker_transport_options = json.loads(os.environ["BENCH_TRANSPORT_OPTIONS"])

_fds: dict[str, int] = {}


def _append(env: str, data: bytes) -> None:
    fd = _fds.get(env)
    if fd is None:
        fd = _fds[env] = os.open(os.environ[env], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, data)


@app.task
def noop():
    _append("BENCH_COUNT_FILE", b"x")


@app.task
def latency(sent_at):
    _append("BENCH_LATENCY_FILE", f"{time.time() - sent_at}\n".encode())


try:  # Celery's delay_on_commit lives on its Django task class
    from celery.contrib.django.task import DjangoTask
except ImportError:  # pragma: no cover - django not installed
    DjangoTask = app.Task


@app.task(base=DjangoTask)
def noop_on_commit():
    """noop, with delay_on_commit() for the app-transaction row."""
    _append("BENCH_COUNT_FILE", b"x")


@app.task(ignore_result=False)
def echo(value):
    return value


@signals.worker_ready.connect
def _ready(**kwargs):
    open(os.environ["BENCH_READY_FILE"], "w").close()
