"""A plain Celery app. The only pgbroker-specific lines are the broker and backend URLs.

Run a worker:   BROKER_URL=pgbroker://user:pass@host/db celery -A shop worker
Send tasks:     python -c "import shop; print(shop.add.delay(2, 3).get(timeout=10))"
A chord:        python -c "import shop; print(shop.checkout(['tea', 'cake']).get(timeout=10))"
Beat:           BROKER_URL=… celery -A shop beat -S pgbroker
"""
from __future__ import annotations

import os
import random
import time

from celery import Celery, chord

URL = os.environ.get("BROKER_URL", "pgbroker://localhost/shop")
app = Celery("shop", broker=URL, backend=URL)   # jobs and results in the same Postgres schema
app.conf.update(
    task_acks_late=True,              # at-least-once: a crash mid-task redelivers it
    task_reject_on_worker_lost=True,
    broker_transport_options={"schema": os.environ.get("PGBROKER_SCHEMA", "pgbroker")},
    # `celery -A shop beat -S pgbroker` keeps this schedule in Postgres (any number of beats).
    beat_schedule={"roll-dice": {"task": "shop.roll", "schedule": 2.0}},
    beat_max_loop_interval=1.0,
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


PRICES = {"tea": 350, "cake": 425, "scone": 275}


@app.task
def price(item):
    """One chord header part: the price of one item, in cents."""
    return PRICES[item]


@app.task
def total(prices):
    """The chord body: runs once, when the database counter says every part is done."""
    return sum(prices)


@app.task(unique={"fields": ["task", "args"], "period": 3600})
def send_receipt(order_id):
    """Unique per order for an hour: a double click does not mail twice."""
    return f"receipt for {order_id}"


STOCK = {"tries": 0}


@app.task
def ship_when_in_stock(item):
    """Snoozes until the item is in stock (here: the third look), spending no retry."""
    from pgbroker import Snooze

    STOCK["tries"] += 1
    if STOCK["tries"] < 3:
        raise Snooze(0.5)
    return f"shipped {item}"


def checkout(items):
    """Price every item in parallel, then add them up: ``checkout([...]).get()`` -> cents."""
    return chord(price.s(item) for item in items)(total.s())
