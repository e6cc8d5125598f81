"""`make demo`: a real Celery worker on pgbroker, tasks moving through their job states.

With PGBROKER_URL unset it starts an embedded PostgreSQL (pgserver) in
.pgbroker-embedded/. It runs `celery worker` on examples/shop.py, enqueues plain,
countdown, retrying and failing tasks plus one for an unknown task, and two
published inside a database transaction (one committed, one rolled back), shows
their job rows live in a table, runs a chord and a ``delay().get()`` through the
Postgres result backend, asks the worker over remote control (ping, the schedule)
and revokes a scheduled task for good. Two `celery beat -S pgbroker` processes run
beside it: every periodic fire happens once, and an entry added and fired at run
time reaches the worker. The queue is paused and a batch cancelled by its metadata.
Last, examples/storage_app.py runs storage jobs (process, version, cleanup) as
different actors on a second worker. Then it stops them all and exits.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from storage_tasks import QUEUES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
SCHEMA = "pgbroker_demo"
STORAGE_SCHEMA = "pgbroker_demo_storage"
FINAL = {"completed", "discarded", "cancelled"}
COLORS = {"available": "cyan", "scheduled": "blue", "executing": "yellow", "retryable": "magenta",
          "completed": "green", "discarded": "red", "cancelled": "grey50"}
console = Console(width=None if sys.stdout.isatty() else 120)


EMBEDDED_DIR = ROOT / ".pgbroker-embedded" / "demo"


def database_url() -> str | None:
    """$PGBROKER_URL, or None: then the demo runs on an embedded PostgreSQL."""
    return os.environ.get("PGBROKER_URL")


def table(rows, labels) -> Table:
    t = Table(title="pgbroker jobs (live from Postgres)", expand=False)
    for col in ("what", "task", "state", "attempt", "scheduled in", "last error"):
        t.add_column(col)
    now = time.time()
    for r in rows:
        due = r["scheduled_at"].timestamp() - now
        err = r["errors"][-1]["error"] if r["errors"] else ""
        t.add_row(labels.get(r["task_id"], "?"), r["task"], f"[{COLORS[r['state']]}]{r['state']}[/]",
                  str(r["attempt"]), f"{due:.1f}s" if due > 0 and r["state"] != "completed" else "",
                  err[:60])
    return t


def main() -> int:
    url = database_url()
    if url is None:
        from pgbroker import embedded

        console.print("[dim]PGBROKER_URL not set: starting an embedded PostgreSQL in .pgbroker-embedded/demo[/]")
        try:
            return run(embedded.start(EMBEDDED_DIR))
        finally:
            embedded.stop(EMBEDDED_DIR)
    return run(url)


def run(url: str) -> int:
    conninfo = "postgresql://" + url.split("://", 1)[1]
    broker = "pgbroker://" + url.split("://", 1)[1]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        conn.execute(f"DROP SCHEMA IF EXISTS {STORAGE_SCHEMA} CASCADE")
    storage_root = tempfile.mkdtemp(prefix="pgbroker-demo-storage-")
    env = {**os.environ, "BROKER_URL": broker, "PGBROKER_SCHEMA": SCHEMA,
           "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
    # storage_app: its tables and its jobs in a schema of their own (its workers answer no shop control)
    storage_env = {**env, "DATABASE_URL": conninfo, "PGBROKER_SCHEMA": STORAGE_SCHEMA,
                   "STORAGE_SCHEMA": STORAGE_SCHEMA, "STORAGE_ROOT": storage_root}
    os.environ.update(BROKER_URL=broker, PGBROKER_SCHEMA=SCHEMA)

    import shop  # the plain Celery app

    console.print(f"[bold]broker[/]: {shop.app.connection_for_write().as_uri()}  schema {SCHEMA}")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "shop", "worker", "-P", "threads", "-c", "2", "-l", "warning",
         "-n", "demo@%h"],
        cwd=HERE, env=env, start_new_session=True,
    )
    storage_worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "storage_app", "worker", "-P", "threads", "-c", "4", "-l", "warning",
         "-n", "storage@%h", "-Q", ",".join(QUEUES)],
        cwd=HERE, env=storage_env, start_new_session=True,
    )
    beats = [subprocess.Popen([sys.executable, "-m", "celery", "-A", "shop", "beat", "-S", "pgbroker", "-l", "warning",
                               "--pidfile", ""], cwd=HERE, env=env, start_new_session=True) for _ in range(2)]
    try:
        labels = {
            shop.add.delay(2, 3).id: "plain task",
            shop.slow.delay(2).id: "slow task (2 s)",
            shop.add.apply_async((4, 5), countdown=4).id: "countdown=4",
            shop.charge.delay("order-17").id: "flaky: 2 retries, then ok",
            shop.import_feed.delay("http://feeds.example/rss").id: "retries exhausted",
            shop.app.send_task("shop.no_such_task").id: "unknown task",
        }
        committed, rolled_back = in_transaction(shop, conninfo)
        labels[committed] = "in a committed txn"
        with psycopg.connect(conninfo, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
            deadline = time.monotonic() + 90
            with Live(console=console, refresh_per_second=8) as live:
                while True:
                    rows = conn.execute(f"SELECT * FROM {SCHEMA}.jobs WHERE task_id = ANY(%s) ORDER BY id",
                                        (list(labels),)).fetchall()
                    live.update(table(rows, labels))
                    if len(rows) == len(labels) and all(r["state"] in FINAL for r in rows):
                        break
                    if worker.poll() is not None or time.monotonic() > deadline:
                        console.print("[red]the demo did not finish in time[/]")
                        return 1
                    time.sleep(0.2)
        console.print("[green]all jobs reached a final state.[/] Each row is one Celery task id, "
                      "across its retries; `errors` holds every failed attempt.")
        with psycopg.connect(conninfo, autocommit=True) as conn:
            left = conn.execute(f"SELECT count(*) FROM {SCHEMA}.jobs WHERE task_id = %s", (rolled_back,)).fetchone()[0]
        console.print(f"[bold]rolled back[/]: the task published in the rolled-back transaction left {left} job rows.")
        show_results(shop, conninfo)
        show_remote_control(shop, conninfo)
        show_beat(shop, conninfo)
        show_job_admin(shop)
        show_storage(storage_env)
        from pgbroker.maintenance import shutdown

        shutdown(shop.app.backend.db)  # before the embedded server stops
        return 0
    finally:
        for proc in (worker, storage_worker, *beats):
            proc.send_signal(signal.SIGTERM)
        for proc in (worker, storage_worker, *beats):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def in_transaction(shop, conninfo: str) -> tuple[str, str]:
    """Publish with pgbroker.atomic(): the job belongs to the transaction of the order row."""
    import pgbroker

    with psycopg.connect(conninfo) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.demo_orders (id serial PRIMARY KEY, item text)")
        conn.commit()
        order = conn.execute(f"INSERT INTO {SCHEMA}.demo_orders (item) VALUES ('tea') RETURNING id").fetchone()[0]
        with pgbroker.atomic(conn):
            committed = shop.charge.delay(f"order-{order}", fail_times=0).id
        conn.commit()
        conn.execute(f"INSERT INTO {SCHEMA}.demo_orders (item) VALUES ('cake')")
        with pgbroker.atomic(conn):
            rolled_back = shop.charge.delay("order-never", fail_times=0).id
        conn.rollback()
    return committed, rolled_back


def show_results(shop, conninfo: str) -> None:
    """Results in Postgres: a chord completed by a database counter, and get() woken by NOTIFY."""
    started = time.perf_counter()
    cents = shop.checkout(["tea", "cake", "scone"]).get(timeout=30)
    console.print(f"[bold]chord[/] checkout(tea, cake, scone) -> {cents} cents "
                  f"({(time.perf_counter() - started) * 1000:.0f} ms, 3 header tasks + the body)")
    started = time.perf_counter()
    value = shop.add.delay(20, 22).get(timeout=10)
    console.print(f"[bold]add.delay(20, 22).get()[/] -> {value} in {(time.perf_counter() - started) * 1000:.1f} ms")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute(f"SELECT name, state, count(*) FROM {SCHEMA}.results WHERE task_id IS NOT NULL "
                            "GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    t = Table(title="pgbroker results (live from Postgres)")
    for col in ("task", "state", "results"):
        t.add_column(col)
    for name, state, n in rows:
        t.add_row(name or "?", state, str(n))
    console.print(t)


def show_remote_control(shop, conninfo: str) -> None:
    """celery inspect/control over Postgres, and a revoke that outlives every worker."""
    started = time.perf_counter()
    replies = shop.app.control.ping(timeout=2.0, limit=1)
    console.print(f"[bold]control.ping()[/] -> {replies} in {(time.perf_counter() - started) * 1000:.0f} ms")
    later = shop.add.apply_async((1, 1), countdown=600)
    scheduled = shop.app.control.inspect(timeout=1.0).scheduled() or {}
    ids = [e["request"]["id"] for entries in scheduled.values() for e in entries]
    console.print(f"[bold]inspect().scheduled()[/] lists the countdown task waiting in Postgres: {later.id in ids}")
    later.revoke()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        state, by = conn.execute(f"SELECT state, cancelled_by FROM {SCHEMA}.jobs WHERE task_id = %s",
                                 (later.id,)).fetchone()
    console.print(f"[bold]revoke()[/] -> job [{COLORS[state]}]{state}[/] by {by!r}; result state {later.state}: "
                  "it will never run, even if every worker restarts.")


def show_beat(shop, conninfo: str) -> None:
    """Two beats, one schedule in Postgres: each fire once; an entry added and run at run time."""
    from pgbroker.beat import BeatEntries, cron

    entries = BeatEntries.of(shop.app)
    entries.add("report", "shop.add", cron("0 7 * * mon-fri", tz="Europe/Paris"), args=[40, 2])
    entries.run_now("report")
    query = (f"SELECT e.name, count(f.*) AS fires, count(DISTINCT j.meta->>'fire_at') AS jobs, "
             f"count(*) FILTER (WHERE j.state = 'completed') AS completed, e.next_fire_at "
             f"FROM {SCHEMA}.beat_entries e JOIN {SCHEMA}.beat_fires f ON f.entry = e.name "
             f"LEFT JOIN {SCHEMA}.jobs j ON j.task_id = f.task_id "
             f"WHERE e.name IN ('roll-dice', 'report') GROUP BY e.name, e.next_fire_at ORDER BY e.name")
    deadline = time.monotonic() + 30
    with psycopg.connect(conninfo, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        while True:
            rows = conn.execute(query).fetchall()
            done = {r["name"]: r for r in rows if r["completed"] == r["fires"] > 0}
            if ("report" in done and done.get("roll-dice", {}).get("fires", 0) >= 2) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    t = Table(title="celery beat -S pgbroker (two beat processes)")
    for column in ("entry", "fires", "jobs", "completed", "next fire"):
        t.add_column(column)
    for r in rows:
        t.add_row(r["name"], str(r["fires"]), str(r["jobs"]), str(r["completed"]), f"{r['next_fire_at']:%Y-%m-%d %H:%M:%S}")
    console.print(t)
    console.print("Each fire is one row in beat_fires and one job: two beats, no duplicate.")


def show_job_admin(shop) -> None:
    """Queue controls and the job API: pause the queue, look at it, cancel a batch by its metadata."""
    import pgbroker.jobs as jobs

    jobs.pause(shop.app, "celery")
    batch = [shop.add.apply_async((i, i), meta={"batch": "demo"}) for i in range(3)]
    t = Table(title="pgbroker queues (the celery queue paused)")
    for column in ("queue", "available", "scheduled", "executing", "completed", "discarded", "cancelled", "paused"):
        t.add_column(column)
    for q in jobs.queues(shop.app):
        t.add_row(q["queue"], *(str(q[k]) for k in ("available", "scheduled", "executing", "completed", "discarded",
                                                    "cancelled")), "yes" if q["paused"] else "")
    console.print(t)
    done = jobs.cancel(shop.app, meta={"batch": "demo"})
    jobs.resume(shop.app, "celery")
    states = sorted({jobs.get(shop.app, r.id).state.value for r in batch})
    console.print(f"[bold]jobs.cancel(meta={{'batch': 'demo'}})[/] -> {done.cancelled} waiting jobs cancelled "
                  f"{states}; queue resumed: add.delay(1, 2) -> {shop.add.delay(1, 2).get(timeout=30)}")


def show_storage(env: dict) -> None:
    """storage_tasks: resources created and versioned by different actors, run by a worker as those actors."""
    console.print("[bold]storage_tasks[/] (examples/storage_app.py run):")
    out = subprocess.run([sys.executable, "storage_app.py", "run"], cwd=HERE, env=env, capture_output=True,
                         text=True, timeout=120)
    console.print(out.stdout.rstrip())
    if out.returncode != 0:
        raise SystemExit(f"storage_app.py failed:\n{out.stderr}")


if __name__ == "__main__":
    sys.exit(main())
