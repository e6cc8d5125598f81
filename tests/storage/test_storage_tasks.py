"""storage_tasks against a real database, its jobs run by pgbroker.testing's drain (Celery's
eager semantics, outcomes written on the job rows) and real backends (disk, git, Postgres)."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

import psycopg
import pytest
from celery import Celery
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

import pgbroker.jobs as pgjobs
from pgbroker.testing import sandbox
from storage_tasks import (ActorNotFound, ActorRequired, InvalidStorageOptions, ResourceGone, ApiKey, AuditEntry, Forbidden, Grant, Storage,
                           StorageResource, StorageVersion, SystemActor, User)
from storage_tasks.actors import ActorPersister
from storage_tasks.backends import DiskBackend, StorageUnavailable
from storage_tasks.models import StagedContent
from storage_tasks.service import _id


@pytest.fixture
def env(database_url, tmp_path):
    """(storage, box, engine, users): a Storage on a sandboxed pgbroker schema, its tables in a
    schema of their own, three users (ann owns, bob is granted later, eve is a stranger)."""
    st_schema = "st_" + uuid.uuid4().hex[:10]
    with sandbox(database_url) as box:
        engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1)).execution_options(
            schema_translate_map={"storage": st_schema})
        app = Celery("storage-tests", set_as_current=False)
        box.configure(app)
        storage = Storage(app, engine, tmp_path / "files")
        storage.migrate()
        with Session(engine, expire_on_commit=False) as session, session.begin():
            users = {name: User(email=f"{name}@example.com", name=name.title()) for name in ("ann", "bob", "eve")}
            session.add_all(users.values())
        yield storage, box, engine, users
        engine.dispose()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{st_schema}" CASCADE')


def drain_all(storage, box):
    totals = {}
    for queue in ("storage_processing", "storage_versioning", "storage_cleanup"):
        d = box.drain(storage.app, queue)
        for k in ("completed", "failed"):
            totals[k] = totals.get(k, 0) + getattr(d, k)
    return totals


def create(storage, engine, actor, backend="git", content="# Notes\n", name="notes.md"):
    with Session(engine, expire_on_commit=False) as session, session.begin():
        return storage.create_resource(session, name, backend, content, actor=actor)


def fresh(engine, resource):
    with Session(engine) as session:
        return session.get(StorageResource, resource.id)


def audit(engine):
    with Session(engine) as session:
        return [(a.action, a.outcome, a.actor, a.detail) for a in session.scalars(select(AuditEntry).order_by(AuditEntry.id))]


@pytest.mark.parametrize("backend", ["disk", "git", "postgres"])
def test_create_processes_content_on_every_backend(env, backend):
    storage, box, engine, users = env
    doc = create(storage, engine, users["ann"], backend=backend, content="hello " * 10)
    assert fresh(engine, doc).status == "pending"  # nothing stored until the worker ran
    box.assert_enqueued(task="storage_tasks.process", queue="storage_processing",
                        meta={"storage_resource": str(doc.id), "actor": {"type": "user", "id": users["ann"].id}})
    assert drain_all(storage, box) == {"completed": 1, "failed": 0}
    row = fresh(engine, doc)
    assert (row.status, row.size) == ("ready", 60) and len(row.content_hash) == 64
    read = storage.backends[backend].read
    assert (read(doc.id, "notes.md") if backend == "git" else read(doc.id)) == b"hello " * 10
    assert audit(engine)[-1][:3] == ("process", "ok", {"type": "user", "id": users["ann"].id})


def test_content_over_the_inline_limit_is_staged_with_the_job(env):
    storage, box, engine, users = env
    big = b"x" * (storage.inline_limit + 1)
    doc = create(storage, engine, users["ann"], backend="disk", content=big)
    (job,) = box.enqueued(task="storage_tasks.process")
    assert job.kwargs["content"] == {"staged": job.job.task_id}  # not in the message
    drain_all(storage, box)
    assert storage.backends["disk"].read(doc.id) == big and fresh(engine, doc).size == len(big)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(StagedContent)).scalar() == 0  # deleted once stored


def test_rollback_leaves_no_resource_and_no_job(env):
    storage, box, engine, users = env
    with pytest.raises(RuntimeError):
        with Session(engine) as session, session.begin():
            storage.create_resource(session, "draft.md", "disk", "text", actor=users["ann"])
            raise RuntimeError("the request failed after the enqueue")
    box.refute_enqueued(task="storage_tasks.process")
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(StorageResource)) == 0


def test_git_versions_are_commits_by_the_acting_user(env):
    storage, box, engine, users = env
    doc = create(storage, engine, users["ann"])
    drain_all(storage, box)
    with Session(engine) as session, session.begin():
        session.add(Grant(resource_id=doc.id, user_id=users["bob"].id))
    storage.create_version_async(doc, "# Notes v2\n", version_name="v2", commit_message="Second draft",
                                 actor=users["ann"])
    storage.create_version_async(doc, "# Notes v3\n", version_name="v3", commit_message="Bob's edits",
                                 actor=users["bob"])
    assert drain_all(storage, box) == {"completed": 2, "failed": 0}
    log = storage.backends["git"].log(doc.id)
    assert [(c["author"], c["subject"]) for c in log] == [
        ("Bob <bob@example.com>", "Bob's edits"), ("Ann <ann@example.com>", "Second draft"),
        ("Ann <ann@example.com>", "Store content")]
    assert storage.backends["git"].read(doc.id, "notes.md") == b"# Notes v3\n"
    with Session(engine) as session:
        versions = session.scalars(select(StorageVersion).order_by(StorageVersion.number)).all()
        assert [(v.number, v.name, v.ref) for v in versions] == [(1, "v2", log[1]["sha"]), (2, "v3", log[0]["sha"])]
        row = session.get(StorageResource, doc.id)
        assert (row.version_count, row.status) == (2, "ready")  # scheduling from a stale object changed nothing


def test_a_retried_version_job_makes_no_second_version(env):
    storage, box, engine, users = env
    doc = create(storage, engine, users["ann"])
    drain_all(storage, box)
    result = storage.create_version_async(doc, "v2", version_name="v2", commit_message="Again", actor=users["ann"])
    (job,) = box.enqueued(task="storage_tasks.version")
    for _ in range(2):  # the same job (task id) run twice: a redelivery after a crash
        storage.version_task.apply(job.args, job.kwargs, task_id=result.id)
    assert [c["subject"] for c in storage.backends["git"].log(doc.id)].count("Again") == 1
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(StorageVersion)) == 1
        assert session.get(StorageResource, doc.id).version_count == 1


@pytest.mark.parametrize("kind", ["user", "api_key", "system", "generic", "none"])
def test_every_actor_kind_is_stored_and_found_again(env, kind):
    storage, box, engine, users = env
    with Session(engine, expire_on_commit=False) as session, session.begin():
        key = ApiKey(user_id=users["ann"].id, name="ci")
        session.add(key)
    actor = {"user": users["ann"], "api_key": key, "system": SystemActor("nightly", {"job": "reindex"}),
             "generic": {"role": "admin", "name": "Ops", "email": "ops@example.com"}, "none": None}[kind]
    doc = create(storage, engine, users["ann"])
    drain_all(storage, box)
    if kind == "none":
        with pytest.raises(ActorRequired):
            storage.create_version_async(doc, "v", actor=None)
        box.refute_enqueued(task="storage_tasks.version")
        return
    storage.create_version_async(doc, "v", commit_message=f"as {kind}", actor=actor)
    (job,) = box.enqueued(task="storage_tasks.version")
    stored = ActorPersister().store(actor)
    assert job.args[1] == stored and job.job.meta["actor"] == stored
    assert drain_all(storage, box)["completed"] == 1
    author = storage.backends["git"].log(doc.id)[0]["author"]
    assert author == {"user": "Ann <ann@example.com>", "api_key": f"API key ci <api-key-{key.id}@storage.invalid>",
                      "system": "nightly <system@storage.invalid>", "generic": "Ops <ops@example.com>"}[kind]
    assert audit(engine)[-1][:3] == ("version", "ok", stored)


def test_a_deleted_user_or_revoked_key_fails_the_job_without_retries(env):
    storage, box, engine, users = env
    with Session(engine, expire_on_commit=False) as session, session.begin():
        key = ApiKey(user_id=users["ann"].id, name="deploy")
        session.add(key)
    doc = create(storage, engine, users["ann"])
    drain_all(storage, box)
    with Session(engine) as session, session.begin():
        session.add(Grant(resource_id=doc.id, user_id=users["bob"].id))
    by_bob = storage.create_version_async(doc, "v", actor=users["bob"])
    by_key = storage.create_version_async(doc, "v", actor=key)
    with Session(engine) as session, session.begin():
        session.get(User, users["bob"].id).deleted_at = datetime.now(timezone.utc)
        session.get(ApiKey, key.id).revoked_at = datetime.now(timezone.utc)
    assert drain_all(storage, box) == {"completed": 0, "failed": 2}
    for result, reason in ((by_bob, f"ActorNotFound: user {users['bob'].id} no longer exists"),
                           (by_key, f"ActorNotFound: API key {key.id} was revoked")):
        job = pgjobs.get(storage.app, result.id)
        assert job.state.value == "discarded" and job.attempt == 1  # no pointless retries
        assert job.errors[-1]["error"] == reason
    assert [a[1] for a in audit(engine)[-2:]] == ["actor_not_found", "actor_not_found"]
    assert not storage.backends["git"].log(doc.id)[0]["subject"].startswith("Version")


def test_permission_is_checked_when_asked_and_again_when_the_job_runs(env):
    storage, box, engine, users = env
    doc = create(storage, engine, users["ann"])
    drain_all(storage, box)
    with pytest.raises(Forbidden):
        storage.create_version_async(doc, "v", actor=users["eve"])  # a stranger: refused at once
    with Session(engine) as session, session.begin():
        session.add(Grant(resource_id=doc.id, user_id=users["bob"].id))
    result = storage.create_version_async(doc, "v", commit_message="bob", actor=users["bob"])
    with Session(engine) as session, session.begin():  # bob loses access before the job runs
        session.execute(Grant.__table__.delete())
    assert drain_all(storage, box)["failed"] == 1
    job = pgjobs.get(storage.app, result.id)
    assert job.state.value == "discarded" and job.errors[-1]["error"].startswith("Forbidden: Bob <bob@example.com> may not version")
    assert audit(engine)[-1][:3] == ("version", "forbidden", {"type": "user", "id": users["bob"].id})
    assert len(storage.backends["git"].log(doc.id)) == 1  # nothing committed


def test_interactive_changes_need_an_actor(env):
    storage, box, engine, users = env
    with pytest.raises(ActorRequired):
        with Session(engine) as session, session.begin():
            storage.create_resource(session, "x.md", "disk", "x", actor=None)
    doc = create(storage, engine, users["ann"], backend="disk")
    with Session(engine) as session, session.begin():
        with pytest.raises(ActorRequired):
            storage.destroy_resource(session.get(StorageResource, doc.id), actor=None)
        with pytest.raises(Forbidden):
            storage.destroy_resource(session.get(StorageResource, doc.id), actor=users["eve"])


def test_cleanup_is_idempotent(env):
    storage, box, engine, users = env
    doc = create(storage, engine, users["ann"], backend="disk")
    drain_all(storage, box)
    with Session(engine) as session, session.begin():
        storage.destroy_resource(session.get(StorageResource, doc.id), actor=users["ann"])
    storage.cleanup_content_async(doc, actor=users["ann"])  # asked twice
    assert drain_all(storage, box) == {"completed": 2, "failed": 0}
    assert fresh(engine, doc).status == "deleted" and not (storage.backends["disk"].root / str(doc.id)).exists()
    assert [a[3] for a in audit(engine) if a[0] == "cleanup"] == [
        "content removed", "nothing to remove (already cleaned up)"]


def test_status_and_cancel(env):
    storage, box, engine, users = env
    doc = create(storage, engine, users["ann"])
    other = create(storage, engine, users["ann"], name="other.md")
    storage.create_version_async(doc, "v", actor=users["ann"])
    storage.cleanup_content_async(doc, actor=users["ann"], delay=3600)
    box.drain(storage.app, "storage_processing")  # the two process jobs ran
    status = storage.get_job_status(doc)
    assert [(s.action, s.queue, s.state) for s in status] == [
        ("cleanup", "storage_cleanup", "scheduled"), ("version", "storage_versioning", "available"),
        ("process", "storage_processing", "completed")]
    assert status[2].attempt == 1 and status[2].max_attempts == 6 and status[2].completed_at is not None
    assert storage.cancel_jobs(doc) == 2
    assert {s.state for s in storage.get_job_status(doc)} == {"cancelled", "completed"}
    assert [s.state for s in storage.get_job_status(other)] == ["completed"]
    assert storage.cancel_jobs(doc) == 0


def test_queues_have_their_concurrency(env):
    storage, box, engine, users = env
    limits = {q["queue"]: q["concurrency"] for q in pgjobs.queues(storage.app)}
    assert limits == {"default": 10, "storage_processing": 5, "storage_cleanup": 3, "storage_versioning": 2}


def test_storage_options_reach_the_backend_and_bad_ones_are_refused(env):
    storage, box, engine, users = env
    doc = create(storage, engine, users["ann"])
    storage.process_storage_async(doc, "# Rewritten\n", storage_options={"message": "Rewrite"}, actor=users["ann"])
    drain_all(storage, box)
    assert storage.backends["git"].log(doc.id)[0]["subject"] == "Rewrite"
    with pytest.raises(InvalidStorageOptions, match="compression"):
        storage.process_storage_async(doc, "x", storage_options={"compression": True}, actor=users["ann"])
    box.refute_enqueued(task="storage_tasks.process")


def test_a_deleted_resource_is_not_brought_back_by_a_late_job(env):
    storage, box, engine, users = env
    doc = create(storage, engine, users["ann"], backend="disk")  # its process job waits
    with Session(engine) as session, session.begin():
        storage.destroy_resource(session.get(StorageResource, doc.id), actor=users["ann"])
    assert box.drain(storage.app, "storage_cleanup").completed == 1  # the cleanup runs first
    assert box.drain(storage.app, "storage_processing").failed == 1  # then the late process job refuses
    row = fresh(engine, doc)
    assert row.status == "deleted" and not (storage.backends["disk"].root / str(doc.id)).exists()
    assert audit(engine)[-1][1] == "resource_gone"
    with pytest.raises(ResourceGone):
        storage.create_version_async(doc, "v", actor=users["ann"])


def test_scheduling_works_with_expired_detached_objects(env):
    storage, box, engine, users = env
    with Session(engine) as session, session.begin():  # default expire_on_commit: everything expires
        ann = session.get(User, users["ann"].id)
        doc = storage.create_resource(session, "notes.md", "git", "# Notes", actor=ann)
    storage.create_version_async(doc, "# v2", commit_message="After commit", actor=ann)  # both detached, expired
    assert drain_all(storage, box) == {"completed": 2, "failed": 0}
    assert storage.backends["git"].log(_id(doc))[0]["subject"] == "After commit"


def test_a_redelivered_job_whose_staged_content_is_gone_finished_before(env):
    storage, box, engine, users = env
    doc = create(storage, engine, users["ann"], backend="disk", content=b"y" * (storage.inline_limit + 1))
    (job,) = box.enqueued(task="storage_tasks.process")
    storage.process_task.apply(job.args, job.kwargs, task_id=job.job.task_id)
    again = storage.process_task.apply(job.args, job.kwargs, task_id=job.job.task_id)  # a redelivery
    assert again.successful() and again.result == "already stored by an earlier delivery of this job"
    assert fresh(engine, doc).size == storage.inline_limit + 1


def test_the_actor_persister_is_pluggable(env, database_url, tmp_path):
    storage, box, engine, users = env

    class ByEmail:
        """An application's own persister: users by e-mail address."""

        def store(self, actor):
            return {"email": actor.email}

        def lookup(self, stored, session):
            user = session.scalar(select(User).where(User.email == stored["email"]))
            if user is None:
                raise ActorNotFound(f"nobody is {stored['email']}")
            return user

    app = box.configure(Celery("custom-persister", set_as_current=False))  # its own tasks
    custom = Storage(app, engine, tmp_path / "custom", persister=ByEmail())
    doc = create(custom, engine, users["ann"], backend="disk")
    (job,) = box.enqueued(task="storage_tasks.process")
    assert job.args[1] == {"email": "ann@example.com"}
    assert drain_all(custom, box)["completed"] == 1 and fresh(engine, doc).status == "ready"


class InterruptedDisk(DiskBackend):
    """A disk backend that runs ``during(resource_id)`` just before each write."""

    during = staticmethod(lambda resource_id: None)

    def store(self, resource_id, content, **kw):
        self.during(resource_id)
        return super().store(resource_id, content, **kw)

    def write_version(self, resource_id, content, **kw):
        self.during(resource_id)
        return super().write_version(resource_id, content, **kw)


@pytest.mark.parametrize("action", ["process", "version"])
def test_a_resource_deleted_while_its_job_writes_keeps_nothing_of_it(env, tmp_path, action):
    """The deletion and its cleanup commit and run between the job's checks and its
    write: the job removes what it wrote and fails with ResourceGone."""
    storage, box, engine, users = env
    disk = storage.backends["disk"] = InterruptedDisk(tmp_path / "interrupted")
    doc = create(storage, engine, users["ann"], backend="disk")
    drain_all(storage, box)
    if action == "process":
        storage.process_storage_async(doc, "second", actor=users["ann"])
    else:
        storage.create_version_async(doc, "v2", actor=users["ann"])

    def delete_and_clean_up(resource_id):
        disk.during = staticmethod(lambda resource_id: None)
        with Session(engine) as session, session.begin():
            storage.destroy_resource(session.get(StorageResource, resource_id), actor=users["ann"])
        assert box.drain(storage.app, "storage_cleanup").completed == 1

    disk.during = staticmethod(delete_and_clean_up)
    assert drain_all(storage, box)["failed"] == 1
    assert not (disk.root / str(doc.id)).exists()  # neither `current` nor the version's file came back
    assert [a[:2] for a in audit(engine)[-2:]] == [("cleanup", "ok"), (action, "resource_gone")]
    (failed,) = [s for s in storage.get_job_status(doc) if s.action == action and s.state == "discarded"]
    assert failed.errors[-1]["error"].startswith(f"ResourceGone: storage resource {doc.id} was deleted while")


def staged_keys(engine):
    with Session(engine) as session:
        return set(session.scalars(select(StagedContent.key)))


def test_staged_content_of_jobs_that_never_store_it_is_deleted(env):
    storage, box, engine, users = env
    big = b"z" * (storage.inline_limit + 1)
    doc = create(storage, engine, users["ann"], backend="disk")
    drain_all(storage, box)
    with Session(engine) as session, session.begin():
        session.add(Grant(resource_id=doc.id, user_id=users["bob"].id))
    forbidden = storage.process_storage_async(doc, big, actor=users["bob"])
    cancelled = storage.process_storage_async(doc, big, actor=users["ann"], delay=3600)
    revoked = storage.process_storage_async(doc, big, actor=users["ann"], delay=3600)
    assert staged_keys(engine) == {forbidden.id, cancelled.id, revoked.id}
    with Session(engine) as session, session.begin():  # bob loses access: his job fails for good
        session.execute(Grant.__table__.delete())
    assert box.drain(storage.app, "storage_processing").failed == 1
    assert staged_keys(engine) == {cancelled.id, revoked.id}
    pgjobs.cancel(storage.app, task_ids=[revoked.id])  # cancelled elsewhere (`pgbroker jobs cancel`)
    assert storage.prune_staged() == 1 and staged_keys(engine) == {cancelled.id}
    assert storage.cancel_jobs(doc) == 1 and staged_keys(engine) == set()


def test_a_job_that_runs_out_of_retries_is_audited_failed(env, database_url, tmp_path):
    storage, box, engine, users = env

    class Down(DiskBackend):
        def store(self, *args, **kw):
            raise StorageUnavailable("disk offline")

    storage.backends["disk"] = Down(tmp_path / "down")
    doc = create(storage, engine, users["ann"], backend="disk", content=b"q" * (storage.inline_limit + 1))
    box.drain(storage.app, "storage_processing")  # (inline, Celery runs an eager task's retries at once)
    (job,) = storage.get_job_status(doc)
    assert job.state == "discarded" and job.errors[-1]["error"] == "StorageUnavailable: disk offline"
    assert [a[1] for a in audit(engine)] == ["retrying"] * storage.process_task.max_retries + ["failed"]
    assert staged_keys(engine) == set()


def test_storage_tasks_published_by_name_find_their_queue_and_status(env):
    """Beat entries and send_task publish without the service: the task's queue and the
    job meta that get_job_status and cancel_jobs use come from the task itself."""
    storage, box, engine, users = env
    doc = create(storage, engine, users["ann"], backend="disk")
    drain_all(storage, box)
    stored = ActorPersister().store(users["ann"])
    sent = storage.app.send_task("storage_tasks.cleanup", (str(doc.id), stored), countdown=3600)
    (job,) = [s for s in storage.get_job_status(doc) if s.task_id == sent.id]
    assert (job.queue, job.action, job.actor, job.state) == ("storage_cleanup", "cleanup", stored, "scheduled")
    assert storage.cancel_jobs(doc) == 1


def test_scheduling_as_a_deleted_user_is_actor_not_found_as_in_the_worker(env):
    storage, box, engine, users = env
    doc = create(storage, engine, users["ann"], backend="disk")
    with Session(engine) as session, session.begin():
        session.add(Grant(resource_id=doc.id, user_id=users["bob"].id))
        session.add(Grant(resource_id=doc.id, user_id=users["eve"].id))
        session.get(User, users["bob"].id).deleted_at = datetime.now(timezone.utc)
    with pytest.raises(ActorNotFound, match=f"user {users['bob'].id} no longer exists"):
        storage.create_version_async(doc, "v", actor=users["bob"])  # soft-deleted
    with Session(engine) as session, session.begin():
        session.execute(Grant.__table__.delete().where(Grant.user_id == users["eve"].id))
        session.delete(session.get(User, users["eve"].id))
    with pytest.raises(ActorNotFound, match=f"User {users['eve'].id} no longer exists"):
        storage.create_version_async(doc, "v", actor=users["eve"])  # deleted for good
