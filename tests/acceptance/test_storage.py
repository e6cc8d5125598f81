"""storage_tasks with real `celery worker` processes: a worker killed in the middle of
create_version_async leaves exactly one version (one git commit, one row)."""
from __future__ import annotations

import importlib
import uuid

import psycopg
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

import pgbroker.jobs as pgjobs
from storage_tasks import StorageResource, StorageVersion, User
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance


@pytest.fixture
def storage_env(worker_env, database_url, tmp_path, monkeypatch):
    env = {**worker_env, "STORAGE_SCHEMA": "st_" + uuid.uuid4().hex[:10], "STORAGE_ROOT": str(tmp_path / "files")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import tests.apps.storageapp as module

    module = importlib.reload(module)
    module.storage.migrate()
    yield env, module
    module.engine.dispose()
    module.app.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{env["STORAGE_SCHEMA"]}" CASCADE')


def test_a_worker_killed_during_create_version_leaves_exactly_one_version(storage_env, start_worker, tmp_path):
    env, m = storage_env
    gate = tmp_path / "gate"
    worker_options = dict(app="tests.apps.storageapp", queues=m.QUEUES, pool="threads", concurrency=2)
    doomed = start_worker(name="doomed", overrides={**env, "PAUSE_AFTER_COMMIT": str(gate)}, **worker_options)
    with Session(m.engine, expire_on_commit=False) as session, session.begin():
        ann = User(email="ann@example.com", name="Ann")
        session.add(ann)
        session.flush()
        doc = m.storage.create_resource(session, "notes.md", "git", "# Notes\n", actor=ann)
    wait_for(lambda: session_get(m, doc).status == "ready", 30, what="the content to be stored")

    result = m.storage.create_version_async(doc, "# Notes v2\n", version_name="v2", commit_message="Crash test",
                                            actor=ann)
    committed = wait_for(lambda: (tmp_path / "gate.committed").exists() and (tmp_path / "gate.committed").read_text(),
                         30, what="the version's commit")
    doomed.kill()  # after the commit, before the version row: the worst moment
    start_worker(name="survivor", overrides=env, **worker_options)
    wait_for(lambda: pgjobs.get(m.app, result.id).state.value == "completed", 60, what="the redelivered job")

    job = pgjobs.get(m.app, result.id)
    assert job.attempt == 2 and "went away; redelivered" in job.errors[0]["error"]
    log = m.storage.backends["git"].log(doc.id)
    assert [c["subject"] for c in log] == ["Crash test", "Store content"] and log[0]["sha"] == committed
    assert log[0]["author"] == "Ann <ann@example.com>"
    with Session(m.engine) as session:
        versions = session.scalars(select(StorageVersion)).all()
        assert [(v.number, v.ref, v.job_key) for v in versions] == [(1, committed, result.id)]
        assert session.get(StorageResource, doc.id).version_count == 1
        assert session.scalar(select(func.count()).select_from(StorageVersion)) == 1


def session_get(m, doc):
    with Session(m.engine) as session:
        return session.get(StorageResource, doc.id)
