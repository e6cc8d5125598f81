"""Pruning cost: delete 1,000,000 finished jobs while a producer and a consumer keep working.

One command (`make bench-prune`): 1M `completed` job rows, finished two minutes ago,
are pruned with the default batch (prune_batch_size=1000 rows per state per
statement, each statement its own short transaction), while one thread publishes
and claims+acks tasks on the same table. Reported: total time, rows/s, statement
durations (p50, p99, max: the longest any row lock is held), and the publish and
claim latencies during the prune against a quiet baseline.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from run import PG  # noqa: E402

from pgbroker.config import Options  # noqa: E402
from pgbroker.db import Database  # noqa: E402
from pgbroker.engine import Outcome, engine_for  # noqa: E402


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] * 1000


def traffic(engine, stop: threading.Event, out: dict) -> None:
    """Publish one message, claim it and complete it, in a loop; record both latencies."""
    while not stop.is_set():
        t0 = time.perf_counter()
        engine.enqueue("live", {"body": "x", "headers": {"id": uuid.uuid4().hex, "task": "t"}, "properties": {}})
        t1 = time.perf_counter()
        [(message, _)] = engine.claim(["live"], 1, "bench#1")
        t2 = time.perf_counter()
        job_id, attempt = message["properties"]["delivery_info"]["pgbroker_job"]
        engine.settle([Outcome(job_id, attempt, "completed")])
        out["publish"].append(t1 - t0)
        out["claim"].append(t2 - t1)


def fresh_engine(url: str, schema: str, **options):
    """A JobEngine on ``schema``, created anew (dropped first if it exists)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    db = Database(url, Options(schema=schema, **options))
    db.ensure_ready()
    return engine_for(db)


def seed_finished(conn, schema: str, rows: int, body: str = "x", age: str = "0") -> None:
    """``rows`` completed jobs, finished ``age`` ago and 1 ms apart, then VACUUM ANALYZE."""
    t0 = time.perf_counter()
    conn.execute(f"INSERT INTO {schema}.jobs (queue, task, state, body, completed_at) "
                 f"SELECT 'done', 't', 'completed', %s, now() - %s::interval - g * interval '1 ms' "
                 f"FROM generate_series(1, %s) AS g", (body, age, rows))
    conn.execute(f"VACUUM ANALYZE {schema}.jobs")
    print(f"seeded {rows:,} completed jobs in {time.perf_counter() - t0:.1f}s")


def measure(engine, seconds: float) -> dict:
    out = {"publish": [], "claim": []}
    stop = threading.Event()
    t = threading.Thread(target=traffic, args=(engine, stop, out))
    t.start()
    time.sleep(seconds)  # a benchmark's measuring window, not test synchronisation
    stop.set()
    t.join()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    url = f"postgresql://{PG}/pgbroker_bench"
    engine = fresh_engine(url, "prune_bench", prune_completed_after=60.0)
    db = engine.db
    with psycopg.connect(url, autocommit=True) as conn:
        seed_finished(conn, "prune_bench", args.rows, age="2 minutes")
    quiet = measure(engine, 5)
    stop = threading.Event()
    during = {"publish": [], "claim": []}
    worker = threading.Thread(target=traffic, args=(engine, stop, during))
    worker.start()
    batches, deleted = [], 0
    t0 = time.perf_counter()
    while True:  # what the maintainer does every prune_interval: prune(rounds=10)
        b0 = time.perf_counter()
        got = engine.prune(rounds=10)
        batches.append((time.perf_counter() - b0) / 10)
        deleted += got["completed"]
        if got["completed"] < 10 * db.options.prune_batch_size:
            break
    total = time.perf_counter() - t0
    stop.set()
    worker.join()
    print(f"pruned {deleted:,} rows in {total:.1f}s ({deleted / total:,.0f} rows/s), {len(batches)} statements")
    print(f"statement ms: p50 {pct(batches, .5):.1f}  p99 {pct(batches, .99):.1f}  max {pct(batches, 1):.1f}")
    for what in ("publish", "claim"):
        print(f"{what} ms: quiet p50 {pct(quiet[what], .5):.2f} p99 {pct(quiet[what], .99):.2f} | during prune "
              f"p50 {pct(during[what], .5):.2f} p99 {pct(during[what], .99):.2f} max {pct(during[what], 1):.2f}"
              f" ({len(during[what])} ops)")
    db.close()
    return 0 if deleted >= args.rows else 1


if __name__ == "__main__":
    sys.exit(main())
