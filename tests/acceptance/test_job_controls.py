"""Queue controls, cancel, per-call options and the telemetry contract, with real
`celery worker` (and `celery beat`) processes."""
from __future__ import annotations

import json
from collections import Counter

import pytest

import pgbroker.jobs as jobs
from pgbroker import telemetry
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance


def states(sql, ids):
    return {r["task_id"]: r["state"] for r in sql("SELECT task_id, state FROM {schema}.jobs WHERE task_id = ANY(%s)",
                                                   list(ids))}


def wait_all(sql, ids, state="completed", timeout=60):
    wait_for(lambda: set(states(sql, ids).values()) == {state} and len(states(sql, ids)) == len(ids), timeout,
             what=f"{len(ids)} jobs to be {state}")


def test_concurrency_and_rate_limits_hold_across_three_workers(celery_app, start_worker, sql):
    m = celery_app
    jobs.limit(m.app, "limited", concurrency=2)
    jobs.limit(m.app, "rated", rate="3/s")
    busy = [m.busy.apply_async((f"b{i}", 0.3), queue="limited").id for i in range(10)]
    rated = [m.record.apply_async((f"r{i}",), queue="rated").id for i in range(9)]
    for n in range(3):
        start_worker(pool="threads", concurrency=4, queues="limited,rated", name=f"w{n}")
    wait_all(sql, busy + rated)
    # Concurrency: never more than 2 busy tasks at once, whichever worker ran them.
    marks = sql("SELECT what, at FROM {schema}.effects WHERE key LIKE 'b%%' ORDER BY at, what = 'start'")
    running = peak = 0
    for mark in marks:
        running += 1 if mark["what"] == "start" else -1
        peak = max(peak, running)
    assert peak == 2
    # Rate: at most 3 claims per one-second window (the windows the claim counts in).
    windows = Counter(r["w"] for r in sql(
        "SELECT floor(extract(epoch FROM attempted_at))::bigint AS w FROM {schema}.jobs WHERE queue = 'rated'"))
    assert max(windows.values()) <= 3 and len(windows) >= 3


def test_a_paused_queue_stays_paused_across_worker_restarts(celery_app, start_worker, sql):
    m = celery_app
    jobs.pause(m.app, "pausable")
    held = [m.record.apply_async((f"held{i}",), queue="pausable").id for i in range(3)]
    for round_ in range(2):
        worker = start_worker(queues="pausable,celery", name=f"w{round_}")
        marker = m.record.delay(f"marker{round_}")  # the worker is claiming: it ran this
        wait_all(sql, [marker.id])
        assert set(states(sql, held).values()) == {"available"}
        worker.stop()
    start_worker(queues="pausable,celery", name="w-last")
    jobs.resume(m.app, "pausable")
    wait_all(sql, held)


def test_cancel_by_metadata_revokes_running_jobs_and_counts(celery_app, start_worker, sql):
    m = celery_app
    start_worker(concurrency=2)
    running = [m.gated.apply_async((f"g{i}",), meta={"batch": 1}).id for i in range(2)]
    wait_for(lambda: len(sql("SELECT 1 FROM {schema}.effects WHERE what = 'started'")) == 2, 30,
             what="both gated tasks to start")
    later = [m.record.apply_async((f"later{i}",), meta={"batch": 1}, countdown=3600).id for i in range(3)]
    kept = m.record.apply_async(("kept",), meta={"batch": 2}, countdown=3600).id
    done = jobs.cancel(m.app, meta={"batch": 1})
    assert (done.cancelled, done.revoked) == (3, 2)
    wait_all(sql, running, "cancelled")
    assert set(states(sql, later).values()) == {"cancelled"} and states(sql, [kept]) == {kept: "scheduled"}
    assert not sql("SELECT 1 FROM {schema}.effects WHERE what = 'done'")  # terminated, never finished


def test_per_call_max_attempts_and_backoff_in_a_worker(celery_app, start_worker, sql):
    m = celery_app
    start_worker()
    r = m.retries_forever.apply_async(("k",), max_attempts=3, retry_backoff=1, retry_jitter=False)
    wait_all(sql, [r.id], "discarded")
    job = jobs.get(m.app, r.id)
    assert (job.attempt, job.max_attempts) == (3, 3)  # not the task's max_retries=10
    assert [e["error"].split(" (")[0] for e in job.errors] == [
        "RuntimeError: attempt 1 failed", "RuntimeError: attempt 2 failed", "RuntimeError: attempt 3 failed"]
    times = [r["at"] for r in sql("SELECT at FROM {schema}.effects WHERE key = 'k' ORDER BY id")]
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0  # Celery's exponential backoff: 1 s, then 2 s


def test_every_catalogued_event_fires_with_its_keys(worker_env, celery_app, start_worker, start_beat, sql, tmp_path):
    log = tmp_path / "telemetry.jsonl"
    overrides = {"TELEMETRY_LOG": str(log), "PRUNE_INTERVAL": "1", "RESULT_BACKEND": worker_env["BROKER_URL"],
                 "BEAT_SCHEDULE": json.dumps({"tick": {"task": "tests.apps.celeryapp.periodic", "schedule": 1.0,
                                                       "args": ["tick"]}})}
    m = celery_app
    here = []
    leave = telemetry.subscribe(lambda *event: here.append(event))
    try:
        start_worker(overrides=overrides)
        start_beat(overrides=overrides)
        ids = [m.record.delay("ok").id, m.fails_twice.delay("retry").id, m.snoozes_twice.delay("snooze").id]
        failed = m.boom.delay("fail").id
        unknown = m.app.send_task("tests.no_such_task", ("x",)).id
        wait_all(sql, ids)
        wait_all(sql, [failed, unknown], "discarded")
        jobs.cancel(m.app, task_ids=[m.record.apply_async(("never",), countdown=3600).id])

        def seen():
            lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            events = lines + [{"name": n, "measurements": dict(me), "metadata": dict(md)} for n, me, md in here]
            return events if {e["name"] for e in events} >= set(telemetry.EVENTS) else None

        events = wait_for(seen, 30, what="every catalogued event")
    finally:
        leave()
    for event in events:
        spec = telemetry.EVENTS[event["name"]]
        assert (tuple(event["measurements"]), tuple(event["metadata"])) == (spec.measurements, spec.metadata), event
    by_name = {}
    for event in events:
        by_name.setdefault(event["name"], []).append(event)
    completed = [e for e in by_name["job.completed"] if e["metadata"]["task_id"] == ids[0]][0]
    assert completed["metadata"]["queue"] == "celery" and completed["measurements"]["duration"] >= 0
    assert any(e["metadata"]["task_id"] == failed and "Boom" in e["metadata"]["error"] for e in by_name["job.failed"])
    assert any(e["metadata"]["task_id"] == unknown and "unknown task" in e["metadata"]["reason"]
               for e in by_name["job.discarded"])
    assert len([e for e in by_name["job.retried"] if e["metadata"]["task_id"] == ids[1]]) == 2
    assert by_name["beat.fired"][0]["metadata"]["entry"] == "tick"
