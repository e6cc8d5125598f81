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


def _starter(kind, env):
    """``start(**kwargs)`` starting ``kind`` processes (``overrides={...}``: environment
    variables for that one only); every one is stopped (or killed) at the end."""
    started = []

    def start(**kwargs):
        process = kind(env, **kwargs)
        started.append(process)
        return process.wait_ready()

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def start_worker(worker_env):
    """Start real `celery worker` processes."""
    yield from _starter(Worker, worker_env)


@pytest.fixture
def start_beat(worker_env):
    """Start real `celery beat -S pgbroker` processes."""
    yield from _starter(Beat, worker_env)


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
