"""Real `celery worker` processes (prefork and threads) against the pgbroker transport.

Task code is plain Celery (tests/apps/celeryapp.py); only the broker URL points at
Postgres. Each test reads the job rows to check they tell what really happened.
"""
from __future__ import annotations

import os
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance


def rows_by_task_id(sql, ids):
    return {r["task_id"]: r for r in sql("SELECT * FROM {schema}.jobs WHERE task_id = ANY(%s)", list(ids))}


def effects(sql, key=None, what=None):
    rows = sql("SELECT key, what FROM {schema}.effects ORDER BY id")
    return [r for r in rows if (key is None or r["key"] == key) and (what is None or r["what"] == what)]


def wait_states(sql, ids, states=("completed",), timeout=60):
    def done():
        rows = rows_by_task_id(sql, ids)
        return rows if len(rows) == len(ids) and all(r["state"] in states for r in rows.values()) else None

    return wait_for(done, timeout, what=f"jobs {ids} to reach {states}")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_tasks_countdown_eta_routing_and_rows(celery_app, start_worker, sql, pool):
    m = celery_app
    now = datetime.now(timezone.utc)
    plain = m.record.delay("plain")
    countdown = m.record.apply_async(("countdown",), countdown=1.5)
    eta = m.record.apply_async(("eta",), eta=now + timedelta(seconds=1.5))
    routed = m.routed.delay("routed")  # task_routes -> routed-q, created on the fly
    prio = m.record.apply_async(("prio",), priority=7)
    explicit = m.record.apply_async(("explicit",), queue="routed-q")

    rows = rows_by_task_id(sql, [countdown.id, eta.id])
    assert {r["state"] for r in rows.values()} == {"scheduled"}  # stored, not in any worker
    assert rows_by_task_id(sql, [prio.id])[prio.id]["priority"] == 7
    assert rows_by_task_id(sql, [routed.id])[routed.id]["queue"] == "routed-q"

    start_worker(pool=pool, queues="celery,routed-q")
    ids = [plain.id, countdown.id, eta.id, routed.id, prio.id, explicit.id]
    rows = wait_states(sql, ids)
    for r in rows.values():
        assert r["attempt"] == 1 and r["errors"] == [] and r["completed_at"] is not None
    for tid in (countdown.id, eta.id):  # never delivered before due
        assert rows[tid]["attempted_at"] >= rows[tid]["scheduled_at"]
    assert sorted(e["key"] for e in effects(sql)) == ["countdown", "eta", "explicit", "plain", "prio", "routed"]


def test_short_delays_are_on_time_with_long_intervals(celery_app, start_worker, sql):
    """A countdown, retry or snooze shorter than the consumers' polling and heartbeat
    intervals is not late: a job scheduled for later wakes the stager of the processes
    consuming its queue when it would sleep past the job's time."""
    start_worker(pool="threads", overrides={"PGBROKER_POLLING_INTERVAL": "30", "PGBROKER_HEARTBEAT_INTERVAL": "30"})
    late = []
    for i in range(3):
        job = celery_app.record.apply_async((f"soon{i}",), countdown=0.3)
        row = wait_states(sql, [job.id], timeout=40)[job.id]
        late.append((row["attempted_at"] - row["scheduled_at"]).total_seconds())
    assert max(late) < 2.0, late  # without the wake-up: up to 30 s each
    # two retries after 0.2 s, two snoozes of 0.2 s (published, resp. rescheduled, by the worker)
    ids = [celery_app.fails_twice.delay("r").id, celery_app.snoozes_twice.delay("s").id]
    wait_states(sql, ids, timeout=120)
    for key in "rs":
        at = [r["at"] for r in sql("SELECT at FROM {schema}.effects WHERE key = %s ORDER BY id", key)]
        assert (at[-1] - at[0]).total_seconds() < 4.0, at  # without: 30 s or more


def test_expired_job_is_cancelled_not_run(celery_app, start_worker, sql):
    """The worker sees an expired job only to revoke it (so Celery records REVOKED); it never runs."""
    job = celery_app.record.apply_async(("late",), expires=0.5)
    wait_for(lambda: sql("SELECT now() > expires_at AS past FROM {schema}.jobs")[0]["past"], 10, what="expiry")
    start_worker(pool="threads")
    row = wait_states(sql, [job.id], ("cancelled",))[job.id]
    assert "expired" in row["errors"][-1]["error"] and row["cancelled_at"] is not None
    assert effects(sql, "late") == []


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_retries_keep_one_row_with_every_error(celery_app, start_worker, sql, pool):
    m = celery_app
    exhausted = m.always_fails.delay("x")   # autoretry_for + retry_backoff, max_retries=2
    recovers = m.fails_twice.delay("y")     # self.retry(countdown=...) twice, then succeeds
    start_worker(pool=pool)
    rows = wait_states(sql, [exhausted.id], ("discarded",))
    row = rows[exhausted.id]
    assert row["attempt"] == 3
    assert [e["attempt"] for e in row["errors"]] == [1, 2, 3]
    assert all("boom x" in e["error"] for e in row["errors"])
    assert "Traceback" in row["errors"][-1]["traceback"]
    row = wait_states(sql, [recovers.id])[recovers.id]
    assert row["attempt"] == 3 and [e["attempt"] for e in row["errors"]] == [1, 2]
    assert "transient 0" in row["errors"][0]["error"] and "transient 1" in row["errors"][1]["error"]
    assert len(effects(sql, "x", "attempt")) == 3 and len(effects(sql, "y", "done")) == 1
    assert len(sql("SELECT 1 FROM {schema}.jobs")) == 2  # one row per task id across retries


def test_unknown_task_and_undecodable_body_are_discarded(celery_app, start_worker, sql, connection):
    unknown = celery_app.app.send_task("no.such.task", args=(1,))
    # A well-formed Celery message whose JSON body cannot be decoded.
    from kombu import Exchange, Queue

    queue = Queue("celery", Exchange("celery"), "celery")
    bad_id = "undecodable-1"
    connection.Producer().publish(
        b"{not json", exchange=queue.exchange, routing_key="celery", declare=[queue],
        content_type="application/json", content_encoding="utf-8",
        headers={"task": "tests.apps.celeryapp.record", "id": bad_id, "lang": "py", "retries": 0,
                 "argsrepr": "", "kwargsrepr": "", "origin": "test"},
    )
    after = celery_app.record.delay("after")
    start_worker(pool="prefork")
    rows = wait_states(sql, [unknown.id, bad_id], ("discarded",))
    assert "unknown task" in rows[unknown.id]["errors"][-1]["error"]
    assert "no.such.task" in rows[unknown.id]["errors"][-1]["error"]
    assert rows[bad_id]["errors"], rows[bad_id]
    wait_states(sql, [after.id])  # the worker carried on


def test_sigkill_mid_batch_of_acks_late_tasks(celery_app, start_worker, sql):
    """Kill -9 a worker holding running and prefetched acks_late tasks: every task
    completes once; finished ones never run again; lost ones show the rescue."""
    m = celery_app
    finished = [m.record.delay(f"early{i}") for i in range(3)]
    wait_ids = [r.id for r in finished]
    first = start_worker(pool="prefork", concurrency=2, name="victim")
    wait_states(sql, wait_ids)  # outcomes are durable before the crash

    gated = [m.gated.delay(f"g{i}") for i in range(8)]
    gated_ids = [r.id for r in gated]
    wait_for(lambda: len(effects(sql, what="started")) == 2, 30, what="two gated tasks running")
    # In Celery's synchronous loop a prefork worker holds the running tasks plus those
    # it has claimed but cannot hand to a busy pool yet.
    executing = lambda: {r["task_id"] for r in sql("SELECT task_id FROM {schema}.jobs WHERE state = 'executing'")}
    wait_for(lambda: len(executing()) >= 3, 30, what="running + prefetched jobs claimed")
    first.kill()
    lost = executing()

    sql("INSERT INTO {schema}.gates VALUES (true)")
    start_worker(pool="prefork", concurrency=2, name="rescuer")
    rows = wait_states(sql, gated_ids, timeout=90)
    for tid, r in rows.items():
        if tid in lost:
            assert r["attempt"] == 2 and r["redelivered"], r
            assert "delivery lost" in r["errors"][-1]["error"]
        else:
            assert r["attempt"] == 1 and not r["redelivered"], r
    for i in range(8):
        assert len(effects(sql, f"g{i}", "done")) == 1
    for i in range(3):
        assert len(effects(sql, f"early{i}")) == 1  # completed before the crash: not run again
    assert all(r["attempt"] == 1 for r in rows_by_task_id(sql, wait_ids).values())


def test_live_worker_keeps_long_running_jobs(celery_app, start_worker, sql):
    """Jobs held longer than rescue_after by a live worker are never rescued."""
    m = celery_app
    jobs = [m.gated.delay(f"long{i}") for i in range(4)]
    start_worker(pool="threads", concurrency=2)
    wait_for(lambda: len(effects(sql, what="started")) == 2, 30, what="two gated tasks running")
    t0 = sql("SELECT now() AS t")[0]["t"]
    # Let several heartbeat and rescue rounds pass (rescue_after is 2 s in the test app).
    wait_for(lambda: sql("SELECT min(heartbeat_at) AS h FROM {schema}.consumers")[0]["h"] > t0 + timedelta(seconds=5),
             30, what="5 s of heartbeats")
    rows = rows_by_task_id(sql, [j.id for j in jobs])
    assert all(r["state"] == "executing" and r["attempt"] == 1 and not r["redelivered"] for r in rows.values())
    sql("INSERT INTO {schema}.gates VALUES (true)")
    rows = wait_states(sql, [j.id for j in jobs])
    assert all(r["attempt"] == 1 for r in rows.values())


def test_processes_added_to_the_pool_take_waiting_tasks_at_once(celery_app, start_worker, sql):
    """pool_grow (as --autoscale does): the new process starts a prefetched task while
    the first one still runs, instead of after it."""
    m = celery_app
    jobs = [m.gated.delay(f"grow{i}") for i in range(2)]
    start_worker(pool="prefork", concurrency=1)
    wait_for(lambda: len(effects(sql, what="started")) == 1, 30, what="one task running")
    assert m.app.control.pool_grow(1, reply=True, timeout=10)
    wait_for(lambda: len(effects(sql, what="started")) == 2, 30, what="the second task on the new process")
    sql("INSERT INTO {schema}.gates VALUES (true)")
    wait_states(sql, [j.id for j in jobs])


def test_row_is_executing_while_task_runs(celery_app, start_worker, sql):
    job = celery_app.gated.delay("watch")
    start_worker(pool="prefork", concurrency=1)
    wait_for(lambda: effects(sql, "watch", "started"), 30, what="task started")
    assert rows_by_task_id(sql, [job.id])[job.id]["state"] == "executing"
    sql("INSERT INTO {schema}.gates VALUES (true)")
    assert wait_states(sql, [job.id])[job.id]["completed_at"] is not None


def test_worker_survives_database_connections_dropped(celery_app, start_worker, sql):
    """Every server connection is terminated (as in a restart): the worker reconnects
    unaided and loses nothing."""
    m = celery_app
    start_worker(pool="threads")
    before = m.record.delay("before")
    wait_states(sql, [before.id])
    sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    after = [m.record.delay(f"after{i}") for i in range(5)]
    wait_states(sql, [a.id for a in after], timeout=90)
    assert sorted(e["key"] for e in effects(sql) if e["key"].startswith("after")) == [f"after{i}" for i in range(5)]


def test_threads_worker_runs_no_task_twice_after_a_lost_connection(celery_app, start_worker, sql):
    """Early-acknowledged tasks: requests prefetched behind busy threads are not
    acknowledged yet; when the connection
    is lost their jobs go back to the queue, so the worker must drop them too (they
    wait in pgbroker's gate, not in the pool's executor), or they run twice."""
    m = celery_app
    start_worker(pool="threads", concurrency=2)
    ids = [m.gated_early.delay(f"g{i}").id for i in range(6)]
    wait_for(lambda: len(effects(sql, what="started")) == 2, 30, what="two tasks started")
    wait_for(lambda: sql("SELECT count(*) AS n FROM {schema}.jobs WHERE state = 'executing'")[0]["n"] == 6, 30,
             what="the other four prefetched")
    sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND query NOT LIKE '%%gates%%'")  # the worker's, not the tasks' own
    wait_for(lambda: sql("SELECT count(*) AS n FROM {schema}.jobs WHERE state = 'executing' AND attempt = 2")[0]["n"]
             == 4, 60, what="the four given back and claimed again")
    sql("INSERT INTO {schema}.gates VALUES (true)")
    wait_states(sql, ids, timeout=90)
    started = sorted(e["key"] for e in effects(sql, what="started"))
    assert started == [f"g{i}" for i in range(6)], started


def test_celery_purge(celery_app, sql, worker_env):
    import subprocess
    import sys
    import os

    for i in range(5):
        celery_app.record.delay(f"p{i}")
    celery_app.record.apply_async(("later",), countdown=600)
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.celeryapp", "purge", "-f"],
                         env={**os.environ, **worker_env}, capture_output=True, text=True, timeout=60,
                         cwd=str(__import__("tests.helpers").helpers.ROOT))
    assert out.returncode == 0, out.stderr
    assert "6 messages" in out.stdout, out.stdout
    assert sql("SELECT count(*) AS n FROM {schema}.jobs")[0]["n"] == 0


def test_password_never_shown_by_celery_report(worker_env):
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = {**os.environ, **worker_env, "BROKER_URL": "pgbroker://app:s3cr3t-pw@127.0.0.1:5432/shop"}
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.celeryapp", "report"],
                         env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "pgbroker://app:" in out.stdout and "@127.0.0.1:5432/shop" in out.stdout
    assert "s3cr3t-pw" not in out.stdout + out.stderr


def test_two_workers_share_a_queue_without_duplicates(celery_app, start_worker, sql):
    """Two workers (prefork and threads) claim disjoint batches: every task runs exactly once."""
    jobs = [celery_app.record.delay(f"k{i}") for i in range(300)]
    start_worker(pool="prefork", name="w1")
    start_worker(pool="threads", name="w2")
    rows = wait_states(sql, [j.id for j in jobs], timeout=120)
    assert all(r["attempt"] == 1 for r in rows.values())
    keys = [e["key"] for e in effects(sql)]
    assert sorted(keys) == sorted(f"k{i}" for i in range(300))  # once each
    owners = {r["attempted_by"].split("#")[0] for r in rows.values()}
    assert len(owners) == 2  # both workers took part


def test_warm_shutdown_gives_prefetched_jobs_back(celery_app, start_worker, sql):
    jobs = [celery_app.gated.delay(f"s{i}") for i in range(6)]
    worker = start_worker(pool="threads", concurrency=1)
    wait_for(lambda: effects(sql, what="started"), 30, what="one task running")
    wait_for(lambda: len(sql("SELECT 1 FROM {schema}.jobs WHERE state = 'executing'")) >= 2, 30,
             what="a prefetched job besides the running one")
    worker.proc.send_signal(signal.SIGTERM)  # warm shutdown: finish the running task
    sql("INSERT INTO {schema}.gates VALUES (true)")
    worker.proc.wait(60)
    rows = rows_by_task_id(sql, [j.id for j in jobs])
    started = {e["key"] for e in effects(sql, what="started")}
    for i, j in enumerate(jobs):
        r = rows[j.id]
        if f"s{i}" in started:
            assert r["state"] == "completed"
        else:  # never started: back in the queue at once, not after rescue_after
            assert r["state"] == "available" and r["attempt"] <= 1, r
    assert any(r["redelivered"] and r["state"] == "available" for r in rows.values())


def running_one_of_four(celery_app, start_worker, sql, prefix: str, pool: str):
    """Four gated tasks claimed at once by a one-process worker, the first running."""
    jobs = [celery_app.gated.delay(f"{prefix}{i}") for i in range(4)]
    worker = start_worker(pool=pool, concurrency=1)
    wait_for(lambda: effects(sql, what="started"), 30, what="one task running")
    wait_for(lambda: len(sql("SELECT 1 FROM {schema}.jobs WHERE state = 'executing'")) == 4, 30,
             what="the whole batch claimed")
    return jobs, worker


def test_warm_shutdown_of_a_solo_worker_runs_no_more_of_its_claim(celery_app, start_worker, sql):
    """A solo worker runs each task inside the delivery of its claimed batch: after
    SIGTERM it finishes the running task and gives the rest of the batch back."""
    jobs, worker = running_one_of_four(celery_app, start_worker, sql, "solo", "solo")
    worker.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "Warm shutdown" in worker.output(), 30, what="the shutdown to begin")
    sql("INSERT INTO {schema}.gates VALUES (true)")
    assert worker.proc.wait(60) == 0
    states = [r["state"] for r in rows_by_task_id(sql, [j.id for j in jobs]).values()]
    assert sorted(states) == ["available", "available", "available", "completed"], states
    assert [e["key"] for e in effects(sql, what="started")] == ["solo0"]


def test_cold_shutdown_of_a_busy_prefork_worker_is_clean_and_gives_waiting_jobs_back(celery_app, start_worker, sql):
    """SIGQUIT terminates the pool under a running task while claimed ones wait for a
    free process: they are not handed to the terminated pool but go back to the queue."""
    jobs, worker = running_one_of_four(celery_app, start_worker, sql, "cold", "prefork")
    worker.proc.send_signal(signal.SIGQUIT)
    assert worker.proc.wait(60) == 0
    assert "Traceback" not in worker.output() and "Unrecoverable" not in worker.output(), worker.output()
    started = {e["key"] for e in effects(sql, what="started")}
    rows = rows_by_task_id(sql, [j.id for j in jobs])
    assert len(started) == 1
    assert [rows[j.id]["state"] for i, j in enumerate(jobs) if f"cold{i}" not in started] == ["available"] * 3


def test_hard_time_limits_leave_the_prefork_pool_working(celery_app, start_worker, sql):
    """Time limits on a prefork pool: a task over its hard limit (its process killed and
    replaced) or its soft limit is discarded with the reason, the tasks after it run,
    and the worker still stops. (A killed process could leave the pool's result-queue
    lock held, hanging the next task and the shutdown; that race, rare in this run, is
    pinned down in tests/unit/test_pool_process_exit.py.)"""
    m = celery_app
    jobs = [m.overruns.delay("hard0"), m.softly_overruns.delay("soft")]  # then the process has threads
    jobs += [m.record.delay(f"after{i}") for i in range(3)] + [m.overruns.delay("hard1"), m.record.delay("last")]
    worker = start_worker(pool="prefork", concurrency=1)
    rows = wait_states(sql, [j.id for j in jobs], states=("completed", "discarded"), timeout=60)
    assert sorted(e["key"] for e in effects(sql, what="ran")) == ["after0", "after1", "after2", "last"]
    errors = [rows[j.id]["errors"][-1]["error"] for j in jobs if rows[j.id]["state"] == "discarded"]
    assert len(errors) == 3 and all("TimeLimitExceeded" in e for e in errors), errors
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0


def test_idle_pool_processes_killed_leave_the_prefork_pool_working(celery_app, start_worker, sql):
    """Pool processes SIGKILLed while idle (the OOM killer) are replaced and the next
    task runs; SIGTERM to the whole process group (systemd's default stop) ends the
    worker. An idle pool process used to wait for work holding the lock of the pool's
    task queue, so killing it left the lock held: every later task waited for ever, and
    so did the worker's exit."""
    m = celery_app
    worker = start_worker(pool="prefork", concurrency=2)
    wait_states(sql, [m.record.delay(f"before{i}").id for i in range(4)])  # both processes have waited since
    children = Path(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children").read_text().split()
    assert len(children) == 2
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    wait_states(sql, [m.record.delay("after").id], timeout=30)
    os.killpg(worker.proc.pid, signal.SIGTERM)
    assert worker.proc.wait(30) == 0


def test_a_pool_process_killed_mid_task_frees_its_slot_within_seconds(celery_app, start_worker, sql):
    """The blocking pool marks the task of a dead process lost only after
    worker_lost_wait: pgbroker's workers use 1 s unless the app sets it (Celery's
    default of 10 s kept a -c 1 worker from running anything for 10 s)."""
    m = celery_app
    worker = start_worker(pool="prefork", concurrency=1)
    killed = m.gated.delay("killed")
    wait_for(lambda: effects(sql, what="started"), 30, what="the task to start")
    queued = m.record.delay("behind")
    [child] = Path(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children").read_text().split()
    os.kill(int(child), signal.SIGKILL)
    wait_states(sql, [queued.id], timeout=6)  # 10 s and more before
    assert "WorkerLostError" in worker.output()
    wait_for(lambda: rows_by_task_id(sql, [killed.id])[killed.id]["state"] != "executing", 10,
             what="the lost task's outcome")


def test_sigterm_stops_an_idle_worker_without_waiting_on_listen(start_worker):
    """Celery's blocking loop sees the shutdown flag only after its current wait, then
    runs one more cycle: each could wait up to 2 s on LISTEN (at least 2 s in all). An
    idle threads worker now exits in about 0.2 s."""
    worker = start_worker(pool="threads")
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(30) == 0
    assert time.monotonic() - started < 1.5, worker.output()


def test_a_unique_task_keeps_its_key_through_retries_and_frees_it_when_done(celery_app, start_worker, sql):
    m = celery_app
    first = m.fails_twice.apply_async(("u",), unique={})
    assert m.fails_twice.apply_async(("u",), unique={}).id != first.id  # a duplicate: not stored
    start_worker(pool="threads")
    row = wait_states(sql, [first.id])[first.id]
    assert row["attempt"] == 3 and len(effects(sql, "u", "done")) == 1  # retried twice, one job
    again = m.fails_twice.apply_async(("u",), unique={})  # finished: the key is free again
    wait_states(sql, [again.id])
    assert len(sql("SELECT 1 FROM {schema}.jobs")) == 2


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_snoozed_task_runs_again_later_without_spending_a_retry(celery_app, start_worker, sql, pool):
    snoozer = celery_app.snoozes_twice.delay("z")  # max_retries=0: a real retry would fail it
    start_worker(pool=pool)
    row = wait_states(sql, [snoozer.id])[snoozer.id]
    assert row["attempt"] == 3 and row["errors"] == []
    assert sql("SELECT meta FROM {schema}.jobs WHERE task_id = %s", snoozer.id)[0]["meta"] == {"snoozed": 2}
    assert len(effects(sql, "z", "attempt")) == 3 and len(effects(sql, "z", "done")) == 1


def test_a_snooze_needs_seconds():
    from pgbroker import Snooze
    from pgbroker.errors import InvalidSnooze

    for bad in (-1, "soon", None, float("nan")):
        with pytest.raises(InvalidSnooze, match="number of seconds"):
            Snooze(bad)


def test_the_worker_prunes_finished_jobs_past_their_retention(celery_app, start_worker, sql):
    done = celery_app.record.delay("pruned")
    start_worker(pool="threads", overrides={"PRUNE_INTERVAL": "0.5", "PRUNE_JOBS_AFTER": "0"})
    wait_for(lambda: effects(sql, "pruned", "ran"), what="the task ran")
    wait_for(lambda: not sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", done.id), what="its row pruned")
