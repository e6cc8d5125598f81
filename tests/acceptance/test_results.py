"""The Postgres result backend under a real worker (pgbroker as broker and backend)."""
from __future__ import annotations

import time

import pytest
from celery import chain, chord, group

from tests.helpers import TcpProxy, run_pgbroker, wait_for

pytestmark = pytest.mark.acceptance


@pytest.fixture
def results_app_with(worker_env, broker_url, monkeypatch):
    """``results_app_with(NAME=value, …)``: the test app with broker and results in Postgres,
    configured by those environment variables for this process and the workers started
    after; a 30 s fallback poll, so that only NOTIFY makes ``get()`` fast."""
    import importlib

    import tests.apps.celeryapp as module

    made = []

    def make(**env):
        worker_env.update(RESULT_BACKEND=broker_url, RESULT_POLLING_INTERVAL="30", **env)
        for k, v in worker_env.items():
            monkeypatch.setenv(k, v)
        made.append(importlib.reload(module))
        return made[-1]

    yield make
    for m in made:
        m.app.close()


@pytest.fixture
def results_app(results_app_with):
    return results_app_with()


def test_get_wakes_on_notify_and_raises_task_errors(results_app, start_worker, sql):
    m = results_app
    start_worker(pool="threads")
    started = time.monotonic()
    assert m.add.delay(2, 3).get(timeout=20) == 5
    assert time.monotonic() - started < 10  # far below the 30 s fallback poll
    with pytest.raises(Exception, match="kaboom") as err:
        m.boom.delay("kaboom").get(timeout=20)
    assert type(err.value).__name__ == "Boom"
    stored = sql("SELECT key, state FROM {schema}.results ORDER BY key")
    assert {r["state"] for r in stored} == {"SUCCESS", "FAILURE"}


def test_get_on_message_sees_each_state_the_task_stores(results_app, start_worker, sql):
    from tests.helpers import in_thread

    m = results_app
    start_worker(pool="threads")
    result, seen = m.reports_progress.delay("p"), []
    thread, outcome = in_thread(lambda: result.get(timeout=30, on_message=seen.append))
    wait_for(lambda: [s["status"] for s in seen] == ["PROGRESS"], what="the progress state")
    sql("INSERT INTO {schema}.gates VALUES (true)")
    thread.join(30)
    assert outcome == ["p"]
    assert [(s["status"], s["result"]) for s in seen] == [("PROGRESS", {"key": "p"}), ("SUCCESS", "p")]


def test_get_timeout(results_app, start_worker):
    from celery.exceptions import TimeoutError

    start_worker(pool="threads", queues="elsewhere")  # nobody consumes 'celery'
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        results_app.add.delay(1, 1).get(timeout=0.5)
    assert time.monotonic() - started < 5


def test_group_and_chord(results_app, start_worker):
    m = results_app
    start_worker(pool="prefork")
    g = group(m.add.s(i, i) for i in range(20)).apply_async()
    assert g.get(timeout=60) == [2 * i for i in range(20)]
    g.save()
    assert m.app.GroupResult.restore(g.id).id == g.id
    result = chord((m.add.s(i, 1) for i in range(50)), m.tsum.s()).apply_async()
    assert result.get(timeout=60) == sum(range(1, 51))


def test_chord_header_failure_surfaces(results_app, start_worker):
    """As on Redis, get() raises the failed header task's own exception, not a ChordError."""
    m = results_app
    start_worker(pool="threads")
    result = chord([m.add.s(1, 1), m.boom.s("header failed").set(task_id="the-culprit")], m.tsum.s()).apply_async()
    with pytest.raises(m.Boom, match="header failed"):
        result.get(timeout=60)
    # the body's own failure names the failed part, as on Redis
    wait_for(lambda: result.state == "FAILURE", what="the body's failure")
    assert str(result.result) == "Dependency the-culprit raised Boom('header failed')"
    # a group chained after a failing task never runs: its get() raises that failure
    g = (m.add.s(1, 1) | m.boom.si("before the group") | group(m.add.si(1, 1), m.add.si(2, 2))).apply_async()
    with pytest.raises(m.Boom, match="before the group"):
        g.get(timeout=60)


def test_forget(results_app, start_worker, sql):
    m = results_app
    start_worker(pool="threads")
    r = m.add.delay(1, 2)
    assert r.get(timeout=20) == 3
    r.forget()
    assert sql("SELECT 1 FROM {schema}.results WHERE key LIKE %s", f"%{r.id}") == []


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_result_too_large_is_a_clear_failure(results_app, start_worker, sql, pool):
    from pgbroker.errors import ResultTooLarge

    start_worker(pool=pool, concurrency=1)
    result = results_app.big.delay(200_000)  # the test app allows 100,000 bytes
    with pytest.raises(ResultTooLarge, match="max_result_size=100000"):
        result.get(timeout=30)
    assert result.state == "FAILURE"
    # the job ends discarded with the reason, not executing for ever
    job = wait_for(lambda: sql("SELECT state, errors FROM {schema}.jobs WHERE task_id = %s AND state <> 'executing'",
                               result.id), 20, what="the job's outcome")[0]
    assert job["state"] == "discarded" and "max_result_size=100000" in job["errors"][-1]["error"]
    assert results_app.add.delay(1, 2).get(timeout=30) == 3  # the worker carries on


def test_result_row_columns_and_extended_fields(results_app_with, start_worker, sql):
    m = results_app_with(RESULT_EXTENDED="1")
    start_worker(pool="threads", name="ext")
    r = m.add.apply_async((2, 5), queue="celery")
    assert r.get(timeout=20) == 7
    row = sql("SELECT task_id, state, name, worker, queue, retries, date_done FROM {schema}.results "
              "WHERE key = %s", f"celery-task-meta-{r.id}")[0]
    assert row["task_id"] == r.id and row["state"] == "SUCCESS"
    assert row["name"] == "tests.apps.celeryapp.add" and row["worker"].startswith("ext@")
    assert row["queue"] == "celery" and row["retries"] == 0 and row["date_done"] is not None
    fresh = m.app.AsyncResult(r.id)  # read back from the table, not Celery's cache
    assert (fresh.name, fresh.args, fresh.kwargs, fresh.queue) == ("tests.apps.celeryapp.add", [2, 5], {}, "celery")
    assert fresh.worker.startswith("ext@") and fresh.date_done is not None


def test_pickle_results_and_unserializable_results(results_app_with, start_worker):
    m = results_app_with(RESULT_SERIALIZER="pickle")
    start_worker(pool="threads")
    assert m.when.delay().get(timeout=20) == {"at": __import__("datetime").date(2026, 11, 23), "tags": {"a", "b"}}
    # The same result under json cannot be encoded: the task fails with the reason.
    m = results_app_with(RESULT_SERIALIZER="json")
    start_worker(pool="threads", name="w2", queues="json-q")
    for task in (m.when, m.unserializable):
        r = task.apply_async(queue="json-q")
        with pytest.raises(Exception, match="not JSON serializable") as err:
            r.get(timeout=20)
        assert type(err.value).__name__ == "EncodeError" and r.state == "FAILURE"


def test_result_written_after_database_outage(results_app_with, start_worker, database_url, sql):
    """The worker's connection to the results dies while the task runs; the result arrives later."""
    proxy = TcpProxy.in_front_of(database_url)
    try:
        m = results_app_with()
        w = start_worker(pool="threads", overrides={"RESULT_BACKEND": proxy.route(m.app.conf.result_backend)})
        r = m.gated.delay("outage")
        wait_for(lambda: sql("SELECT 1 FROM {schema}.effects WHERE key = 'outage'"), 20, what="task started")
        proxy.cut()
        sql("INSERT INTO {schema}.gates VALUES (true)")
        wait_for(lambda: "Retrying" in w.output(), 30, what="the worker retrying its result write")
        assert r.state == "PENDING"
        proxy.restore()
        assert r.get(timeout=60) == "outage"
        assert r.state == "SUCCESS"
    finally:
        proxy.close()


def test_canvas_at_scale(results_app, start_worker):
    m = results_app
    start_worker(pool="prefork", concurrency=2)
    header = chord((m.add.s(i, i) for i in range(1000)), m.tsum.s()).apply_async()
    # a chain of chords: each header receives the previous result
    chords = chain(chord([m.add.s(1, 1), m.add.s(2, 2)], m.tsum.s()),
                   chord([m.add.s(1), m.add.s(2)], m.tsum.s())).apply_async()
    # a chord in a chain, then a nested group
    in_chain = chain(m.add.s(1, 1), chord([m.add.s(1), m.add.s(2)], m.tsum.s()), m.add.s(100)).apply_async()
    nested = group(m.add.s(1, 1), group(m.add.s(2, 2), m.add.s(3, 3))).apply_async()
    assert chords.get(timeout=60) == 6 + 1 + 6 + 2
    assert in_chain.get(timeout=60) == 107
    assert nested.get(timeout=60) == [2, 4, 6]  # Celery flattens a group in a group
    assert header.get(timeout=180) == sum(2 * i for i in range(1000))


def test_chord_header_with_a_chain_ending_in_a_group(results_app, start_worker):
    """Three parts complete this chord, not two: completing it at two made the body
    join a part still waiting for the single pool process (a deadlock)."""
    m = results_app
    start_worker(pool="prefork", concurrency=1)
    deep = chain(m.add.si(1, 0), group(m.add.si(1, 100), chain(m.add.si(1, 200), group(
        m.add.si(1, 1000), m.add.si(1, 2000)))), m.add.si(1, 10)).apply_async()
    assert deep.get(timeout=60) == 11


def test_expired_results_are_pruned(results_app_with, start_worker, sql):
    m = results_app_with(RESULT_EXPIRES="1", PRUNE_INTERVAL="0.5")
    start_worker(pool="threads")
    r = m.add.delay(1, 1)
    assert r.get(timeout=20) == 2
    key = f"celery-task-meta-{r.id}"
    wait_for(lambda: not sql("SELECT 1 FROM {schema}.results WHERE key = %s", key), 20, what="result pruned")


def test_expired_task_is_revoked(results_app, start_worker, sql):
    from datetime import datetime, timedelta, timezone

    from celery.exceptions import TaskRevokedError

    start_worker(pool="threads")
    r = results_app.add.apply_async((1, 1), expires=datetime.now(timezone.utc) - timedelta(seconds=1))
    with pytest.raises(TaskRevokedError):
        r.get(timeout=20)
    assert r.state == "REVOKED"
    wait_for(lambda: sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s AND state = 'cancelled'", r.id),
             10, what="job row cancelled")


def test_revoked_chord_part_fails_the_chord(results_app, start_worker, database_url, schema):
    """A chord part cancelled before it runs (a revoke, the job API, or the `pgbroker`
    command, which has no app) counts as returned, as a worker counts a revoked task it
    skips: the chord fails instead of waiting forever."""
    from celery.exceptions import ChordError

    from pgbroker import jobs

    m = results_app
    start_worker(pool="threads")

    def from_the_shell(task_id):
        assert run_pgbroker(database_url, schema, "jobs", "cancel", task_id).returncode == 0

    for cancel, options in ((lambda task_id: m.app.control.revoke(task_id), {}),
                            (lambda task_id: jobs.cancel(m.app, task_ids=[task_id]), {}),
                            (from_the_shell, {}),
                            (lambda task_id: m.app.control.revoke(task_id), {"compression": "gzip"})):
        later = m.add.s(2, 2).set(countdown=600, **options)
        result = chord([m.add.s(1, 1), later], m.tsum.s()).apply_async()
        part = result.parent.results[1]
        assert part.state == "PENDING"
        cancel(part.id)
        body = m.app.AsyncResult(result.id)  # no parents: wait for the chord's own outcome
        with pytest.raises(ChordError, match="TaskRevokedError"):
            body.get(timeout=30)
        assert part.state == "REVOKED"


def test_a_revoked_task_retried_from_the_job_api_runs(results_app, start_worker, sql):
    """jobs.retry() of a task whose revoke cancelled its job: the worker that remembers
    the revoke runs it all the same, and get() waits for the new run instead of
    raising the old REVOKED."""
    from celery.exceptions import TaskRevokedError

    from pgbroker import jobs

    m = results_app
    start_worker(pool="threads")
    r = m.add.apply_async((2, 2), countdown=600)
    m.app.control.revoke(r.id)
    with pytest.raises(TaskRevokedError):
        r.get(timeout=20)
    wait_for(lambda: any(r.id in ids for ids in (m.app.control.inspect(timeout=1).revoked() or {}).values()),
             20, what="the worker remembering the revoke")
    assert jobs.retry(m.app, [r.id]) == [r.id]
    assert m.app.AsyncResult(r.id).get(timeout=30) == 4
    wait_for(lambda: sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s AND state = 'completed'", r.id), 10,
             what="the job completed")
