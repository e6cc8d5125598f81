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


def test_a_real_worker_fails_jobs_of_a_deleted_user_or_a_lost_permission(storage_env, start_worker):
    from datetime import datetime, timezone

    from storage_tasks import Grant

    env, m = storage_env
    with Session(m.engine, expire_on_commit=False) as session, session.begin():
        ann, bob, cal = (User(email=f"{n}@example.com", name=n.title()) for n in ("ann", "bob", "cal"))
        session.add_all([ann, bob, cal])
        session.flush()
        doc = m.storage.create_resource(session, "notes.md", "disk", "text", actor=ann)
        session.add_all([Grant(resource_id=doc.id, user_id=bob.id), Grant(resource_id=doc.id, user_id=cal.id)])
    by_bob = m.storage.create_version_async(doc, "v", actor=bob)
    by_cal = m.storage.create_version_async(doc, "v", actor=cal)
    by_ann = m.storage.create_version_async(doc, "v", actor=ann)
    with Session(m.engine) as session, session.begin():  # before any worker runs them
        session.get(User, bob.id).deleted_at = datetime.now(timezone.utc)
        session.execute(Grant.__table__.delete().where(Grant.user_id == cal.id))
    start_worker(name="w", app="tests.apps.storageapp", queues=m.QUEUES, pool="prefork", concurrency=2, overrides=env)
    ids = [by_bob.id, by_cal.id, by_ann.id]
    final = ("completed", "discarded")
    wait_for(lambda: all(pgjobs.get(m.app, i).state.value in final for i in ids), 60, what="the three jobs")
    bob_job, cal_job, ann_job = (pgjobs.get(m.app, i) for i in ids)
    assert (bob_job.state.value, bob_job.attempt) == ("discarded", 1)  # not retried
    assert bob_job.errors[-1]["error"] == f"ActorNotFound: user {bob.id} no longer exists"
    assert cal_job.state.value == "discarded" and cal_job.errors[-1]["error"].startswith(
        "Forbidden: Cal <cal@example.com> may not version")
    assert ann_job.state.value == "completed"
    with Session(m.engine) as session:
        assert session.scalar(select(func.count()).select_from(StorageVersion)) == 1
