"""Who a storage job acts for, kept with the job and found again when it runs, and what
they may do.

An actor is stored as JSON with the job (:meth:`ActorPersister.store`) and looked up
again in the worker (:meth:`ActorPersister.lookup`): a user or API key is read from the
database then, so a user deleted or a key revoked since makes the job fail with
:class:`ActorNotFound` (not retried: it would not come back). Plug in your own
persister for your own user model: anything with ``store``/``lookup``.

Kinds: a :class:`~storage_tasks.models.User`, an :class:`~storage_tasks.models.ApiKey`,
a :class:`SystemActor`, any other JSON mapping (a generic actor), and None (no actor).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import ApiKey, Grant, StorageResource, User


class StorageError(Exception):
    """Base class of storage_tasks' errors."""


class ActorNotFound(StorageError):
    """The actor a job was scheduled by no longer exists (user deleted, API key revoked)."""


class ActorRequired(StorageError):
    """An interactive change was attempted without an actor."""


class Forbidden(StorageError):
    """The actor may not do this to this resource (checked when asked, and again when the job runs)."""


@dataclass(frozen=True)
class SystemActor:
    """pgbroker or the application itself (maintenance, migrations): may do anything."""

    name: str = "system"
    data: dict = field(default_factory=dict)


class Persister(Protocol):
    def store(self, actor: Any) -> dict | None: ...

    def lookup(self, stored: dict | None, session: Session) -> Any: ...


class ActorPersister:
    """The default persister: users and API keys by id, system and generic actors by value."""

    def store(self, actor: Any) -> dict | None:
        """The JSON kept with the job."""
        if actor is None:
            return None
        if isinstance(actor, User):
            return {"type": "user", "id": actor.id}
        if isinstance(actor, ApiKey):
            return {"type": "api_key", "id": actor.id}
        if isinstance(actor, SystemActor):
            return {"type": "system", "name": actor.name, "data": dict(actor.data)}
        if isinstance(actor, dict):
            return {"type": "generic", "data": dict(actor)}
        raise TypeError(f"cannot persist actor {actor!r}: give a User, ApiKey, SystemActor, dict or None "
                        "(or configure a persister that can)")

    def lookup(self, stored: dict | None, session: Session) -> Any:
        """The actor again, read now. Raises ActorNotFound when it is gone."""
        if stored is None:
            return None
        kind = stored.get("type")
        if kind == "user":
            user = session.get(User, stored["id"])
            if user is None or user.deleted_at is not None:
                raise ActorNotFound(f"user {stored['id']} no longer exists")
            return user
        if kind == "api_key":
            key = session.get(ApiKey, stored["id"])
            if key is None or key.revoked_at is not None:
                raise ActorNotFound(f"API key {stored['id']} was revoked")
            owner = session.get(User, key.user_id)
            if owner is None or owner.deleted_at is not None:
                raise ActorNotFound(f"API key {stored['id']}'s user {key.user_id} no longer exists")
            return key
        if kind == "system":
            return SystemActor(stored.get("name", "system"), stored.get("data") or {})
        if kind == "generic":
            return dict(stored.get("data") or {})
        raise ActorNotFound(f"unknown stored actor {stored!r}")


def describe(actor: Any) -> str:
    """A person-readable name of an actor (git author, logs)."""
    if isinstance(actor, User):
        return f"{actor.name} <{actor.email}>"
    if isinstance(actor, ApiKey):
        return f"API key {actor.name} <api-key-{actor.id}@storage.invalid>"
    if isinstance(actor, SystemActor):
        return f"{actor.name} <system@storage.invalid>"
    if isinstance(actor, dict):
        return f"{actor.get('name', 'generic actor')} <{actor.get('email', 'generic@storage.invalid')}>"
    return "nobody <nobody@storage.invalid>"


class Policy:
    """Who may write a resource: the system; an admin; the owner; a user with a grant; an
    unrevoked API key with the ``storage:write`` scope whose user may; a generic actor
    with ``{"role": "admin"}``. Nobody without an actor, no deleted user. Subclass to
    change it."""

    def may_write(self, actor: Any, resource: StorageResource, session: Session) -> bool:
        if isinstance(actor, SystemActor):
            return True
        if isinstance(actor, ApiKey):
            if "storage:write" not in (actor.scopes or []) or actor.revoked_at is not None:
                return False
            actor = session.get(User, actor.user_id)
        if isinstance(actor, User):
            if actor.deleted_at is not None:
                return False
            return actor.is_admin or actor.id == resource.owner_id or session.scalar(
                select(Grant).where(Grant.resource_id == resource.id, Grant.user_id == actor.id)) is not None
        if isinstance(actor, dict):
            return actor.get("role") == "admin"
        return False

    def check(self, actor: Any, resource: StorageResource, session: Session, action: str) -> None:
        """Raise ActorRequired (no actor) or Forbidden unless ``actor`` may ``action`` ``resource``."""
        if actor is None:
            raise ActorRequired(f"{action} of {resource.file_name!r} needs an actor")
        if not self.may_write(actor, resource, session):
            raise Forbidden(f"{describe(actor)} may not {action} {resource.file_name!r} ({resource.id})")


def owner_of(actor: Any) -> int:
    """The user id a new resource belongs to (an API key's user; else the actor itself)."""
    if isinstance(actor, ApiKey):
        return actor.user_id
    if isinstance(actor, User):
        return actor.id
    raise Forbidden(f"{describe(actor)} cannot own a resource: create it as a user or an API key")

