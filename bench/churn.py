"""Claim latency under sustained churn: does the claim slow down as jobs pass through?

One command (`make bench-churn`): a jobs table holding ``--rows`` finished jobs (the
retained history), then one thread publishes a message, claims it and completes it,
in a loop, for ``--minutes``. Every claimed job leaves a dead entry at the front of
its queue in the claim index, which every later claim walks over until VACUUM
removes it; this reports the claim latency per window, the dead tuples Postgres
counts, and the (auto)vacuums of the jobs table, so the two stay visibly tied.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from prune import fresh_engine, seed_finished, traffic  # noqa: E402
from run import PG  # noqa: E402


SCHEMA = "churn_bench"
BODY = "x" * 1200  # about a Celery message's size (headers, properties, body)


def stats(conn) -> dict:
    row = conn.execute(
        "SELECT n_dead_tup, autovacuum_count + vacuum_count, pg_relation_size(%s::regclass) / 8192 "
        "FROM pg_stat_user_tables WHERE relid = %s::regclass",
        (f"{SCHEMA}.jobs_claim_idx", f"{SCHEMA}.jobs")).fetchone()
    return {"dead": row[0], "vacuums": row[1], "claim_idx_pages": row[2]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--window", type=float, default=15.0, help="seconds per reported line")
    args = parser.parse_args()
    url = f"postgresql://{PG}/pgbroker_bench"
    engine = fresh_engine(url, SCHEMA)
    with psycopg.connect(url, autocommit=True) as conn:
        seed_finished(conn, SCHEMA, args.rows, body=BODY)
        options = conn.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                               (f"{SCHEMA}.jobs",)).fetchone()[0]
        print(f"jobs table options {options}")
        out = {"publish": [], "claim": []}
        stop = threading.Event()
        worker = threading.Thread(target=traffic, args=(engine, stop, out))
        start = time.monotonic()
        worker.start()
        print("| after | jobs since start | claim p50 ms | claim p99 ms | dead tuples | claim index pages | vacuums |")
        print("|---|---|---|---|---|---|---|")
        seen, base = 0, stats(conn)["vacuums"]
        try:
            while time.monotonic() - start < args.minutes * 60:
                time.sleep(args.window)  # a benchmark's reporting window, not test synchronisation
                claims = out["claim"][seen:]
                seen += len(claims)
                s = stats(conn)
                q = statistics.quantiles(claims, n=100) if len(claims) > 1 else [0] * 99
                print(f"| {time.monotonic() - start:.0f} s | {seen:,} | {q[49] * 1000:.2f} | {q[98] * 1000:.2f} | "
                      f"{s['dead']:,} | {s['claim_idx_pages']:,} | {s['vacuums'] - base} |", flush=True)
        finally:
            stop.set()
            worker.join()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    engine.db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
