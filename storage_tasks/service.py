"""The storage service: interactive changes, the three background jobs, job status and cancel.

Everything that writes to the database and enqueues a job does both in the caller's
transaction (``pgbroker.atomic`` on the resource's SQLAlchemy session): a rollback leaves
neither. Storage I/O runs only in the worker, and never while a database transaction is
open there: a job reads what it needs in one short transaction, does the I/O, then records
the outcome in another.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import func, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import pgbroker
import pgbroker.jobs as pgjobs

from .actors import (ActorNotFound, ActorPersister, ActorRequired, Forbidden, Persister, Policy, StorageError,
                     describe, owner_of)
from .backends import DiskBackend, GitBackend, PostgresBackend, StorageUnavailable
from .models import AuditEntry, StagedContent, StorageResource, StorageVersion, migrate

logger = logging.getLogger(__name__)

#: Queues and their cluster-wide concurrency (pgbroker queue limits).
QUEUES = {"default": 10, "storage_processing": 5, "storage_cleanup": 3, "storage_versioning": 2}
#: Content up to this size travels in the job's message; bigger content is staged in
#: Postgres with the job (same transaction) and read by the worker.
INLINE_LIMIT = 1024 * 1024
#: Errors a job retries (with backoff); anything else fails it at once.
TRANSIENT = (StorageUnavailable, OperationalError)


class ResourceGone(StorageError):
    """The job's resource no longer exists."""


class InvalidStorageOptions(StorageError, ValueError):
    """``storage_options`` the resource's backend does not take."""


@dataclass(frozen=True)
class JobStatus:
    """A storage job as :meth:`Storage.get_job_status` reports it."""

    id: int
    task_id: str | None
    queue: str
    task: str | None
    state: str
    attempt: int
    max_attempts: int | None
    errors: list
    inserted_at: datetime
    scheduled_at: datetime
    attempted_at: datetime | None
    completed_at: datetime | None
    discarded_at: datetime | None
    cancelled_at: datetime | None
    #: ``process``, ``cleanup`` or ``version``
    action: str | None
    #: the actor the job runs as, as stored (``{"type": "user", "id": 7}``…)
    actor: dict | None


class Storage:
    """Storage resources on ``backends``, with jobs on Celery app ``app`` (a pgbroker broker
    on the same database as ``engine``, the application's SQLAlchemy engine).

    ``root`` holds the disk and git backends' files. ``persister`` stores and finds actors
    (default :class:`~storage_tasks.actors.ActorPersister`); ``policy`` says who may write
    (default :class:`~storage_tasks.actors.Policy`).
    """

    def __init__(self, app, engine, root: str | Path, persister=None, policy: Policy | None = None,
                 backends: dict | None = None, inline_limit: int = INLINE_LIMIT, max_retries: int = 5):
        self.app, self.engine = app, engine
        self.persister: Persister = persister or ActorPersister()
        self.policy = policy or Policy()
        root = Path(root)
        self.backends = {"disk": DiskBackend(root / "disk"), "git": GitBackend(root / "git"),
                         "postgres": PostgresBackend(engine), **(backends or {})}
        self.inline_limit = inline_limit
        options = dict(bind=True, shared=False, base=pgbroker.Task, acks_late=True, reject_on_worker_lost=True,
                       autoretry_for=TRANSIENT, retry_backoff=True, retry_jitter=True, max_retries=max_retries)

        def task(action: str, queue: str):
            """A storage task: its own queue and, on every publish (beat's too), the job meta
            that get_job_status and cancel_jobs find it by."""
            def meta(args, kwargs):
                return {"storage_resource": str(args[0]) if args else None, "action": action,
                        "actor": args[1] if len(args) > 1 else None}
            return app.task(name=f"storage_tasks.{action}", queue=queue, meta=meta, **options)

        def process(task, resource_id, stored_actor, content, storage_options):
            return self._run_process(task, resource_id, stored_actor, content, storage_options)

        def cleanup(task, resource_id, stored_actor):
            return self._run_cleanup(task, resource_id, stored_actor)

        def version(task, resource_id, stored_actor, content, version_name, commit_message):
            return self._run_version(task, resource_id, stored_actor, content, version_name, commit_message)

        self.process_task = task("process", "storage_processing")(process)
        self.cleanup_task = task("cleanup", "storage_cleanup")(cleanup)
        self.version_task = task("version", "storage_versioning")(version)

    def migrate(self) -> None:
        """Create the tables and set the queues' cluster-wide concurrency (:data:`QUEUES`)."""
        migrate(self.engine)
        for queue, concurrency in QUEUES.items():
            pgjobs.limit(self.app, queue, concurrency=concurrency)

    # -- interactive changes (need an actor) -----------------------------------------------

    def create_resource(self, session: Session, file_name: str, backend: str, content: str | bytes, actor: Any,
                        storage_options: dict | None = None) -> StorageResource:
        """Add a resource and schedule the processing of its content, in ``session``'s
        transaction (commit it to keep both). Its status is ``pending`` until the worker
        stored the content."""
        if actor is None:
            raise ActorRequired(f"creating {file_name!r} needs an actor")
        if backend not in self.backends:
            raise ValueError(f"unknown backend {backend!r}; backends are {sorted(self.backends)}")
        resource = StorageResource(id=uuid.uuid4(), file_name=file_name, backend=backend, owner_id=owner_of(actor))
        session.add(resource)
        session.flush()
        self.process_storage_async(resource, content, storage_options=storage_options, actor=actor)
        return resource

    def update_resource(self, resource: StorageResource, content: str | bytes, actor: Any) -> Any:
        """Schedule new content for ``resource`` (the actor must be allowed to write it)."""
        return self.process_storage_async(resource, content, actor=actor)

    def destroy_resource(self, resource: StorageResource, actor: Any, delay: float | None = None) -> Any:
        """Mark ``resource`` deleted and schedule the cleanup of its content, together, in
        the transaction of the session ``resource`` belongs to."""
        session = Session.object_session(resource)
        if session is None:
            raise StorageError("destroy_resource needs a resource of an open session: the deletion and its "
                               "cleanup job commit together")
        self.policy.check(actor, resource, session, "destroy")
        resource.status, resource.deleted_at = "deleted", datetime.now(timezone.utc)
        session.flush()
        return self.cleanup_content_async(resource, actor=actor, delay=delay)

    # -- scheduling the background jobs --------------------------------------------------------

    def process_storage_async(self, resource: StorageResource, content: str | bytes,
                              storage_options: dict | None = None, actor: Any = None, delay: float | None = None):
        """Store ``content`` as the resource's current content, in the background.
        ``storage_options`` go to the backend (git: ``message``); others are refused."""
        return self._schedule(resource, actor, "process", self.process_task, delay,
                              content=content, storage_options=storage_options or {})

    def cleanup_content_async(self, resource: StorageResource, actor: Any = None, delay: float | None = None):
        """Remove the resource's content from its backend, in the background (idempotent)."""
        return self._schedule(resource, actor, "cleanup", self.cleanup_task, delay)

    def create_version_async(self, resource: StorageResource, content: str | bytes, version_name: str | None = None,
                             commit_message: str | None = None, actor: Any = None):
        """Keep ``content`` as a new version (a git commit authored by the actor, with
        ``commit_message``), in the background. A retried job makes no second version."""
        return self._schedule(resource, actor, "version", self.version_task, None,
                              content=content, version_name=version_name, commit_message=commit_message or "")

    def _schedule(self, resource: StorageResource, actor: Any, action: str, task, delay: float | None,
                  content: str | bytes | None = None, **kwargs: Any):
        session = Session.object_session(resource)
        owned = session is None
        if owned:
            session = Session(self.engine)
        try:
            # A detached (maybe expired) resource or actor is read again in this session:
            # merging its stale state would write it back.
            resource, attached = _live(session, _id(resource), action), _attached(session, actor)
            if attached is None and actor is not None:
                raise ActorNotFound(f"{_gone(actor)} no longer exists")
            # Stored, then looked up as the worker will: a deleted user or revoked key is
            # ActorNotFound now as then.
            stored_actor = self.persister.store(attached)
            actor = self.persister.lookup(stored_actor, session)
            options = kwargs.get("storage_options") or {}
            unknown = set(options) - self.backends[resource.backend].options
            if unknown:
                raise InvalidStorageOptions(f"{resource.backend} backend takes no storage option(s) "
                                            f"{sorted(unknown)}; it takes {sorted(self.backends[resource.backend].options)}")
            self.policy.check(actor, resource, session, action)
            task_id = str(uuid.uuid4())
            if content is not None:
                kwargs["content"] = self._content_ref(session, task_id, content)
            with pgbroker.atomic(session):
                result = task.apply_async((str(resource.id), stored_actor), kwargs, task_id=task_id, countdown=delay)
            if owned:
                session.commit()
            return result
        finally:
            if owned:
                session.close()

    def _content_ref(self, session: Session, key: str, content: str | bytes) -> dict:
        data = content.encode() if isinstance(content, str) else bytes(content)
        if len(data) <= self.inline_limit:
            return {"text": content} if isinstance(content, str) else {"base64": base64.b64encode(data).decode()}
        session.add(StagedContent(key=key, content=data))
        session.flush()
        return {"staged": key}

    # -- status and cancel ---------------------------------------------------------------------

    def get_job_status(self, resource: StorageResource | uuid.UUID | str) -> list[JobStatus]:
        """The resource's jobs, newest first: id, queue, task, state, attempt/max attempts,
        errors and timestamps."""
        found = pgjobs.list(self.app, meta={"storage_resource": str(_id(resource))}, limit=1000)
        return [JobStatus(j.id, j.task_id, j.queue, j.task, j.state.value, j.attempt, j.max_attempts, j.errors,
                          j.inserted_at, j.scheduled_at, j.attempted_at, j.completed_at, j.discarded_at,
                          j.cancelled_at, j.meta.get("action"), j.meta.get("actor")) for j in found]

    def cancel_jobs(self, resource: StorageResource | uuid.UUID | str) -> int:
        """Cancel the resource's jobs that have not started or wait to retry (running ones
        finish), with the content staged for them; the count."""
        done = pgjobs.cancel(self.app, meta={"storage_resource": str(_id(resource))},
                             states=["available", "scheduled", "retryable"], revoke=False)
        with Session(self.engine) as session, session.begin():
            session.execute(StagedContent.__table__.delete().where(StagedContent.key.in_(done.task_ids)))
        return done.cancelled

    def prune_staged(self) -> int:
        """Delete staged content no job will read: its job finished or is gone (cancelled
        or revoked elsewhere, rescued and discarded, pruned). Jobs that end in a worker
        delete their own; run this now and then (a beat entry) for the rest. The count."""
        with Session(self.engine) as session:
            keys = session.scalars(select(StagedContent.key)).all()
        waiting = {j.task_id for j in pgjobs.get_many(self.app, keys)
                   if j.state.value in ("available", "scheduled", "executing", "retryable")}
        orphans = [key for key in keys if key not in waiting]
        with Session(self.engine) as session, session.begin():
            session.execute(StagedContent.__table__.delete().where(StagedContent.key.in_(orphans)))
        return len(orphans)

    # -- the jobs (worker side) ----------------------------------------------------------------

    def _run(self, task, action: str, resource_id: str, stored_actor: dict | None,
             work: Callable[[Any, StorageResource], str], content: dict | None = None) -> str:
        """Find the actor and the resource, re-check the actor's permission (one short
        transaction), run ``work`` outside any transaction, audit the outcome. A job
        that fails for good drops the content staged for it."""
        rid = uuid.UUID(resource_id)
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                actor = self.persister.lookup(stored_actor, session)
                resource = _live(session, rid, action)
                self.policy.check(actor, resource, session, action)
                session.expunge_all()
            detail = work(actor, resource)
        except Exception as exc:
            if isinstance(exc, TRANSIENT) and not task.is_last_attempt():
                outcome = "retrying"
            else:
                outcome = {ActorNotFound: "actor_not_found", Forbidden: "forbidden", ActorRequired: "forbidden",
                           ResourceGone: "resource_gone"}.get(type(exc), "failed")
            self._audit(action, rid, stored_actor, task, outcome, f"{type(exc).__name__}: {exc}")
            if outcome != "retrying" and content is not None:
                with Session(self.engine) as session, session.begin():
                    _drop_staged(session, content)
            raise
        self._audit(action, rid, stored_actor, task, "ok", detail)
        return detail

    def _record(self, resource: StorageResource, record: Callable[[Session, Any], Any]) -> Any:
        """Record what a job wrote: ``record(session, row)`` (the resource's status and
        version count) in a transaction holding the resource's row lock, so a deletion
        commits before or after it, never between. A resource deleted before loses what
        the job wrote (its cleanup may have run before the write): ResourceGone."""
        with Session(self.engine) as session, session.begin():
            row = session.execute(select(StorageResource.status, StorageResource.version_count).where(
                StorageResource.id == resource.id).with_for_update()).first()
            if row is not None and row.status != "deleted":
                return record(session, row)
        self.backends[resource.backend].delete(resource.id)
        raise ResourceGone(f"storage resource {resource.id} was deleted while this job wrote its content; "
                           "what it wrote was removed")

    def _audit(self, action: str, rid: uuid.UUID, stored_actor, task, outcome: str, detail: str | None) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(AuditEntry(action=action, resource_id=rid, actor=stored_actor, task_id=task.request.id,
                                   outcome=outcome, detail=detail))

    def _content(self, ref: dict) -> bytes | None:
        """The job's content; None when it was staged and is gone, which only the commit
        that recorded this job's outcome does: an earlier delivery of the job finished."""
        if "text" in ref:
            return ref["text"].encode()
        if "base64" in ref:
            return base64.b64decode(ref["base64"])
        with Session(self.engine) as session:
            staged = session.get(StagedContent, ref["staged"])
            return None if staged is None else staged.content

    def _run_process(self, task, resource_id: str, stored_actor: dict | None, content: dict,
                     storage_options: dict) -> str:
        def work(actor, resource: StorageResource) -> str:
            data = self._content(content)
            if data is None:
                return "already stored by an earlier delivery of this job"
            backend = self.backends[resource.backend]
            ref = backend.store(resource.id, data, key=task.request.id, author=describe(actor),
                                file_name=resource.file_name, **storage_options)
            digest = hashlib.sha256(data).hexdigest()

            def record(session, row):
                session.execute(update(StorageResource).where(StorageResource.id == resource.id).values(
                    content_hash=digest, size=len(data), status="ready"))
                _drop_staged(session, content)

            self._record(resource, record)
            return f"stored {len(data)} bytes at {ref}"

        return self._run(task, "process", resource_id, stored_actor, work, content)

    def _run_cleanup(self, task, resource_id: str, stored_actor: dict | None) -> str:
        def work(actor, resource: StorageResource) -> str:
            removed = self.backends[resource.backend].delete(resource.id)
            with Session(self.engine) as session, session.begin():
                session.execute(update(StorageResource).where(StorageResource.id == resource.id).values(
                    status="deleted", content_hash=None, size=None,
                    deleted_at=func.coalesce(StorageResource.deleted_at, func.now())))
            return "content removed" if removed else "nothing to remove (already cleaned up)"

        return self._run(task, "cleanup", resource_id, stored_actor, work)

    def _run_version(self, task, resource_id: str, stored_actor: dict | None, content: dict,
                     version_name: str | None, commit_message: str) -> str:
        key = task.request.id

        def work(actor, resource: StorageResource) -> str:
            data = self._content(content)
            if data is None:
                return "already recorded by an earlier delivery of this job"
            author = describe(actor)
            name = version_name or f"job-{key[:8]}"
            ref = self.backends[resource.backend].write_version(
                resource.id, data, key=key, name=name, message=commit_message, author=author,
                file_name=resource.file_name)
            def record(session, row) -> bool:
                # The resource's row lock orders concurrent versions; the (resource, job)
                # key makes a redelivered job's insert a no-op.
                added = session.execute(insert(StorageVersion).values(
                    resource_id=resource.id, number=row.version_count + 1, name=name, commit_message=commit_message,
                    author=author, content_hash=hashlib.sha256(data).hexdigest(), size=len(data), ref=ref,
                    job_key=key).on_conflict_do_nothing(index_elements=["resource_id", "job_key"])
                    .returning(StorageVersion.id)).first() is not None
                if added:
                    session.execute(update(StorageResource).where(StorageResource.id == resource.id).values(
                        version_count=row.version_count + 1))
                _drop_staged(session, content)
                return added

            added = self._record(resource, record)
            return f"version {name} at {ref}" + ("" if added else " (already recorded)")

        return self._run(task, "version", resource_id, stored_actor, work, content)


def _id(resource: StorageResource | uuid.UUID | str) -> uuid.UUID:
    """A resource's id, also from a detached, expired instance (its identity is kept)."""
    if isinstance(resource, StorageResource):
        identity = sa_inspect(resource).identity
        return identity[0] if identity else resource.id
    return uuid.UUID(str(resource))


def _live(session: Session, rid: uuid.UUID, action: str) -> StorageResource:
    """The resource, read in ``session``; ResourceGone when it does not exist, or was
    deleted and ``action`` is not its cleanup."""
    resource = session.get(StorageResource, rid)
    if resource is None:
        raise ResourceGone(f"storage resource {rid} no longer exists")
    if resource.status == "deleted" and action != "cleanup":
        raise ResourceGone(f"storage resource {rid} was deleted")
    return resource


def _drop_staged(session: Session, content: dict) -> None:
    """Delete the job's staged content, in the transaction recording its outcome."""
    if "staged" in content:
        session.execute(StagedContent.__table__.delete().where(StagedContent.key == content["staged"]))


def _gone(obj: Any) -> str:
    """What a mapped instance that no longer exists was (``User 7``)."""
    identity = sa_inspect(obj).identity
    return f"{type(obj).__name__} {identity[0] if identity and len(identity) == 1 else identity}"


def _attached(session: Session, obj: Any) -> Any:
    """``obj`` as an instance of ``session``: itself when it belongs to it, else read again by
    its identity (None if gone). Anything that is not a mapped instance is returned as is."""
    try:
        state = sa_inspect(obj)
    except NoInspectionAvailable:
        return obj
    if state.session is session or state.identity is None:
        return obj
    return session.get(type(obj), state.identity)
