"""A plain Celery app. The only pgbroker-specific line is the broker URL.

Run a worker:   BROKER_URL=pgbroker://user:pass@host/db celery -A shop worker
Send tasks:     python -c "import shop; shop.add.delay(2, 3)"
"""
from __future__ import annotations

import os
import random
import time

from celery import Celery

app = Celery("shop", broker=os.environ.get("BROKER_URL", "pgbroker://localhost/shop"))
app.conf.update(
    task_ignore_result=True,          # results in Postgres arrive with the result backend
    task_acks_late=True,              # at-least-once: a crash mid-task redelivers it
    task_reject_on_worker_lost=True,
    broker_transport_options={"schema": os.environ.get("PGBROKER_SCHEMA", "pgbroker")},
)


@app.task
def add(x, y):
    return x + y


@app.task
def slow(seconds):
    time.sleep(seconds)
    return seconds


class PaymentGatewayDown(Exception):
    pass


@app.task(bind=True, autoretry_for=(PaymentGatewayDown,), retry_backoff=1, retry_jitter=False, max_retries=3)
def charge(self, order_id, fail_times=2):
    """Fails ``fail_times`` times (a flaky gateway), then succeeds: one job row, rising attempts."""
    if self.request.retries < fail_times:
        raise PaymentGatewayDown(f"gateway timeout for order {order_id} (try {self.request.retries + 1})")
    return f"charged {order_id}"


@app.task(autoretry_for=(ValueError,), retry_backoff=1, retry_jitter=False, max_retries=1)
def import_feed(url):
    """Always fails: after its retry the job is discarded with every error recorded."""
    raise ValueError(f"feed {url} is not valid XML")


@app.task
def roll():
    return random.randint(1, 6)
