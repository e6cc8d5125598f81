"""Testing Celery tasks with pgbroker.testing, on examples/shop.py.

    PGBROKER_TEST_URL=postgresql://user:pass@host/db pytest -p pgbroker.testing test_with_pgbroker.py

(or ``pytest_plugins = ["pgbroker.testing"]`` in your top-level conftest.py). Without
``PGBROKER_TEST_URL`` an embedded PostgreSQL is started. Each test gets a fresh,
migrated schema; nothing runs until the test drains a queue.
"""
from __future__ import annotations

import pytest

import shop


@pytest.fixture
def box(pgbroker_sandbox):
    pgbroker_sandbox.configure(shop.app)
    yield pgbroker_sandbox


def test_a_double_click_sends_one_receipt(box):
    shop.send_receipt.delay("order-7")
    shop.send_receipt.delay("order-7")
    box.assert_enqueued(task="shop.send_receipt", args=["order-7"], count=1)
    box.refute_enqueued(task="shop.charge")
    drained = box.drain(shop.app)
    assert drained.completed == 1 and list(drained.results.values()) == ["receipt for order-7"]


def test_charge_retries_then_succeeds_inline(box):
    shop.charge.apply_async((42,), kwargs={"fail_times": 2}, meta={"order": 42})
    box.assert_enqueued(task="shop.charge", args=[42], kwargs={"fail_times": 2}, meta={"order": 42})
    drained = box.drain(shop.app)
    assert (drained.completed, drained.failed) == (1, 0)


def test_a_failing_import_is_recorded_on_its_job(box):
    import pgbroker.jobs as jobs

    result = shop.import_feed.delay("bad://feed")
    assert box.drain(shop.app).failed == 1
    job = jobs.get(box.engine, result.id)
    assert job.state.value == "discarded" and "not valid XML" in job.errors[-1]["error"]
