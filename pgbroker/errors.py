"""pgbroker's exceptions.

Every error pgbroker raises on purpose is a :class:`PgBrokerError`. Errors that
mean "the database cannot be reached right now" are also listed in
:data:`CONNECTION_ERRORS`, which the kombu transport declares as its
``connection_errors`` so that kombu's and Celery's retry policies apply to them.
"""
from __future__ import annotations

import psycopg


class PgBrokerError(Exception):
    """Base class of every error raised by pgbroker."""


class ConfigurationError(PgBrokerError, ValueError):
    """An option, URL or identifier is invalid (raised before anything is written)."""


class InvalidName(ConfigurationError):
    """A queue, exchange or schema name that pgbroker refuses to store or route."""


class InvalidSchedule(ConfigurationError):
    """A beat entry or trigger that cannot fire: bad cron expression, unknown time zone,
    unknown missed-fire policy, arguments that are not JSON, a filter that does not run."""


class InvalidUnique(ConfigurationError):
    """A ``unique`` spec pgbroker cannot apply (unknown field or state, bad period)."""


class InvalidJobOption(ConfigurationError):
    """A per-call or per-task job option pgbroker cannot apply (``max_attempts``, ``meta``,
    ``retry_backoff``…), or a queue control it cannot set (a rate limit of 0)."""


class InvalidState(PgBrokerError, ValueError):
    """A job state name that is not one of :class:`pgbroker.JobState`."""


class InvalidSnooze(PgBrokerError, ValueError):
    """``Snooze`` was given something other than a number of seconds >= 0."""


class InvalidMessage(PgBrokerError, ValueError):
    """A message that cannot be stored: bad eta/expires header, unserialisable headers, …"""


class _TooLarge:
    """Mixin of the size errors: their arguments are the figures (so that pickle and
    Celery's exception serialisation rebuild them), their text says what to do."""

    def __init__(self, size: int, limit: int, where: str):
        self.size, self.limit = size, limit
        super().__init__(size, limit, where)

    def __str__(self) -> str:
        return self.template.format(*self.args)


class MessageTooLarge(_TooLarge, InvalidMessage):
    """The message body is larger than the ``max_message_size`` transport option."""

    template = ("message of {0} bytes for queue {2!r} exceeds max_message_size={1} bytes; "
                "raise the transport option or store the payload elsewhere and pass a reference")

    @property
    def queue(self) -> str:
        return self.args[2]


class ResultTooLarge(_TooLarge, PgBrokerError, ValueError):
    """An encoded task result is larger than the ``max_result_size`` option."""

    template = ("result {2} of {0} bytes exceeds max_result_size={1} bytes; "
                "store large results elsewhere and return a reference")


class SchemaNotReady(PgBrokerError):
    """The database has no (or an older) pgbroker schema and auto-migration is off."""


class PermissionDenied(PgBrokerError):
    """The database role lacks a privilege on pgbroker's schema: usually a role that was
    never granted its use (``pgbroker grant ROLE``), or one left to migrate a schema it
    cannot create in (run ``pgbroker migrate`` as the schema's owner)."""

    @classmethod
    def of(cls, exc: Exception, role: str, schema: str, where: str = "") -> "PermissionDenied":
        """The error for the server's refusal ``exc``, saying what to run."""
        return cls(
            f"{role} may not use schema {schema!r}{where} ({str(exc).strip()}): creating or upgrading it needs "
            f"its owner, using it a grant: run `pgbroker migrate --schema {schema}` as the schema's owner, then "
            f"`pgbroker grant --schema {schema} {role}` (README: Roles and grants)"
        )


class TransactionError(PgBrokerError):
    """Publishing inside a caller's transaction (``pgbroker.atomic``) is not possible."""


class ForeignTransaction(TransactionError):
    """The caller's connection is not to the broker's database, so jobs cannot join its transaction."""


class NotInTransaction(TransactionError):
    """``pgbroker.atomic()`` was given a connection with no open transaction (or a failed one)."""


class TransactionFailed(TransactionError):
    """A statement pgbroker ran in the caller's transaction failed (the cause is chained).

    Not a connection error on purpose: retrying a publish inside the caller's
    (now aborted) transaction cannot succeed, the caller has to roll back.
    """


class UniqueKeyBusy(PgBrokerError):
    """A unique publish waited ``pool_timeout`` for a transaction that holds its key
    uncommitted (the same key published inside a transaction still open)."""


class DatabaseUnavailable(PgBrokerError, ConnectionError):
    """The database could not be reached (wraps the driver's error, password masked)."""


#: Errors kombu treats as "connection lost": Celery retries publishes and
#: reconnects consumers when it sees one of these.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    DatabaseUnavailable,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
