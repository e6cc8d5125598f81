"""Remote-control cost: `inspect ping` latency, and what idle workers leave in the tables.

One command (`make bench-control`), on this machine:

* ping: two idle ``celery worker`` processes (Celery's defaults: mingle, gossip,
  heartbeats) per broker; ``app.control.ping(limit=2)`` timed from the call until
  both replies are in, 50 times after 3 warm-ups (ms, p50 and p95); pgbroker,
  Redis and RabbitMQ in the same run (kombu's SQLAlchemy transport has no fanout:
  remote control does not work there at all);
* idle traffic (pgbroker only): four idle workers for ``--minutes`` (10 by
  default), with a ``ping`` broadcast every 10 s and an ``events`` monitor that
  is killed half way through (its queue must be swept); every 30 s the rows and
  on-disk size of pgbroker's tables are sampled. Bounded means the last sample
  is no larger than the ones before it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import BROKERS, PG, log, wait  # noqa: E402  the benchmark's brokers and helpers

TABLES = ["jobs", "queues", "bindings", "exchanges", "consumers"]


class Workers:
    """Idle ``celery worker`` processes on one broker (default monitoring settings)."""

    def __init__(self, broker: str, count: int):
        url, options, _ = BROKERS[broker]
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-control-{broker}-"))
        self.env = {**os.environ, "BENCH_BROKER_URL": url, "BENCH_TRANSPORT_OPTIONS": json.dumps(options),
                    "BENCH_COUNT_FILE": str(self.tmp / "count"), "BENCH_LATENCY_FILE": str(self.tmp / "latency"),
                    "BENCH_READY_FILE": str(self.tmp / "ready"), "BENCH_RESULT_BACKEND": ""}
        self.procs = []
        for i in range(count):
            ready = self.tmp / f"ready{i}"
            env = {**self.env, "BENCH_READY_FILE": str(ready)}
            cmd = [sys.executable, "-m", "celery", "-A", "benchapp", "worker", "-P", "prefork", "-c", "1",
                   "-l", "warning", "-n", f"c{i}-{uuid.uuid4().hex[:4]}@%h"]
            self.procs.append(subprocess.Popen(cmd, cwd=HERE, env=env, start_new_session=True,
                                               stdout=open(self.tmp / f"worker{i}.log", "ab"),
                                               stderr=subprocess.STDOUT))
            wait(lambda: ready.exists(), 120, f"{broker} worker {i} ready")

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def app_for(broker: str):
    from celery import Celery

    url, options, _ = BROKERS[broker]
    app = Celery("bench-control", broker=url)
    app.conf.broker_transport_options = options
    return app


def ping_latency(broker: str, rounds: int = 50) -> dict:
    workers = Workers(broker, 2)
    app = app_for(broker)
    try:
        for _ in range(3):
            app.control.ping(timeout=5.0, limit=2)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            replies = app.control.ping(timeout=5.0, limit=2)
            times.append((time.perf_counter() - started) * 1000)
            if len(replies) != 2:
                raise RuntimeError(f"{broker}: {len(replies)} of 2 workers answered: {replies}")
        times.sort()
        return {"p50": statistics.median(times), "p95": times[int(len(times) * 0.95) - 1]}
    finally:
        app.close()
        workers.stop()


def table_sizes(conn) -> dict:
    out = {}
    for t in TABLES:
        rows = conn.execute(f"SELECT count(*) FROM bench.{t}").fetchone()[0]
        size = conn.execute("SELECT pg_total_relation_size(%s)", (f"bench.{t}",)).fetchone()[0]
        out[t] = (rows, size)
    return out


def idle_traffic(minutes: float) -> list[tuple[float, dict]]:
    import psycopg

    with psycopg.connect(f"postgresql://{PG}/pgbroker_bench", autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS bench CASCADE")
    workers = Workers("pgbroker", 4)
    app = app_for("pgbroker")
    monitor = subprocess.Popen([sys.executable, "-m", "celery", "-A", "benchapp", "events", "--dump"], cwd=HERE,
                               env=workers.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    samples = []
    started = time.monotonic()
    next_sample = next_ping = started
    try:
        with psycopg.connect(f"postgresql://{PG}/pgbroker_bench", autocommit=True) as conn:
            while time.monotonic() - started < minutes * 60:
                now = time.monotonic()
                if monitor is not None and now - started > minutes * 30:
                    os.killpg(monitor.pid, signal.SIGKILL)  # a crashed monitor
                    monitor.wait()
                    monitor = None
                if now >= next_ping:
                    app.control.ping(timeout=1.0, limit=4)
                    next_ping = now + 10
                if now >= next_sample:
                    samples.append((now - started, table_sizes(conn)))
                    log(f"  {samples[-1][0]:5.0f}s", {t: v[0] for t, v in samples[-1][1].items()})
                    next_sample = now + 30
                time.sleep(1)
            samples.append((time.monotonic() - started, table_sizes(conn)))
    finally:
        if monitor is not None:
            os.killpg(monitor.pid, signal.SIGKILL)
        app.close()
        workers.stop()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--brokers", default="pgbroker,redis,rabbitmq")
    args = parser.parse_args()
    pings = {}
    for broker in args.brokers.split(","):
        log(f"ping: {broker}")
        pings[broker] = ping_latency(broker)
    print("| inspect ping, 2 idle workers (ms) | " + " | ".join(pings) + " |")
    print("|---|" + "---|" * len(pings))
    for key in ("p50", "p95"):
        print(f"| {key} | " + " | ".join(f"{v[key]:.1f}" for v in pings.values()) + " |")
    if args.minutes > 0:
        log(f"idle traffic: 4 workers, {args.minutes} min")
        samples = idle_traffic(args.minutes)
        print("\n| pgbroker tables, 4 idle workers (rows / kB) | " + " | ".join(TABLES) + " |")
        print("|---|" + "---|" * len(TABLES))
        for at, sizes in samples[:: max(1, len(samples) // 6)] + [samples[-1]]:
            print(f"| after {at / 60:.1f} min | " + " | ".join(f"{r} / {s // 1024}" for r, s in sizes.values()) + " |")


if __name__ == "__main__":
    main()
