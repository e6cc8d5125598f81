"""The job API and queue controls, on examples/shop.py.

Start a worker, then run this against the same database:

    BROKER_URL=pgbroker://user:pass@host/db celery -A shop worker -P threads
    BROKER_URL=pgbroker://user:pass@host/db python job_admin.py

It pauses the queue, publishes a nightly batch (with `meta`), looks at the queue,
cancels the batch by its metadata, resumes; runs a feed import that fails for good
and retries it by hand; then limits the queue cluster-wide and lifts the limits.
The same operations from the shell: `pgbroker jobs …`, `pgbroker queues …`.
"""
from __future__ import annotations

import sys
import time

import shop
import pgbroker.jobs as jobs

QUEUE = "celery"


def wait_state(task_id: str, state: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while (job := jobs.get(shop.app, task_id)) is None or job.state != state:
        if time.monotonic() > deadline:
            raise SystemExit(f"job {task_id} did not reach {state}: {job}")
        time.sleep(0.05)
    return job


def main() -> int:
    app = shop.app
    jobs.pause(app, QUEUE)
    batch = [shop.add.apply_async((i, i), meta={"batch": "nightly"}) for i in range(3)]
    stats = jobs.queues(app, QUEUE)[0]
    print(f"paused={stats['paused']} available={stats['available']} "
          f"nightly={jobs.count(app, meta={'batch': 'nightly'}, state='available')}")
    done = jobs.cancel(app, meta={"batch": "nightly"})
    print(f"cancelled {done.cancelled}, revoked {done.revoked}; states: "
          f"{sorted({jobs.get(app, r.id).state.value for r in batch})}")
    jobs.resume(app, QUEUE)
    print("after resume:", shop.add.delay(20, 22).get(timeout=30))

    feed = shop.import_feed.delay("bad://feed")          # fails, retries once, then gives up
    job = wait_state(feed.id, "discarded")
    print(f"import_feed {job.state.value} after {job.attempt} attempts: {job.errors[-1]['error']}")
    print("retried:", jobs.retry(app, [feed.id]) == [feed.id])
    job = wait_state(feed.id, "discarded")              # the feed is still bad: one more attempt
    print(f"after the manual retry: {job.attempt} attempts, meta {job.meta}, {len(job.errors)} errors")

    limits = jobs.limit(app, QUEUE, concurrency=2, rate="50/s")
    print(f"limits: concurrency {limits['concurrency']}, rate {limits['rate_limit']}/{limits['rate_period']:g}s")
    print("sum under limits:", sum(r.get(timeout=30) for r in [shop.add.delay(i, 1) for i in range(10)]))
    jobs.limit(app, QUEUE, concurrency=None, rate=None)
    status = jobs.status(app)
    print(f"workers: {len(status['consumers'])}, paused queues: {status['paused']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
