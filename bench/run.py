"""Benchmark Celery on pgbroker against Redis, RabbitMQ and kombu's SQLAlchemy transport.

    python bench/run.py [--brokers pgbroker,redis,rabbitmq,sqlalchemy] [--quick] [--url NAME=URL]

Every broker is measured in the same run, one after another, each in a fresh child
interpreter, with the tasks of bench/benchapp.py and real `celery worker` subprocesses
(cwd bench/, -c 2, --without-mingle/gossip/heartbeat). The broker's queue is purged
before every measurement (Redis: also kombu's `unacked` keys).

* enqueue: 200 warm-up, then 3,000 sequential ``noop.delay()`` calls in this process; tasks/s.
* drain (prefork -c 2, threads -c 2): 5,000 ``noop`` queued with no worker running, then a
  worker is started; the clock starts when its ``worker_ready`` file appears and stops when
  the tasks' counter file holds one byte per task; tasks/s = tasks run after the clock
  started / elapsed time.
* pickup latency (threads -c 2, idle): 10 warm-up + 200 samples of ``latency.delay(time.time())``,
  one at a time with 5-20 ms pauses; the task writes time.time() - sent_at. p50/p95/p99
  (nearest rank) in ms.
* worker RSS (prefork -c 2): sum of VmRSS over the worker's process group, idle (3 s after
  ready), then after 20,000 ``noop.apply_async(countdown=3600)``: once the broker reports no
  ready message left in the queue (or 30 s), read when two readings 2 s apart agree within 1%
  (or 60 s). Shared pages are counted once per process, as ps does.

A broker that is unreachable or fails a step shows n/a with the reason in a footnote; the
run goes on. Workers run in their own process group and are stopped by pid (SIGTERM to the
group, SIGKILL after 30 s); the parent kills any group a child left behind. --quick divides
every count by 10. Results go to stdout and bench/last_run.md; progress to stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
PG = "pgbroker:pgbroker@127.0.0.1:5432"
DEFAULT_URLS = {
    "pgbroker": f"pgbroker://{PG}/pgbroker_bench",
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
    "sqlalchemy": f"sqla+postgresql+psycopg://{PG}/pgbroker_bench_sqla",
}
N_WARMUP, N_ENQUEUE, N_DRAIN, N_LAT_WARMUP, N_LATENCY, N_PENDING = 200, 3000, 5000, 10, 200, 20000
CHILD_TIMEOUT = 1800  # seconds for all measurements of one broker


def log(msg):
    print(f"{datetime.now():%H:%M:%S} {msg}", file=sys.stderr, flush=True)


def reason(exc):
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) < 200 else text[:197] + "..."


def wait_for(cond, timeout, what, interval=0.005):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


# -- processes ---------------------------------------------------------------------------------

def group_pids(pgid):
    """Live processes whose process group is pgid (from /proc/<pid>/stat)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def group_rss_mib(pgid):
    kib = 0
    for pid in group_pids(pgid):
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    kib += int(line.split()[1])
        except OSError:
            pass
    return kib / 1024


def kill_group(pgid, sig=signal.SIGKILL):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class Worker:
    """`celery worker` subprocess in its own process group; ready once benchapp's ready file exists."""

    def __init__(self, bench, pool):
        self.bench, self.pool, self.proc = bench, pool, None

    def __enter__(self):
        b = self.bench
        b.ready_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "celery", "-A", "benchapp", "worker", "--pool", self.pool, "-c", "2",
               "-l", "warning", "--without-mingle", "--without-gossip", "--without-heartbeat",
               "-n", f"bench-{uuid.uuid4().hex[:8]}@%h"]
        self.logfile = b.tmp / f"worker-{self.pool}.log"
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=HERE, env=b.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        with open(b.tmp / "worker.pids", "a") as f:  # for the parent's final sweep
            f.write(f"{self.proc.pid}\n")
        try:
            wait_for(lambda: b.ready_file.exists() or self.proc.poll() is not None, 60, "worker ready")
            if self.proc.poll() is not None:
                tail = self.logfile.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                raise RuntimeError(f"worker exited with code {self.proc.returncode}: {tail[0]}")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        kill_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            log(f"  worker {self.proc.pid} still running 30 s after SIGTERM: SIGKILL")
        if group_pids(self.proc.pid):
            kill_group(self.proc.pid)
        self.proc.wait()

    def __exit__(self, *exc):
        self.stop()


# -- measurements (run in a child interpreter, one per broker) --------------------------------

class Bench:
    def __init__(self, name, url, scale, tmp):
        self.name, self.url, self.scale, self.tmp = name, url, scale, Path(tmp)
        self.count_file, self.latency_file, self.ready_file = (self.tmp / f for f in ("count", "latency", "ready"))
        self.env = {**os.environ, "BENCH_BROKER_URL": url, "BENCH_COUNT_FILE": str(self.count_file),
                    "BENCH_LATENCY_FILE": str(self.latency_file), "BENCH_READY_FILE": str(self.ready_file)}
        os.environ.update(self.env)
        sys.path.insert(0, str(HERE))
        import benchapp

        self.app, self.noop, self.latency = benchapp.app, benchapp.noop, benchapp.latency

    def n(self, count):
        return max(1, count // self.scale)

    def check(self):
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=2, interval_start=0.5, interval_step=0.5)

    def purge(self):
        if self.url.startswith("redis"):  # unacked (e.g. countdown) messages of a killed worker
            import redis

            redis.Redis.from_url(self.url).delete("unacked", "unacked_index")
        self.app.control.purge()  # declares the queue again, then empties it
        for f in (self.count_file, self.latency_file, self.ready_file):
            f.unlink(missing_ok=True)

    def done(self):
        try:
            return self.count_file.stat().st_size
        except FileNotFoundError:
            return 0

    def ready_messages(self):
        """Messages the broker still holds ready in the task queue; None if it cannot tell."""
        with self.app.connection_for_write() as conn:
            try:
                return conn.default_channel.queue_declare(self.app.conf.task_default_queue, passive=True).message_count
            except Exception as exc:  # Redis deletes an empty list, so the queue "does not exist"
                return 0 if "NOT_FOUND" in str(exc) or getattr(exc, "code", None) == 404 else None

    def enqueue(self):
        self.purge()
        for _ in range(self.n(N_WARMUP)):
            self.noop.delay()
        n = self.n(N_ENQUEUE)
        t0 = time.perf_counter()
        for _ in range(n):
            self.noop.delay()
        return n / (time.perf_counter() - t0)

    def drain(self, pool):
        self.purge()
        n = self.n(N_DRAIN)
        for _ in range(n):
            self.noop.delay()
        with Worker(self, pool):
            t0, done0 = time.perf_counter(), self.done()
            wait_for(lambda: self.done() >= n, 300, f"{n} tasks done (got {self.done()})")
            elapsed = time.perf_counter() - t0
        log(f"  {done0} tasks had run before the clock started")
        return (n - done0) / elapsed

    def pickup(self):
        self.purge()
        n = self.n(N_LATENCY) + N_LAT_WARMUP
        lines = lambda: self.latency_file.read_bytes().count(b"\n") if self.latency_file.exists() else 0  # noqa: E731
        with Worker(self, "threads"):
            for i in range(n):
                self.latency.delay(time.time())
                wait_for(lambda: lines() > i, 30, f"latency sample {i + 1}", interval=0.001)
                time.sleep(random.uniform(0.005, 0.020))
        samples = sorted(float(x) * 1000 for x in self.latency_file.read_text().split()[N_LAT_WARMUP:])
        return [samples[max(0, math.ceil(q * len(samples)) - 1)] for q in (0.50, 0.95, 0.99)]

    def rss(self):
        self.purge()
        n = self.n(N_PENDING)
        with Worker(self, "prefork") as w:
            time.sleep(3)
            idle = group_rss_mib(w.pid)
            for _ in range(n):
                self.noop.apply_async(countdown=3600)
            deadline = time.monotonic() + 30
            while (left := self.ready_messages()) != 0 and time.monotonic() < deadline:
                time.sleep(0.5)
            deadline, prev = time.monotonic() + 60, group_rss_mib(w.pid)
            while True:
                time.sleep(2)
                loaded = group_rss_mib(w.pid)
                if abs(loaded - prev) <= 0.01 * prev or time.monotonic() > deadline:
                    break
                prev = loaded
        return {"idle": idle, "loaded": loaded, "ready_left": left, "pending": n}


STEPS = [("enqueue", lambda b: b.enqueue()), ("drain_prefork", lambda b: b.drain("prefork")),
         ("drain_threads", lambda b: b.drain("threads")), ("pickup", lambda b: b.pickup()),
         ("rss", lambda b: b.rss())]


def run_child(name, url, scale, tmp):
    """Measure one broker; results are saved to tmp/result.json after every step."""
    res = {"metrics": {}, "errors": {}}
    save = lambda: (Path(tmp) / "result.json").write_text(json.dumps(res))  # noqa: E731
    try:
        bench = Bench(name, url, scale, tmp)
        bench.check()
    except Exception as exc:
        res["unavailable"] = reason(exc)
        log(f"{name}: unavailable: {res['unavailable']}")
        return save()
    for key, step in STEPS:
        log(f"{name}: {key} ...")
        try:
            res["metrics"][key] = step(bench)
            log(f"{name}: {key} = {res['metrics'][key]}")
        except Exception as exc:
            res["errors"][key] = reason(exc)
            log(f"{name}: {key} failed: {res['errors'][key]}")
        save()
    try:
        bench.purge()  # leave no 20,000 countdown tasks behind
    except Exception as exc:
        log(f"{name}: final purge failed: {reason(exc)}")


# -- parent: one child per broker, then the table ----------------------------------------------

def measure(name, url, scale):
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    child = subprocess.Popen([sys.executable, __file__, "--child", name, url, str(scale), str(tmp)],
                             stdout=sys.stderr, stdin=subprocess.DEVNULL)
    try:
        child.wait(CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        log(f"{name}: gave up after {CHILD_TIMEOUT} s")
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        pids = tmp / "worker.pids"
        for pid in map(int, pids.read_text().split() if pids.exists() else []):
            if group_pids(pid):
                log(f"{name}: killing leftover worker process group {pid}")
                kill_group(pid)
    try:
        res = json.loads((tmp / "result.json").read_text())
    except (OSError, ValueError):
        res = {"unavailable": f"harness child exited with code {child.returncode}", "metrics": {}, "errors": {}}
    if child.returncode != 0 and "unavailable" not in res:
        res["errors"].setdefault("_", f"harness child exited with code {child.returncode}")
    if res["errors"] and any(tmp.glob("worker-*.log")):
        log(f"{name}: worker logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def stray_workers():
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"benchapp" in cmd and b"worker" in cmd:
            found.append(int(entry))
    return found


def table(results, names, scale):
    others = [o for o in ("redis", "rabbitmq") if "pgbroker" in names and o in names]
    notes, footnotes = [], {}

    def cell(name, key, pick, spec):
        r = results[name]
        why = r.get("unavailable") or r["errors"].get(key) or r["errors"].get("_")
        if key not in r["metrics"]:
            why = why or "no result"
            mark = footnotes.setdefault(f"{name}: {why}" if "unavailable" in r else f"{name}, {key}: {why}",
                                        len(footnotes) + 1)
            return None, f"n/a[^{mark}]"
        v = pick(r["metrics"][key])
        return v, format(v, spec)

    nth = lambda i: lambda m: m[i]  # noqa: E731
    rows = [  # label, metric key, value from the metric, format, higher is better
        ("enqueue (single `.delay()`), tasks/s", "enqueue", lambda m: m, ".0f", True),
        (f"drain {scale(N_DRAIN):,} no-op, prefork c=2, tasks/s", "drain_prefork", lambda m: m, ".0f", True),
        (f"drain {scale(N_DRAIN):,} no-op, threads c=2, tasks/s", "drain_threads", lambda m: m, ".0f", True),
        ("pickup latency p50, ms", "pickup", nth(0), ".1f", False),
        ("pickup latency p95, ms", "pickup", nth(1), ".1f", False),
        ("pickup latency p99, ms", "pickup", nth(2), ".1f", False),
        ("worker RSS idle, MiB", "rss", lambda m: m["idle"], ".0f", False),
        (f"worker RSS, {scale(N_PENDING):,} countdown tasks pending, MiB", "rss", lambda m: m["loaded"], ".0f", False),
        ("worker RSS loaded ÷ idle", "rss", lambda m: m["loaded"] / m["idle"], ".2f", False),
    ]
    head = ["metric", *names, *(f"pgbroker ÷ {o}" for o in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, pick, spec, higher_better in rows:
        vals = {n: cell(n, key, pick, spec) for n in names}
        ratios = []
        for o in others:
            pg, other = vals["pgbroker"][0], vals[o][0]
            ratios.append("n/a" if not pg or not other else f"{(pg / other if higher_better else other / pg):.2f}×")
        lines.append("| " + " | ".join([label, *(vals[n][1] for n in names), *ratios]) + " |")
    lines.append("")
    if others:
        lines.append("Ratio columns: throughput is pgbroker ÷ other; latency and RSS are other ÷ pgbroker; "
                     "so above 1.00× means pgbroker is better in every row.")
    for n in names:
        m = results[n]["metrics"].get("rss")
        if m and m["ready_left"]:
            left = "an unknown number" if m["ready_left"] is None else f"{m['ready_left']:,}"
            notes.append(f"- {n}: {left} of the {m['pending']:,} countdown tasks were still ready in the broker's "
                         "queue when RSS was read (the worker had not pulled them).")
    if notes:
        lines += ["", *notes]
    if footnotes:
        lines += ["", *(f"[^{i}]: {text}" for text, i in footnotes.items())]
    return "\n".join(lines)


def facts(urls):
    def safe(fn):
        try:
            return fn()
        except Exception as exc:
            return f"n/a ({reason(exc)})"

    def postgres():
        import psycopg

        url = urls.get("pgbroker") or urls["sqlalchemy"]
        with psycopg.connect("postgresql://" + url.split("://", 1)[1].split("?")[0], connect_timeout=5) as conn:
            return conn.execute("SHOW server_version").fetchone()[0]

    def redis_version():
        import redis

        return redis.Redis.from_url(urls["redis"], socket_timeout=5).info("server")["redis_version"]

    def rabbitmq():
        from kombu import Connection

        with Connection(urls["rabbitmq"], connect_timeout=5) as conn:
            conn.connect()
            return conn.connection.server_properties["version"]

    import celery
    import kombu

    cpu = safe(lambda: next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")))
    mem = safe(lambda: next(l.split(":", 1)[1].strip() for l in open("/proc/meminfo") if l.startswith("MemTotal")))
    return [f"nproc: {safe(lambda: subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip())}"
            f" ({cpu}), memory {mem}, {platform.platform()}",
            f"Python {platform.python_version()}, Celery {celery.__version__}, kombu {kombu.__version__}",
            f"PostgreSQL {safe(postgres)}, Redis {safe(redis_version)}, RabbitMQ {safe(rabbitmq)}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", default=",".join(DEFAULT_URLS), help="comma-separated, default: %(default)s")
    parser.add_argument("--quick", action="store_true", help="divide every count by 10 (smoke test)")
    parser.add_argument("--url", action="append", default=[], metavar="NAME=URL",
                        help="broker URL for NAME (also env BENCH_URL_<NAME>); NAME may be new")
    args = parser.parse_args()
    urls = {n: os.environ.get(f"BENCH_URL_{n.upper().replace('-', '_')}", u) for n, u in DEFAULT_URLS.items()}
    for item in args.url:
        n, _, u = item.partition("=")
        urls[n] = u
    names = [n.strip() for n in args.brokers.split(",") if n.strip()]
    if unknown := [n for n in names if n not in urls]:
        parser.error(f"no URL for {', '.join(unknown)} (use --url NAME=URL)")
    scale = 10 if args.quick else 1
    if stray := stray_workers():
        log(f"warning: benchapp workers already running (pids {stray}); they may take tasks from this run")

    started = datetime.now(timezone.utc)
    results = {}
    for name in names:
        log(f"== {name}: {urls[name]}")
        results[name] = measure(name, urls[name], scale)
    if stray := stray_workers():
        log(f"warning: benchapp workers still running after the run: pids {stray}")
    report = table(results, names, lambda n: max(1, n // scale))
    print(report)
    header = [f"# Benchmark run {started:%Y-%m-%d %H:%M} UTC", "",
              f"Command: `{shlex.join([sys.executable, *sys.argv])}` (cwd `{os.getcwd()}`)", "",
              *(f"- {line}" for line in facts(urls)),
              *(f"- {n}: `{urls[n]}`" for n in names), "", "Method: see the docstring of bench/run.py.", ""]
    (HERE / "last_run.md").write_text("\n".join(header) + "\n" + report + "\n")
    log(f"written {HERE / 'last_run.md'}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run finally blocks: stop workers
    if sys.argv[1:2] == ["--child"]:
        run_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
