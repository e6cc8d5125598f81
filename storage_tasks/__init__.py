"""storage_tasks: storage jobs that run as the user who asked for them, on pgbroker and Celery.

::

    import storage_tasks
    storage = storage_tasks.setup(app, engine, root="/var/lib/storage")   # in the app module
    storage.migrate()                                                    # tables + queue limits

    with Session(engine) as session, session.begin():
        doc = storage.create_resource(session, "notes.md", "git", "# Notes", actor=user)
    storage_tasks.create_version_async(doc, "# Notes v2", version_name="v2",
                                       commit_message="Second draft", actor=user)
    storage_tasks.get_job_status(doc)      # [JobStatus(state="completed", attempt=1, ...), ...]
    storage_tasks.cancel_jobs(doc)         # available/scheduled jobs cancelled: the count

Run workers on the storage queues: ``celery -A app worker -Q
storage_processing,storage_cleanup,storage_versioning,default``.
"""
from __future__ import annotations

from typing import Any

from .actors import ActorNotFound, ActorPersister, ActorRequired, Forbidden, Policy, StorageError, SystemActor
from .backends import DiskBackend, GitBackend, PostgresBackend, StorageUnavailable
from .models import ApiKey, AuditEntry, Grant, StorageResource, StorageVersion, User
from .service import QUEUES, InvalidStorageOptions, JobStatus, ResourceGone, Storage

__all__ = ["setup", "Storage", "process_storage_async", "cleanup_content_async", "create_version_async",
           "get_job_status", "cancel_jobs", "ActorNotFound", "ActorRequired", "Forbidden", "StorageError",
           "StorageUnavailable", "ResourceGone", "InvalidStorageOptions", "SystemActor", "ActorPersister", "Policy", "JobStatus", "QUEUES",
           "User", "ApiKey", "Grant", "StorageResource", "StorageVersion", "AuditEntry", "DiskBackend",
           "GitBackend", "PostgresBackend"]

_default: Storage | None = None


def setup(app, engine, root, **options: Any) -> Storage:
    """Create the :class:`Storage` of this process (registers its tasks on ``app``); the
    module-level functions below use it."""
    global _default
    _default = Storage(app, engine, root, **options)
    return _default


def _storage() -> Storage:
    if _default is None:
        raise StorageError("call storage_tasks.setup(app, engine, root) first (in your Celery app module)")
    return _default


def process_storage_async(resource, content, storage_options=None, actor=None, delay=None):
    """See :meth:`Storage.process_storage_async`."""
    return _storage().process_storage_async(resource, content, storage_options=storage_options, actor=actor,
                                            delay=delay)


def cleanup_content_async(resource, actor=None, delay=None):
    """See :meth:`Storage.cleanup_content_async`."""
    return _storage().cleanup_content_async(resource, actor=actor, delay=delay)


def create_version_async(resource, content, version_name=None, commit_message=None, actor=None):
    """See :meth:`Storage.create_version_async`."""
    return _storage().create_version_async(resource, content, version_name=version_name,
                                           commit_message=commit_message, actor=actor)


def get_job_status(resource):
    """See :meth:`Storage.get_job_status`."""
    return _storage().get_job_status(resource)


def cancel_jobs(resource):
    """See :meth:`Storage.cancel_jobs`."""
    return _storage().cancel_jobs(resource)
