"""What pgbroker changes in a Celery worker it runs in (without starting it)."""
from __future__ import annotations

import pytest
from celery import Celery

import pgbroker.worker  # noqa: F401  (`celery worker` imports it through pgbroker's celery plug-in)


@pytest.mark.parametrize("conf, lost_wait, precision", [
    ({}, 1.0, 0.1),  # Celery's defaults are for its event loop: shortened
    ({"worker_lost_wait": 30.0, "worker_timer_precision": 0.5}, 30.0, 0.5),  # the app's own values stand
])
def test_blocking_pool_workers_get_shorter_lost_wait_and_timer_precision(conf, lost_wait, precision):
    app = Celery("defaults", broker="pgbroker://nobody@127.0.0.1:1/none", set_as_current=False)
    app.conf.update(conf)
    worker = app.WorkController(pool_cls="solo", concurrency=1, without_mingle=True, without_gossip=True,
                                without_heartbeat=True)
    assert (worker.worker_lost_wait, worker.timer_precision, worker.timer.schedule.max_interval) == \
        (lost_wait, precision, precision)
    app.close()
