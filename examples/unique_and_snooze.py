"""Unique jobs and snooze, on examples/shop.py.

Start a worker, then run this against the same database:

    BROKER_URL=pgbroker://user:pass@host/db celery -A shop worker -P threads
    BROKER_URL=pgbroker://user:pass@host/db python unique_and_snooze.py

`send_receipt` is unique per order for an hour: the second call stores nothing and
names the job that holds the key. `ship_when_in_stock` snoozes twice before it
ships: the same job row goes back to `scheduled` each time, spending no retry.
"""
from __future__ import annotations

import sys
import time

import shop
from pgbroker.engine import engine_for
from pgbroker.unique import duplicate_of


def main() -> int:
    first = shop.send_receipt.delay("order-42")
    second = shop.send_receipt.delay("order-42")  # a double click
    print(f"first {first.id}; second {second.id} is a duplicate of {duplicate_of(second.id)}")
    print("receipt:", first.get(timeout=30))
    shipped = shop.ship_when_in_stock.delay("teapot")
    print("ship_when_in_stock:", shipped.get(timeout=30))
    engine = engine_for(shop.app.backend.db)
    deadline = time.monotonic() + 10  # the result is stored before the job row records it
    while (job := engine.jobs([shipped.id])[0]).state != "completed" and time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"job {job.id}: {job.state}, {job.attempt} deliveries, snoozed {job.meta.get('snoozed')} times, "
          f"{len(job.errors)} errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
