"""The Postgres result backend under a real worker (pgbroker as broker and backend)."""
from __future__ import annotations

import time

import pytest
from celery import chord, group

pytestmark = pytest.mark.acceptance


@pytest.fixture
def results_app(worker_env, broker_url, monkeypatch):
    """Broker and results both in Postgres; a 30 s fallback poll so that only NOTIFY is fast."""
    worker_env.update(RESULT_BACKEND=broker_url, RESULT_POLLING_INTERVAL="30")
    for k, v in worker_env.items():
        monkeypatch.setenv(k, v)
    import importlib

    import tests.apps.celeryapp as module

    module = importlib.reload(module)
    yield module
    module.app.close()


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
    from celery.exceptions import ChordError

    m = results_app
    start_worker(pool="threads")
    result = chord([m.add.s(1, 1), m.boom.s("header failed")], m.tsum.s()).apply_async()
    with pytest.raises((ChordError, Exception), match="header failed"):
        result.get(timeout=60)


def test_forget(results_app, start_worker, sql):
    m = results_app
    start_worker(pool="threads")
    r = m.add.delay(1, 2)
    assert r.get(timeout=20) == 3
    r.forget()
    assert sql("SELECT 1 FROM {schema}.results WHERE key LIKE %s", f"%{r.id}") == []


def test_result_too_large_is_a_clear_failure(results_app, start_worker):
    start_worker(pool="threads")
    result = results_app.big.delay(200_000)  # the test app allows 100,000 bytes
    with pytest.raises(Exception, match="max_result_size=100000"):
        result.get(timeout=30)
    assert result.state == "FAILURE"
