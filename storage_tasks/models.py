"""Storage resources and what they need: users and API keys (the actors), grants, versions,
content staged for the worker, the Postgres backend's blobs, and the audit log.

Tables live in the ``storage`` schema of the application's database (the same database as
pgbroker's jobs, so a resource change and its job commit together). :func:`migrate` creates
them; it is idempotent and safe to run from several processes at once.
"""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (BigInteger, Boolean, DateTime, ForeignKey, Integer, LargeBinary, MetaData, String, Text,
                        UniqueConstraint, func, text)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA = "storage"


class Base(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA)


class User(Base):
    """A person who acts on storage. ``deleted_at`` set: gone (jobs acting as them fail)."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    """A key acting for its user, limited to its ``scopes`` (``storage:read``, ``storage:write``)."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(200))
    scopes: Mapped[list[str]] = mapped_column(JSONB, default=lambda: ["storage:read", "storage:write"])
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StorageResource(Base):
    """One stored file: where it lives (``backend``), its current content's hash and size,
    and how many versions it has."""

    __tablename__ = "resources"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    file_name: Mapped[str] = mapped_column(String(1000))
    backend: Mapped[str] = mapped_column(String(20))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    #: ``pending`` until the worker stored its content, then ``ready``; ``deleted`` once destroyed.
    status: Mapped[str] = mapped_column(String(20), default="pending")
    content_hash: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    version_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                                 onupdate=func.now())
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Grant(Base):
    """``user_id`` may write ``resource_id`` (owners and admins may anyway)."""

    __tablename__ = "grants"
    resource_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("resources.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)


class StorageVersion(Base):
    """A version of a resource's content. ``job_key`` (the Celery task id that made it) is
    unique per resource: a retried or redelivered job finds its version instead of making
    a second one. ``ref`` is where the backend keeps it (a git commit, a file, a blob key)."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("resource_id", "job_key"), UniqueConstraint("resource_id", "number"))
    id: Mapped[int] = mapped_column(primary_key=True)
    resource_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("resources.id"))
    number: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    commit_message: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(400))
    content_hash: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    ref: Mapped[str] = mapped_column(String(400))
    job_key: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class StagedContent(Base):
    """Content over the inline limit, written with the job that will store it (same
    transaction) and deleted by that job once stored: big content never rides in a message."""

    __tablename__ = "staged_content"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Blob(Base):
    """The Postgres backend's content, one row per resource and key (``current`` or a version)."""

    __tablename__ = "blobs"
    resource_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    content: Mapped[bytes] = mapped_column(LargeBinary)


class AuditEntry(Base):
    """Every background action, with the actor it ran for and how it ended."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    action: Mapped[str] = mapped_column(String(50))
    resource_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    actor: Mapped[Any] = mapped_column(JSONB, nullable=True)
    task_id: Mapped[str | None] = mapped_column(String(200))
    outcome: Mapped[str] = mapped_column(String(40))
    detail: Mapped[str | None] = mapped_column(Text)


def schema_of(engine) -> str:
    """The schema the tables are in for ``engine`` (``storage``, unless the engine maps it
    elsewhere with ``schema_translate_map``, as tests do)."""
    return (engine.get_execution_options().get("schema_translate_map") or {}).get(SCHEMA, SCHEMA)


def migrate(engine) -> None:
    """Create the storage schema and tables if missing (idempotent, serialised by an
    advisory lock so that concurrent starts do not race)."""
    from pgbroker.config import validate_schema

    schema = validate_schema(schema_of(engine))
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('storage_tasks:migrate'))"))
        conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        Base.metadata.create_all(conn)
