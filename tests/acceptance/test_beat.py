"""Real `celery beat -S pgbroker` processes: every fire exactly once with several beats
and one SIGKILLed, fires that outlive a worker restart, triggers over an application
table, and the `pgbroker beat` command line."""
from __future__ import annotations

import json
import subprocess
from datetime import datetime, timedelta

import pytest

from tests.helpers import run_pgbroker, wait_for

pytestmark = pytest.mark.acceptance

PERIODIC = "tests.apps.celeryapp.periodic"


def schedule_env(**entries) -> dict:
    return {"BEAT_SCHEDULE": json.dumps(entries)}


def count(sql, query, *params) -> int:
    return sql(f"SELECT count(*) AS n FROM {query}", *params)[0]["n"]


def test_three_beats_fire_every_second_exactly_once_with_one_killed(start_beat, sql):
    env = schedule_env(each_second={"task": PERIODIC, "schedule": 1.0, "args": ["s"], "missed": "all",
                                    "options": {"queue": "beat-only"}})
    beats = [start_beat(name=f"b{i}", overrides=env) for i in range(3)]
    fired = lambda: count(sql, "{schema}.beat_fires WHERE entry = 'each_second'")  # noqa: E731
    wait_for(lambda: fired() >= 30, timeout=90, what="30 fires")
    beats[0].kill()  # mid-run, between any two statements
    wait_for(lambda: fired() >= 65, timeout=90, what="65 fires")
    for b in beats[1:]:
        b.stop()
    rows = sql("SELECT meta->>'fire_at' AS fire_at FROM {schema}.jobs WHERE meta->>'beat_entry' = 'each_second'")
    times = sorted(datetime.fromisoformat(r["fire_at"]) for r in rows)
    assert len(times) == len(set(times)) == fired() >= 65  # one job per fire, none twice
    assert all(b - a == timedelta(seconds=1) for a, b in zip(times, times[1:]))  # and none skipped


def test_periodic_jobs_outlive_a_worker_restart(start_beat, start_worker, sql):
    env = schedule_env(durable={"task": PERIODIC, "schedule": 1.0, "args": ["d"], "missed": "all"})
    beat = start_beat(overrides=env)
    worker = start_worker(pool="threads", name="w1")
    wait_for(lambda: count(sql, "{schema}.effects WHERE key = 'periodic-d'") >= 2, what="runs with a worker")
    worker.stop()
    waiting = lambda: count(sql, "{schema}.jobs WHERE state = 'available' AND meta->>'beat_entry' = 'durable'")  # noqa: E731
    wait_for(lambda: waiting() >= 3, what="fires while no worker runs")
    beat.stop()
    fires = count(sql, "{schema}.beat_fires WHERE entry = 'durable'")
    start_worker(pool="threads", name="w2")
    wait_for(lambda: count(sql, "{schema}.effects WHERE key = 'periodic-d'") == fires, what="every fire run")
    # the outcome is written just after the task's own effect: wait for it too
    wait_for(lambda: count(sql, "{schema}.jobs WHERE meta->>'beat_entry' = 'durable' AND state = 'completed'")
             == fires, what="every fire's job completed")


@pytest.fixture
def items(sql):
    sql("CREATE TABLE {schema}.items (id int PRIMARY KEY, state text NOT NULL DEFAULT 'new', "
        "fail boolean NOT NULL DEFAULT false)")

    def add(n):
        sql("INSERT INTO {schema}.items (id) SELECT g FROM generate_series(1, %s) AS g", n)
    return add


def test_a_trigger_over_ten_thousand_rows_with_two_beats_enqueues_each_row_once(start_beat, items, sql):
    items(10_000)
    env = {"TEST_TRIGGERS": "1", "TRIGGER_EVERY": "1.0", "TRIGGER_PAGE": "500"}
    start_beat(name="b1", overrides=env)
    start_beat(name="b2", overrides=env)
    done_fires = lambda: count(sql, "{schema}.beat_fires WHERE entry = 'process_items' AND done")  # noqa: E731
    wait_for(lambda: done_fires() >= 3, timeout=120, what="three finished trigger scans")
    jobs = sql("SELECT count(*) AS n, count(DISTINCT unique_key) AS keys, count(DISTINCT meta->>'row') AS rows "
               "FROM {schema}.jobs WHERE task = 'tests.apps.celeryapp.process_item'")[0]
    assert jobs == {"n": 10_000, "keys": 10_000, "rows": 10_000}  # later fires add nothing while incomplete
    assert count(sql, "{schema}.jobs WHERE queue = 'items'") == 10_000
    first = sql("SELECT enqueued FROM {schema}.beat_fires WHERE entry = 'process_items' ORDER BY fire_at LIMIT 1")
    assert first[0]["enqueued"] == 10_000


def test_trigger_jobs_recheck_their_row_retry_and_report_the_final_failure(start_beat, start_worker, items, sql):
    items(5)
    sql("UPDATE {schema}.items SET fail = true WHERE id = 3")
    beat = start_beat(overrides={"TEST_TRIGGERS": "1"})
    wait_for(lambda: count(sql, "{schema}.jobs WHERE queue = 'items'") == 5, what="five trigger jobs")
    beat.stop()
    sql("UPDATE {schema}.items SET state = 'archived' WHERE id = 5")  # no longer matches before it runs
    start_worker(pool="threads", queues="items,celery", overrides={"TEST_TRIGGERS": "1"})
    wait_for(lambda: count(sql, "{schema}.effects WHERE what LIKE 'on_error%%'") == 1, what="on_error")
    wait_for(lambda: count(sql, "{schema}.jobs WHERE queue = 'items' AND state IN ('completed', 'discarded')") == 5,
             what="every trigger job finished")
    effects = sql("SELECT key, what FROM {schema}.effects ORDER BY id")
    assert sorted(e["key"] for e in effects if e["what"] == "ran") == ["item-1", "item-2", "item-4"]
    assert [e["what"] for e in effects if e["key"] == "item-3"][:2] == ["attempt", "attempt"]  # max_attempts=2
    assert any(e["key"] == "item-3" and "Boom" in e["what"] for e in effects)
    assert not any(e["key"] == "item-5" for e in effects)
    states = {r["id"]: r["state"] for r in sql("SELECT id, state FROM {schema}.items")}
    assert states == {1: "done", 2: "done", 3: "new", 4: "done", 5: "archived"}


def test_trigger_once_never_enqueues_a_row_twice(start_beat, start_worker, items, sql):
    items(3)
    env = {"TEST_TRIGGERS": "1", "TRIGGER_ONCE": "1"}
    start_worker(pool="threads", queues="items,celery", overrides=env)
    start_beat(overrides=env)
    wait_for(lambda: count(sql, "{schema}.items WHERE state = 'done'") == 3, what="three rows processed")
    sql("UPDATE {schema}.items SET state = 'new' WHERE id = 2")  # matches again
    fires = count(sql, "{schema}.beat_fires WHERE entry = 'process_items'")
    wait_for(lambda: count(sql, "{schema}.beat_fires WHERE entry = 'process_items' AND done") >= fires + 2,
             what="two more trigger fires")
    assert count(sql, "{schema}.jobs WHERE meta->>'row' = '2'") == 1
    assert count(sql, "{schema}.trigger_rows WHERE trigger = 'process_items'") == 3


def pgbroker_cli(database_url, schema, *args) -> subprocess.CompletedProcess:
    return run_pgbroker(database_url, schema, "beat", *args)


def test_the_command_line_edits_what_a_running_beat_fires(start_beat, database_url, schema, sql):
    start_beat()
    added = pgbroker_cli(database_url, schema, "add", "cli-entry", PERIODIC, "--every", "3600",
                         "--args", '["cli"]', "--queue", "cli-q")
    assert added.returncode == 0, added.stderr
    listing = pgbroker_cli(database_url, schema, "ls")
    assert "cli-entry" in listing.stdout and "every 1:00:00" in listing.stdout
    assert pgbroker_cli(database_url, schema, "run-now", "cli-entry").returncode == 0
    wait_for(lambda: count(sql, "{schema}.jobs WHERE queue = 'cli-q'") == 1, what="the run-now fire")
    assert pgbroker_cli(database_url, schema, "disable", "cli-entry").returncode == 0
    entries = json.loads(pgbroker_cli(database_url, schema, "ls", "--json").stdout)
    assert [(e["enabled"], e["fires"]) for e in entries if e["name"] == "cli-entry"] == [(False, 1)]
    refused = pgbroker_cli(database_url, schema, "add", "broken", PERIODIC, "--cron", "0 25 * * *")
    assert refused.returncode == 1 and "invalid cron expression '0 25 * * *'" in refused.stderr
    assert pgbroker_cli(database_url, schema, "rm", "cli-entry").returncode == 0
    missing = pgbroker_cli(database_url, schema, "rm", "cli-entry")
    assert missing.returncode == 1 and "no beat entry named 'cli-entry'" in missing.stderr


def test_a_beat_refuses_to_start_on_an_invalid_schedule(worker_env):
    from tests.helpers import Beat

    beat = Beat(worker_env, overrides=schedule_env(bad={"task": PERIODIC, "schedule": {"cron": "0 25 * * *"}}))
    try:
        assert beat.proc.wait(60) != 0
        assert "invalid cron expression '0 25 * * *'" in beat.output()
    finally:
        beat.stop()
