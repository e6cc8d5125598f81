"""pgbroker: Celery's broker in PostgreSQL.

Set ``broker_url = "pgbroker://user@host/db"``; nothing else changes. Importing
this package is cheap: the public API below is loaded on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import _pgbroker_alias

__version__ = "0.1.0"

__all__ = [
    "atomic",
    "Snooze",
    "Task",
    "Database",
    "JobEngine",
    "JobState",
    "Job",
    "Options",
    "install_sql",
    "grant_sql",
    "migrate",
    "PgBrokerError",
    "MessageTooLarge",
    "InvalidName",
    "InvalidMessage",
    "DatabaseUnavailable",
    "SchemaNotReady",
    "PermissionDenied",
    "ConfigurationError",
    "TransactionError",
    "ForeignTransaction",
    "NotInTransaction",
    "TransactionFailed",
    "InvalidJobOption",
    "InvalidState",
    "InvalidUnique",
    "UniqueKeyBusy",
    "InvalidSnooze",
    "InvalidSchedule",
]

_LAZY = {
    "atomic": "pgbroker.enqueue",
    "Snooze": "pgbroker.worker",
    "Task": "pgbroker.task",
    "Database": "pgbroker.db",
    "JobEngine": "pgbroker.engine",
    "JobState": "pgbroker.types",
    "Job": "pgbroker.types",
    "Options": "pgbroker.config",
    "install_sql": "pgbroker.schema",
    "grant_sql": "pgbroker.schema",
    "migrate": "pgbroker.schema",
    "PgBrokerError": "pgbroker.errors",
    "MessageTooLarge": "pgbroker.errors",
    "InvalidName": "pgbroker.errors",
    "InvalidMessage": "pgbroker.errors",
    "DatabaseUnavailable": "pgbroker.errors",
    "SchemaNotReady": "pgbroker.errors",
    "PermissionDenied": "pgbroker.errors",
    "ConfigurationError": "pgbroker.errors",
    "TransactionError": "pgbroker.errors",
    "ForeignTransaction": "pgbroker.errors",
    "NotInTransaction": "pgbroker.errors",
    "TransactionFailed": "pgbroker.errors",
    "InvalidJobOption": "pgbroker.errors",
    "InvalidState": "pgbroker.errors",
    "InvalidUnique": "pgbroker.errors",
    "UniqueKeyBusy": "pgbroker.errors",
    "InvalidSnooze": "pgbroker.errors",
    "InvalidSchedule": "pgbroker.errors",
}

_pgbroker_alias.install()

if TYPE_CHECKING:  # pragma: no cover
    from .config import Options
    from .db import Database
    from .enqueue import atomic
    from .worker import Snooze
    from .engine import JobEngine
    from .errors import (ConfigurationError, DatabaseUnavailable, ForeignTransaction, InvalidJobOption,
                         InvalidMessage, InvalidName, InvalidSchedule, InvalidSnooze, InvalidState, InvalidUnique,
                         MessageTooLarge, NotInTransaction, PermissionDenied, PgBrokerError, SchemaNotReady,
                         TransactionError, TransactionFailed, UniqueKeyBusy)
    from .task import Task
    from .schema import grant_sql, install_sql, migrate
    from .types import Job, JobState


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None and name in ("jobs", "telemetry", "testing"):  # submodules: pgbroker.jobs.list(...)
        import importlib

        return importlib.import_module(f"pgbroker.{name}")
    if module is None:
        raise AttributeError(f"module 'pgbroker' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
