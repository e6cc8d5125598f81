"""Remote control and monitoring over Postgres, from Python (the CLI does the same).

Start a worker of examples/shop.py, then run this against the same database:

    BROKER_URL=pgbroker://user:pass@host/db celery -A shop worker -E     # -E: task events
    BROKER_URL=pgbroker://user:pass@host/db python remote_control.py

It pings the workers, prints what they consume and their pool sizes, watches task
events for a few seconds while it sends tasks, and revokes a scheduled task: the
revoke cancels its job row in Postgres, so it never runs even if every worker
restarts (`celery control revoke <id>` and Flower's revoke button do the same).
"""
from __future__ import annotations

import sys

import shop
from pgbroker import JobState
from pgbroker.engine import engine_for


def main() -> int:
    app = shop.app
    replies = app.control.ping(timeout=1.0)
    if not replies:
        print("no worker answered: start one with `celery -A shop worker -E`")
        return 1
    print("ping:", replies)
    inspect = app.control.inspect(timeout=1.0)
    for worker, queues in (inspect.active_queues() or {}).items():
        print(f"{worker} consumes {[q['name'] for q in queues]}")
    for worker, stats in (inspect.stats() or {}).items():
        print(f"{worker} pool: {stats['pool']['max-concurrency']} processes, pid {stats['pid']}")

    # Task events, as `celery events` and Flower receive them.
    seen: list[str] = []
    with app.connection_for_read() as conn:
        def succeeded(event):
            seen.append(f"{event['uuid']} succeeded -> {event['result']}")
            receiver.should_stop = len(seen) == 3

        receiver = app.events.Receiver(conn, handlers={"task-succeeded": succeeded})
        receiver.queue(conn.default_channel).declare()  # bound now: the events below are kept for us
        for i in range(3):
            shop.add.delay(i, i)
        try:
            receiver.capture(timeout=10)
        except TimeoutError:
            pass
    print("events:", *seen, sep="\n  ")

    later = shop.add.apply_async((1, 1), countdown=3600)
    later.revoke()
    [job] = engine_for(app.backend.db).jobs([later.id])  # the job row, as `pgbroker jobs` shows it
    print(f"revoked {later.id}: job {job.state.value} by {job.cancelled_by!r}, result {later.state}")
    return 0 if len(seen) == 3 and job.state == JobState.CANCELLED else 1


if __name__ == "__main__":
    sys.exit(main())
