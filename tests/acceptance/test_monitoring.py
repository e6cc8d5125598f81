"""Remote control and monitoring against real `celery worker` processes: `celery inspect`,
`celery control`, `celery status`, `celery events --dump`, Flower, and durable revoke.

Workers run with Celery's defaults for monitoring (mingle, gossip, heartbeats) and
task events, on different queues.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import pytest

from tests.helpers import ROOT, wait_for

HOST = socket.gethostname()
W1, W2 = f"w1@{HOST}", f"w2@{HOST}"
APP = "tests.apps.celeryapp"


@pytest.fixture
def celery_cli(worker_env):
    """Run the `celery` program against the tests' app; returns its stdout."""

    def run(*args: str, timeout: float = 60, check: bool = True) -> str:
        done = subprocess.run([sys.executable, "-m", "celery", "-A", APP, *args], cwd=ROOT,
                              env={**os.environ, **worker_env}, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0 or not check, f"celery {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def inspect(*args: str) -> dict:
        return json.loads(run("inspect", *args, "--json").strip().splitlines()[-1])

    run.inspect = inspect
    return run


@pytest.fixture
def two_workers(start_worker):
    """w1 on the default queue (prefork, 2 processes), w2 on `other` (1 process)."""
    w1 = start_worker(name="w1", concurrency=2, monitoring=True)
    w2 = start_worker(name="w2", concurrency=1, queues="other", monitoring=True)
    return w1, w2


def effects(sql, what=None):
    rows = sql("SELECT key, what FROM {schema}.effects ORDER BY id")
    return [r["key"] for r in rows if what is None or r["what"] == what]


def open_gate(sql):
    sql("INSERT INTO {schema}.gates VALUES (true)")


def test_inspect_commands_answer_from_both_workers(two_workers, celery_app, celery_cli, sql, worker_env):
    w1, w2 = two_workers
    assert "sync with" in w2.output() or "mingle: sync" in w2.output()  # mingle found w1
    assert celery_cli.inspect("ping") == {W1: {"ok": "pong"}, W2: {"ok": "pong"}}
    assert "2 nodes online" in celery_cli("status")

    running = [celery_app.gated.delay(f"g{i}") for i in range(3)]  # 2 run on w1, 1 waits there
    wait_for(lambda: len(effects(sql, "started")) == 2, what="two gated tasks to start")
    ids = {r.id for r in running}
    active = celery_cli.inspect("active")
    active_ids = {t["id"] for t in active[W1]}
    assert len(active_ids) == 2 and active_ids <= ids and active[W2] == []
    reserved = celery_cli.inspect("reserved")
    assert [t["id"] for t in reserved[W1]] == list(ids - active_ids) and reserved[W2] == []
    one = sorted(active_ids)[0]
    queried = celery_cli.inspect("query_task", one)
    assert queried[W1][one][0] == "active" and queried[W2] == {}
    assert celery_cli.inspect("scheduled") == {W1: [], W2: []}
    later = celery_app.add.apply_async((1, 2), countdown=600)  # waits in Postgres, listed by w1
    listed = celery_cli.inspect("scheduled")
    assert listed[W2] == [] and [e["request"]["id"] for e in listed[W1]] == [later.id]
    assert datetime.fromisoformat(listed[W1][0]["eta"]) > datetime.now(timezone.utc) + timedelta(seconds=500)
    assert listed[W1][0]["request"]["args"] == [1, 2]

    stats = celery_cli.inspect("stats")
    assert stats[W1]["pool"]["max-concurrency"] == 2 and stats[W2]["pool"]["max-concurrency"] == 1
    assert stats[W1]["broker"]["transport"] == "pgbroker"
    password = urlsplit(worker_env["BROKER_URL"]).password
    assert password and f":{password}@" not in json.dumps(stats) and ":**@" in stats[W1]["broker"]["hostname"]
    registered = celery_cli.inspect("registered")
    assert f"{APP}.add" in registered[W1] and f"{APP}.add" in registered[W2]
    queues = celery_cli.inspect("active_queues")
    assert [q["name"] for q in queues[W1]] == ["celery"] and [q["name"] for q in queues[W2]] == ["other"]
    conf = celery_cli.inspect("conf")
    assert conf[W1]["broker_url"].startswith("pgbroker://") and "********" in conf[W1]["broker_url"]
    open_gate(sql)
    wait_for(lambda: len(effects(sql, "done")) == 3, what="the gated tasks to finish")


def test_scheduled_tasks_are_listed_once_across_workers_of_a_queue(start_worker, celery_app, celery_cli):
    start_worker(name="w1", concurrency=1, monitoring=True)
    start_worker(name="w2", concurrency=1, monitoring=True)
    waiting = {celery_app.add.apply_async((i, i), countdown=600).id for i in range(8)}
    listed = celery_cli.inspect("scheduled")
    ids = [e["request"]["id"] for entries in listed.values() for e in entries]
    assert sorted(ids) == sorted(waiting)
    assert all(listed[w] for w in (W1, W2))  # shared between the two workers


def test_control_commands_change_running_workers(two_workers, celery_app, celery_cli, sql):
    w1, w2 = two_workers
    assert "new rate limit set successfully" in celery_cli("control", "rate_limit", f"{APP}.add", "10/m")
    assert "time limits set successfully" in celery_cli("control", "time_limit", f"{APP}.gated", "5", "10")

    assert "add consumer extra-q" in celery_cli("control", "add_consumer", "extra-q", "-d", W2)
    celery_app.record.apply_async(("via-extra",), queue="extra-q")
    wait_for(lambda: effects(sql) == ["via-extra"], what="the task sent to the added queue")
    assert "extra-q" in [q["name"] for q in celery_cli.inspect("active_queues", "-d", W2)[W2]]
    assert "no longer consuming from extra-q" in celery_cli("control", "cancel_consumer", "extra-q", "-d", W2)
    assert "extra-q" not in [q["name"] for q in celery_cli.inspect("active_queues", "-d", W2)[W2]]

    assert "pool will grow" in celery_cli("control", "pool_grow", "1", "-d", W1)
    wait_for(lambda: len(celery_cli.inspect("stats", "-d", W1)[W1]["pool"]["processes"]) == 3,
             what="the pool to grow")
    assert "pool will shrink" in celery_cli("control", "pool_shrink", "1", "-d", W1)
    wait_for(lambda: len(celery_cli.inspect("stats", "-d", W1)[W1]["pool"]["processes"]) == 2,
             what="the pool to shrink")

    # A worker does not reply to `shutdown` (with any broker); it logs it and stops.
    celery_cli("control", "shutdown", "-d", W2, check=False)
    wait_for(lambda: w2.proc.poll() is not None, what="w2 to shut down")
    assert "Got shutdown from remote" in w2.output()
    assert celery_cli.inspect("ping") == {W1: {"ok": "pong"}}


def test_revoke_is_durable_and_terminate_reaches_the_running_task(start_worker, celery_app, celery_cli, sql):
    worker = start_worker(name="w1", concurrency=2, monitoring=True)
    later = celery_app.record.apply_async(("revoked-eta",), countdown=2)
    celery_cli("control", "revoke", later.id)
    job = sql("SELECT state::text, cancelled_at, cancelled_by FROM {schema}.jobs WHERE task_id = %s", later.id)[0]
    assert job["state"] == "cancelled" and job["cancelled_at"] is not None
    assert "revoke" in job["cancelled_by"] and HOST in job["cancelled_by"]

    running = celery_app.gated.delay("to-terminate")
    wait_for(lambda: effects(sql, "started") == ["to-terminate"], what="the task to start")
    celery_cli("control", "terminate", "SIGTERM", running.id)
    wait_for(lambda: sql("SELECT state::text, cancelled_by FROM {schema}.jobs WHERE task_id = %s AND state = "
                         "'cancelled'", running.id), what="the terminated task's job to be cancelled")
    assert "terminate" in sql("SELECT cancelled_by FROM {schema}.jobs WHERE task_id = %s", running.id)[0][
        "cancelled_by"]

    # Every worker restarts (Celery forgets its in-memory revokes): the task still never runs.
    worker.stop()
    start_worker(name="w1b", concurrency=1, monitoring=True)
    marker = celery_app.record.apply_async(("after",), countdown=3)
    wait_for(lambda: "after" in effects(sql), what="a task due after the revoked one")
    assert "revoked-eta" not in effects(sql)
    assert sql("SELECT state::text FROM {schema}.jobs WHERE task_id = %s", later.id)[0]["state"] == "cancelled"
    assert marker.id != later.id


def test_a_solo_worker_drops_a_task_revoked_after_it_claimed_it(start_worker, celery_app, sql):
    """A solo worker runs tasks inside the transport's delivery loop: a revoke that
    arrives while one runs must be read before the rest of the claim is handed over."""
    blocker = celery_app.gated.delay("blocker")
    queued = [celery_app.record.delay(f"queued-{i}") for i in range(2)]
    start_worker(name="w1", pool="solo", monitoring=True)  # claims all three at once (prefetch 4)
    wait_for(lambda: effects(sql, "started") == ["blocker"], what="the first task to start")
    claimed = sql("SELECT state::text FROM {schema}.jobs WHERE task_id = ANY(%s)", [r.id for r in queued])
    assert [j["state"] for j in claimed] == ["executing", "executing"]
    celery_app.app.control.revoke(queued[1].id)  # a busy solo worker cannot reply: broadcast only
    celery_app.record.delay("marker")  # claimed after the three, so it runs after them
    open_gate(sql)
    wait_for(lambda: "marker" in effects(sql), what="the tasks after the blocker to run")
    assert effects(sql) == ["blocker", "blocker", "queued-0", "marker"]  # started, finished, …


def test_events_dump_sees_heartbeats_and_task_events_and_its_queue_expires(start_worker, celery_app, worker_env,
                                                                           sql, tmp_path):
    start_worker(name="w1", monitoring=True)
    log = open(tmp_path / "events.log", "wb")
    env = {**os.environ, **worker_env, "EVENT_QUEUE_EXPIRES": "2"}
    dump = subprocess.Popen([sys.executable, "-m", "celery", "-A", APP, "events", "--dump"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = lambda: (tmp_path / "events.log").read_text(errors="replace")  # noqa: E731
        # Events are transient: the monitor sees those sent once its queue is bound.
        monitor_queues = wait_for(lambda: sql("SELECT unnest(queues) AS name FROM {schema}.consumers "
                                              "WHERE pid = %s", dump.pid), what="the monitor's queue")
        assert [q["name"].startswith("celeryev.") for q in monitor_queues] == [True]
        result = celery_app.add.delay(2, 3)
        wait_for(lambda: f"task succeeded: {APP}.add({result.id})" in out(), what="the task events")
        assert f"task received: {APP}.add({result.id})" in out()
        wait_for(lambda: f"w1@{HOST}" in out() and "heartbeat" in out(), what="a worker heartbeat")
    finally:
        os.killpg(dump.pid, signal.SIGKILL)  # a crashed monitor: nothing cleans up after it
        dump.wait(10)
        log.close()
    # Its queue, binding and the events that kept coming are swept once it expires.
    names = [q["name"] for q in monitor_queues]
    wait_for(lambda: not sql("SELECT 1 FROM {schema}.queues WHERE name = ANY(%s)", names)
             and not sql("SELECT 1 FROM {schema}.jobs WHERE queue = ANY(%s)", names)
             and not sql("SELECT 1 FROM {schema}.bindings WHERE queue = ANY(%s)", names),
             timeout=40, what="the dead monitor's queue to be swept")


def test_flower_lists_workers_and_follows_task_states(start_worker, celery_app, worker_env, sql, tmp_path):
    pytest.importorskip("flower")
    start_worker(name="w1", monitoring=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "flower.log", "wb")
    env = {**os.environ, **worker_env, "FLOWER_UNAUTHENTICATED_API": "true"}
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", APP, "flower", f"--port={port}",
                               "--address=127.0.0.1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)

    def api(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/{path}", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    try:
        wait_for(lambda: f"w1@{HOST}" in (api("workers") or {}), timeout=60, what="Flower to list the worker")
        task = celery_app.gated.delay("watched")
        state = lambda: ((api("tasks") or {}).get(task.id) or {}).get("state")  # noqa: E731
        wait_for(lambda: state() == "STARTED", timeout=30, what="Flower to show the task started")
        open_gate(sql)
        wait_for(lambda: state() == "SUCCESS", timeout=30, what="Flower to show the task succeeded")
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(10)
        log.close()


def test_a_crashed_workers_remote_control_queue_is_swept(start_worker, celery_app, celery_cli, sql):
    crashed = start_worker(name="w1", monitoring=True)
    start_worker(name="w2", queues="other", monitoring=True)  # a live process runs the sweep
    pidbox = f"{W1}.celery.pidbox"
    assert sql("SELECT 1 FROM {schema}.queues WHERE name = %s", pidbox)
    crashed.kill()  # SIGKILL: nothing cleans up after it
    # Its consumer row dies after rescue_after, then the queue after control_queue_expires.
    wait_for(lambda: not sql("SELECT 1 FROM {schema}.queues WHERE name = %s", pidbox)
             and not sql("SELECT 1 FROM {schema}.bindings WHERE queue = %s", pidbox),
             timeout=40, what="the dead worker's pidbox queue to be swept")
    assert celery_cli.inspect("ping") == {W2: {"ok": "pong"}}
    # Broadcasts now reach only live workers' queues: nothing piles up for the dead one.
    celery_cli.inspect("ping")
    assert not sql("SELECT 1 FROM {schema}.jobs WHERE queue = %s", pidbox)
