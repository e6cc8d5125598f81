"""pgbroker benchmark: Celery on pgbroker vs Celery on Redis, RabbitMQ and kombu's SQLAlchemy transport.

One command (`make bench`), every broker in the same run, on this machine:

* enqueue: sequential ``noop.delay()`` calls from one process (tasks/s);
* drain: 5,000 ``noop`` tasks queued first, then a ``celery worker`` (prefork -c 2
  and threads -c 2) is started; the clock runs from the worker's ``worker_ready``
  signal until every task has appended its byte to a counter file (tasks/s);
* pickup latency: an idle worker, one task at a time, send-to-start time (ms);
* round trip: ``echo.delay(i).get()`` with an idle worker and each broker's usual
  result backend (pgbroker's own, Redis, RabbitMQ's ``rpc://``, SQLAlchemy's ``db+``).
  The brokers take turns in blocks of 40 round trips, in rotating order (each with
  its own client process and worker, the others' workers stopped meanwhile), so
  that a slow spell of this shared machine weighs on every broker alike rather than
  on whichever ran then;
* enqueue in app transaction: Django ``transaction.atomic()`` blocks that INSERT an
  order row and publish one task, then commit (transactions/s); pgbroker publishes
  inside the transaction (``pgbroker.atomic``), the others with Celery's
  ``delay_on_commit`` (after the commit, outside it: no atomicity);
* worker RSS (whole process tree, prefork -c 2) idle, then after 20,000 tasks
  with ``countdown=3600`` were published (Redis/RabbitMQ workers hold them in memory).

Redis runs twice too: as usually configured for Celery (no persistence here), and
``redis-durable``, which fsyncs every write (AOF ``appendfsync always``).

pgbroker runs twice: durable publishes (the server's ``synchronous_commit``) and
``synchronous_commit=off`` (a server crash may lose the last few hundred ms of
publishes: Redis's default durability). Its jobs table is emptied before each measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
PG = "pgbroker:pgbroker@127.0.0.1:5432"
# name: (broker URL, transport options, result backend for the round-trip row)
BROKERS = {
    "pgbroker": (f"pgbroker://{PG}/pgbroker_bench", {"schema": "bench"}, f"pgbroker://{PG}/pgbroker_bench"),
    # (its own database: a NOTIFY wakes every listening connection of its database)
    "pgbroker-async": (f"pgbroker://{PG}/pgbroker_bench_async", {"schema": "bench", "synchronous_commit": "off"},
                       f"pgbroker://{PG}/pgbroker_bench_async"),
    "redis": ("redis://127.0.0.1:6379/0", {}, "redis://127.0.0.1:6379/1"),
    # Redis fsyncing every write (AOF, appendfsync always): durable like pgbroker's default
    "redis-durable": ("redis://127.0.0.1:6380/0", {}, "redis://127.0.0.1:6380/1"),
    "rabbitmq": ("amqp://guest:guest@127.0.0.1:5672//", {}, "rpc://"),
    "sqlalchemy": (f"sqla+postgresql+psycopg://{PG}/pgbroker_bench_sqla", {},
                   f"db+postgresql+psycopg://{PG}/pgbroker_bench_sqla"),
}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(0.002)


class Bench:
    def __init__(self, name, url, options, backend, scale):
        self.name, self.url, self.options, self.scale = name, url, options, scale
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.env = {**os.environ, "BENCH_BROKER_URL": url, "BENCH_TRANSPORT_OPTIONS": json.dumps(options),
                    "BENCH_COUNT_FILE": str(self.tmp / "count"), "BENCH_LATENCY_FILE": str(self.tmp / "latency"),
                    "BENCH_READY_FILE": str(self.tmp / "ready"), "BENCH_RESULT_BACKEND": backend}
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("BENCH_")})
        sys.path.insert(0, str(HERE))
        import benchapp

        self.mod = benchapp
        self.mod.app.conf.broker_url = url
        self.mod.app.conf.broker_transport_options = options
        self.mod.app.conf.result_backend = backend
        self.worker = None

    def n(self, count):
        return max(1, count // self.scale)

    def reset(self):
        if self.name.startswith("pgbroker"):
            import psycopg

            with psycopg.connect(self.url.replace("pgbroker://", "postgresql://"), autocommit=True) as conn:
                if conn.execute("SELECT to_regclass('bench.jobs')").fetchone()[0]:
                    conn.execute("TRUNCATE bench.jobs, bench.consumers")
                    conn.execute("VACUUM ANALYZE bench.jobs")
        self.mod.app.control.purge()
        for f in ("count", "latency", "ready"):
            (self.tmp / f).unlink(missing_ok=True)

    def start_worker(self, pool):
        (self.tmp / "ready").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "celery", "-A", "benchapp", "worker", "-P", pool, "-c", "2", "-l", "warning",
               "--without-mingle", "--without-gossip", "--without-heartbeat", "-n", f"b{uuid.uuid4().hex[:6]}@%h"]
        self.worker = subprocess.Popen(cmd, cwd=HERE, env=self.env, start_new_session=True,
                                       stdout=open(self.tmp / "worker.log", "ab"), stderr=subprocess.STDOUT)
        wait(lambda: (self.tmp / "ready").exists() or self.worker.poll() is not None, 120, "worker ready")
        if self.worker.poll() is not None:
            raise RuntimeError(f"worker exited: {(self.tmp / 'worker.log').read_text()[-2000:]}")

    def stop_worker(self):
        if self.worker is None:
            return
        if self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.worker.wait()
        self.worker = None

    def count(self):
        p = self.tmp / "count"
        return p.stat().st_size if p.exists() else 0

    # -- measurements ----------------------------------------------------------------------------

    def enqueue(self):
        self.reset()
        for _ in range(200):
            self.mod.noop.delay()
        n = self.n(3000)
        t = time.perf_counter()
        for _ in range(n):
            self.mod.noop.delay()
        return n / (time.perf_counter() - t)

    def drain(self, pool):
        self.reset()
        n = self.n(5000)
        for _ in range(n):
            self.mod.noop.delay()
        self.start_worker(pool)
        try:
            t = time.perf_counter()
            wait(lambda: self.count() >= n, 300, f"{n} tasks drained")
            return n / (time.perf_counter() - t)
        finally:
            self.stop_worker()

    def pickup(self):
        import random

        self.reset()
        self.start_worker("threads")
        path = self.tmp / "latency"
        try:
            samples = []
            for i in range(self.n(200) + 10):
                self.mod.latency.delay(time.time())
                wait(lambda: path.exists() and path.read_text().count("\n") > i, 30, "latency sample")
                time.sleep(random.uniform(0.005, 0.02))
            samples = [float(x) * 1000 for x in path.read_text().split()][10:]
            q = statistics.quantiles(samples, n=100)
            return q[49], q[94], q[98]
        finally:
            self.stop_worker()

    def serve_roundtrips(self):
        """``echo.delay(i).get()`` with an idle worker: publish, run, store, wake the caller.

        A server for :func:`roundtrips`: starts the worker, warms up, says ``ready``,
        then answers each line ``<n>`` on stdin with the n round-trip times (ms) as a
        JSON list, until stdin closes. Between answers the worker is stopped (SIGSTOP),
        so that only the broker being measured runs; 5 round trips after it resumes
        are not counted."""
        def pause(sig):
            if self.worker is not None:
                os.killpg(self.worker.pid, sig)

        self.reset()
        self.start_worker("threads")
        try:
            for i in range(10):
                self.mod.echo.delay(i).get(timeout=30)
            pause(signal.SIGSTOP)
            print("ready", flush=True)
            for line in sys.stdin:
                pause(signal.SIGCONT)
                samples = []
                for i in range(int(line) + 5):
                    t = time.perf_counter()
                    assert self.mod.echo.delay(i).get(timeout=30) == i
                    samples.append((time.perf_counter() - t) * 1000)
                pause(signal.SIGSTOP)
                print(json.dumps(samples[5:]), flush=True)
        finally:
            pause(signal.SIGCONT)
            self.stop_worker()

    def txn_enqueue(self):
        """App transactions/s: INSERT a row and publish a task in one Django atomic() block."""
        self.reset()
        import django
        from django.conf import settings

        if not settings.configured:
            user, rest = PG.split(":", 1)
            password, hostport = rest.split("@")
            host, port = hostport.split(":")
            settings.configure(USE_TZ=True, DATABASES={"default": {
                "ENGINE": "django.db.backends.postgresql", "USER": user,
                "NAME": self.url.rsplit("/", 1)[1] if self.name.startswith("pgbroker") else "pgbroker_bench",
                "PASSWORD": password, "HOST": host, "PORT": port}})
            django.setup()
        from django.db import connection, transaction

        import pgbroker

        with connection.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS bench_orders (id bigserial PRIMARY KEY, item text)")
            cur.execute("TRUNCATE bench_orders")
        inside = self.name.startswith("pgbroker")

        def one():
            with transaction.atomic():
                with connection.cursor() as cur:
                    cur.execute("INSERT INTO bench_orders (item) VALUES ('tea')")
                if inside:
                    with pgbroker.atomic(connection):
                        self.mod.noop_on_commit.delay()
                else:
                    self.mod.noop_on_commit.delay_on_commit()

        for _ in range(100):
            one()
        n = self.n(2000)
        t = time.perf_counter()
        for _ in range(n):
            one()
        return n / (time.perf_counter() - t)

    def rss(self):
        self.reset()
        self.start_worker("prefork")
        try:
            time.sleep(3)
            idle = tree_rss(self.worker.pid)
            for _ in range(self.n(20000)):
                self.mod.noop.apply_async(countdown=3600)
            deadline = time.monotonic() + 60
            prev = tree_rss(self.worker.pid)
            while time.monotonic() < deadline:
                time.sleep(2)
                cur = tree_rss(self.worker.pid)
                if abs(cur - prev) <= 0.01 * prev:
                    break
                prev = cur
            return idle, tree_rss(self.worker.pid)
        finally:
            self.stop_worker()


def tree_rss(pgid):
    """Resident set of every process in the worker's process group, in MiB."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError):
            continue
    return total / 1024


METRICS = ["enqueue", "txn_enqueue", "drain_prefork", "drain_threads", "pickup", "roundtrip", "rss"]


def run_broker(name, scale, only=METRICS):
    b = Bench(name, *BROKERS[name], scale)
    out = {}
    steps = [("enqueue", b.enqueue), ("txn_enqueue", b.txn_enqueue), ("drain_prefork", lambda: b.drain("prefork")),
             ("drain_threads", lambda: b.drain("threads")), ("pickup", b.pickup),
             ("rss", b.rss)]
    for key, fn in steps:
        if key not in only:
            continue
        log(f"[{name}] {key} …")
        try:
            out[key] = fn()
        except Exception as exc:  # a broken broker shows n/a, the run goes on
            out[key] = None
            out.setdefault("errors", []).append(f"{key}: {exc}")
            b.stop_worker()
        log(f"[{name}] {key}: {out[key]}")
    b.stop_worker()
    return out


def roundtrips(names, scale, blocks=5):
    """p50 and p95 round trip (ms) of each broker, measured in turns (see the module
    docstring): ``blocks`` blocks of 40 round trips each (divided by ``scale``)."""
    servers, samples = {}, {n: [] for n in names}
    try:
        for name in names:
            servers[name] = subprocess.Popen([sys.executable, __file__, "--serve-roundtrips", name, "--scale", "1"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = {n for n, p in servers.items() if p.stdout.readline().strip() == "ready"}
        for block in range(blocks):
            for name in (names[block % len(names):] + names[:block % len(names)]):
                if name not in ready:
                    continue
                try:
                    servers[name].stdin.write(f"{max(1, 40 // scale)}\n")
                    servers[name].stdin.flush()
                    samples[name] += json.loads(servers[name].stdout.readline())
                except (OSError, ValueError) as exc:  # a broken broker shows n/a, the others go on
                    log(f"[{name}] round trips stopped: {exc}")
                    ready.discard(name)
    finally:
        for p in servers.values():
            try:
                p.stdin.close()
                p.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
    out = {}
    for name, xs in samples.items():
        if len(xs) >= 2:
            q = statistics.quantiles(xs, n=100)
            out[name] = (q[49], q[94])
    return out


def fmt(v, spec=".0f"):
    return "n/a" if v is None else format(v, spec)


def table(results, names):
    others = [o for o in ("redis", "redis-durable", "rabbitmq") if o in names]
    cols = names + [f"pgbroker ÷ {o}" for o in others]
    lines = ["| metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]

    def ratio(a, b, higher_better=True):
        if a is None or b is None or not a or not b:
            return "n/a"
        return f"{(a / b) if higher_better else (b / a):.2f}×"

    def row(label, get, spec=".0f", higher_better=True):
        vals = [get(results.get(n, {})) for n in names]
        pg = get(results.get("pgbroker", {}))
        cells = [fmt(v, spec) for v in vals]
        cells += [ratio(pg, get(results.get(o, {})), higher_better) for o in others]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("enqueue, tasks/s", lambda r: r.get("enqueue"))
    row("enqueue in app transaction, txns/s ¹", lambda r: r.get("txn_enqueue"))
    row("drain 5k, prefork c=2, tasks/s", lambda r: r.get("drain_prefork"))
    row("drain 5k, threads c=2, tasks/s", lambda r: r.get("drain_threads"))
    for i, q in enumerate(("p50", "p95", "p99")):
        row(f"pickup latency {q}, ms", lambda r, i=i: r["pickup"][i] if r.get("pickup") else None, ".1f", False)
    row("delay().get() round trip p50, ms", lambda r: r["roundtrip"][0] if r.get("roundtrip") else None, ".1f", False)
    row("delay().get() round trip p95, ms", lambda r: r["roundtrip"][1] if r.get("roundtrip") else None, ".1f", False)
    row("worker RSS idle, MiB", lambda r: r["rss"][0] if r.get("rss") else None, ".0f", False)
    row("worker RSS, 20k countdown pending, MiB", lambda r: r["rss"][1] if r.get("rss") else None, ".0f", False)
    row("RSS pending ÷ idle", lambda r: r["rss"][1] / r["rss"][0] if r.get("rss") else None, ".2f", False)
    lines.append("")
    lines.append("Ratios compare the durable `pgbroker` column: throughput pgbroker/other, latency and "
                 "memory other/pgbroker, so above 1.00× means pgbroker is better.")
    lines.append("")
    lines.append("¹ Django `atomic()`: INSERT a row + publish a task + commit. pgbroker publishes inside "
                 "the transaction (`pgbroker.atomic`); the others use Celery's `delay_on_commit` "
                 "(published after the commit, so not atomic with it).")
    for n in names:
        for err in results.get(n, {}).get("errors", []):
            lines.append(f"- {n}: {err}")
    return "\n".join(lines)


def versions():
    import celery
    import kombu

    def cmd(*args):
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            return "n/a"

    return (f"{os.cpu_count()} cores, Python {platform.python_version()}, Celery {celery.__version__}, "
            f"kombu {kombu.__version__}; {cmd('psql', '--version')}; {cmd('redis-server', '--version')}; "
            f"RabbitMQ {cmd('rabbitmqctl', 'version')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", default=",".join(BROKERS))
    parser.add_argument("--quick", action="store_true", help="divide every count by 10 (smoke test)")
    parser.add_argument("--only", default=",".join(METRICS), help="comma-separated subset of " + ",".join(METRICS))
    args = parser.parse_args()
    names = [n for n in args.brokers.split(",") if n]
    results = {}
    scale = 10 if args.quick else 1
    for name in names:
        results[name] = subprocess_run(name, scale, args.only)
    if "roundtrip" in args.only.split(","):
        log("round trips, all brokers in turns …")
        for name, value in roundtrips(names, scale).items():
            results[name]["roundtrip"] = value
    report = table(results, names)
    partial = args.quick or set(args.only.split(",")) != set(METRICS)
    command = "make bench" if not partial else "python bench/run.py " + " ".join(sys.argv[1:])
    header = (f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, `{command}` "
              f"(brokers: {', '.join(names)}); {versions()}\n\n")
    (HERE / "last_run.md").write_text(header + report + "\n")
    print(header + report)


def subprocess_run(name, scale, only):
    """Each broker in a fresh interpreter, so that no client state carries over."""
    out = subprocess.run([sys.executable, __file__, "--one", name, "--scale", str(scale), "--only", only],
                         stdout=subprocess.PIPE, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"errors": [f"the {name} run crashed (exit {out.returncode})"]}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-roundtrips":
        Bench(sys.argv[2], *BROKERS[sys.argv[2]], int(sys.argv[4])).serve_roundtrips()
    elif len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(run_broker(sys.argv[2], int(sys.argv[4]), sys.argv[6].split(","))))
    else:
        main()
