from __future__ import annotations

import pytest

from tests.helpers import Beat, Worker


@pytest.fixture
def worker_env(broker_url, database_url, schema, sql, engine, tmp_path):
    """Environment for tests/apps/celeryapp.py, with its side-effect tables created."""
    sql("CREATE TABLE {schema}.effects (id serial, key text, what text, pid int, at timestamptz DEFAULT now())")
    sql("CREATE TABLE {schema}.gates (open boolean NOT NULL)")
    return {
        "BROKER_URL": broker_url,
        "PGBROKER_SCHEMA": schema,
        "TEST_DB_URL": database_url,
        "TEST_READY_DIR": str(tmp_path),
    }


@pytest.fixture
def start_worker(worker_env):
    """Start real `celery worker` processes; every one is stopped (or killed) afterwards."""
    started: list[Worker] = []

    def start(**kwargs) -> Worker:
        """``overrides={...}`` sets environment variables for this worker only."""
        w = Worker(worker_env, **kwargs)
        started.append(w)
        return w.wait_ready()

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def start_beat(worker_env):
    """Start real `celery beat -S pgbroker` processes; every one is stopped (or killed) afterwards."""
    started: list[Beat] = []

    def start(**kwargs) -> Beat:
        b = Beat(worker_env, **kwargs)
        started.append(b)
        return b.wait_ready()

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def celery_app(worker_env, monkeypatch):
    """The tests' Celery app, in this process, for publishing."""
    for k, v in worker_env.items():
        monkeypatch.setenv(k, v)
    import importlib

    import tests.apps.celeryapp as module

    module = importlib.reload(module)
    yield module
    module.app.close()
