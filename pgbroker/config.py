"""Transport options: one dataclass, its defaults, and how URLs become libpq conninfo.

Celery users set these with ``broker_transport_options = {...}``; kombu users with
``Connection(url, transport_options={...})``. Unknown keys are ignored (kombu passes
Celery's own options through the same dict), bad values raise ConfigurationError.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .errors import ConfigurationError, InvalidName

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
#: Queue and exchange names are stored as text parameters, never spliced into SQL,
#: so almost anything is allowed; NUL cannot be stored in Postgres text.
MAX_NAME_BYTES = 1024


def validate_schema(name: str) -> str:
    """Return ``name`` if it is a safe Postgres schema identifier, else raise InvalidName."""
    if not isinstance(name, str) or not _SCHEMA_RE.match(name):
        raise InvalidName(
            f"schema (prefix) {name!r} must match {_SCHEMA_RE.pattern}: lower-case letters, "
            f"digits and underscores, at most 63 bytes"
        )
    if name.startswith("pg_"):
        raise InvalidName(f"schema (prefix) {name!r}: Postgres reserves names starting with pg_ for itself")
    return name


def validate_name(kind: str, name: str) -> str:
    """Check a queue/exchange name before it is stored; returns it unchanged."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{kind} name must be a non-empty string, got {name!r}")
    if "\x00" in name:
        raise InvalidName(f"{kind} name {name!r} contains a NUL byte")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidName(f"{kind} name is {len(name.encode())} bytes; the limit is {MAX_NAME_BYTES}")
    return name


@dataclass(frozen=True)
class Options:
    """Every transport option, with its default. See the README's configuration table."""

    #: Postgres schema holding pgbroker's tables; several instances can share a database.
    schema: str = "pgbroker"
    #: Apply missing migrations when a producer or worker first connects.
    auto_migrate: bool = True
    #: Longest a consumer sleeps between polls when no NOTIFY arrives (seconds).
    polling_interval: float = 1.0
    #: How often a consumer process writes its heartbeat (seconds).
    heartbeat_interval: float = 5.0
    #: A consumer whose heartbeat is older than this is dead; its jobs are rescued (seconds).
    rescue_after: float = 20.0
    #: How often the rescuer runs (seconds; None: with every heartbeat). One process at
    #: a time runs it, like Oban's Lifeline.
    rescue_interval: float | None = None
    #: Most jobs one rescue run takes back.
    rescue_batch_size: int = 1000
    #: Largest message body accepted at publish (bytes).
    max_message_size: int = 10 * 1024 * 1024
    #: Largest encoded task result the result backend stores (bytes).
    max_result_size: int = 10 * 1024 * 1024
    #: Most jobs one claim takes when the consumer sets no prefetch limit.
    batch_size: int = 100
    #: Most acknowledgements/outcomes written in one statement.
    ack_batch_size: int = 500
    #: How long the outcome writer waits to fill a batch (seconds); acks free the
    #: prefetch window at once, only the row update waits.
    ack_linger: float = 0.005
    #: How long a process reuses an exchange's routing table before reading it again
    #: (seconds): the longest a publish can still reach a queue deleted elsewhere.
    #: A publish that matches no binding always reads it again.
    routing_cache_ttl: float = 1.0
    #: Connections kept by the per-process pool.
    pool_min_size: int = 1
    pool_max_size: int = 8
    #: Seconds to wait for a pooled connection before raising a connection error; also
    #: the connect timeout of pgbroker's connections unless the URL sets one.
    pool_timeout: float = 5.0
    #: ``synchronous_commit`` for pgbroker's own connections (None: the server's setting).
    synchronous_commit: str | None = None
    #: A process that waited for results (``get()``) and has nobody waiting any more
    #: closes its LISTEN connection after this long (seconds), and opens it again at the
    #: next ``get()``: every NOTIFY wakes every listening connection of the database.
    result_listener_idle: float = 60.0
    #: How often a worker deletes expired results and counters (seconds; one leader at a time).
    prune_interval: float = 60.0
    #: Most rows one pruning statement deletes.
    prune_batch_size: int = 1000
    #: Finished jobs are deleted this long (seconds) after they finished, per final
    #: state, by one process at a time (Oban's Pruner default: 60 s). "never" keeps them.
    prune_completed_after: float | None = 60.0
    prune_cancelled_after: float | None = 60.0
    prune_discarded_after: float | None = 60.0
    #: Beat fire records (the exactly-once keys) are kept this long (seconds; "never" keeps them).
    prune_beat_fires_after: float | None = 7 * 24 * 3600.0
    #: Inside Django's ``transaction.atomic()``, publishes join the transaction without
    #: ``pgbroker.atomic()`` (on the ``django_database`` connection).
    join_django_atomic: bool = False
    django_database: str = "default"
    #: When a caller's transaction is on another database than the broker's:
    #: ``"error"`` (raise ForeignTransaction) or ``"after_commit"`` (publish after its commit).
    foreign_transaction: str = "error"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "Options":
        values = dict(values or {})
        if "prefix" in values and "schema" not in values:
            values["schema"] = values["prefix"]
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, f in known.items():
            if name in values and values[name] is not None:
                kwargs[name] = _coerce(name, f.type, values[name])
        options = replace(cls(), **kwargs)
        options.validate()
        return options

    def validate(self) -> None:
        validate_schema(self.schema)
        if self.ack_linger < 0 or self.routing_cache_ttl < 0:
            raise ConfigurationError("ack_linger and routing_cache_ttl must be >= 0")
        for name in ("polling_interval", "heartbeat_interval", "rescue_after", "pool_timeout", "prune_interval",
                     "result_listener_idle"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.rescue_after < 2 * self.heartbeat_interval:
            raise ConfigurationError(
                f"rescue_after ({self.rescue_after}) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}), or live consumers would be rescued"
            )
        for name in ("max_message_size", "max_result_size", "batch_size", "ack_batch_size", "pool_min_size",
                     "pool_max_size", "prune_batch_size", "rescue_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("prune_completed_after", "prune_cancelled_after", "prune_discarded_after",
                     "prune_beat_fires_after"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigurationError(f"{name} must be >= 0 seconds or 'never', got {value!r}")
        if self.rescue_interval is not None and not self.rescue_interval > 0:
            raise ConfigurationError(f"rescue_interval must be > 0, got {self.rescue_interval!r}")
        if self.pool_max_size < self.pool_min_size:
            raise ConfigurationError("pool_max_size must be >= pool_min_size")
        if self.foreign_transaction not in ("error", "after_commit"):
            raise ConfigurationError(
                f"foreign_transaction must be 'error' or 'after_commit', got {self.foreign_transaction!r}"
            )
        if self.synchronous_commit not in (None, "on", "off", "local", "remote_write", "remote_apply"):
            raise ConfigurationError(f"synchronous_commit={self.synchronous_commit!r} is not a Postgres value")


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _coerce(name: str, type_: Any, value: Any) -> Any:
    kind = str(type_)
    try:
        if kind == "bool":
            if isinstance(value, str):
                word = value.strip().lower()
                if word not in _BOOLEANS:
                    raise ValueError(f"not a boolean (one of {', '.join(sorted(_BOOLEANS))})")
                return _BOOLEANS[word]
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not a whole number")
            return int(value)
        if kind in ("float", "float | None"):
            if kind == "float | None" and isinstance(value, str) and value.strip().lower() in ("never", "none", ""):
                if name.startswith("prune_") or value.strip().lower() != "never":
                    return None
                raise ValueError("'never' is for the prune_*_after options")
            number = float(value)
            if not math.isfinite(number):
                raise ValueError("not a finite number")
            return number
        if name == "synchronous_commit":
            return str(value).lower()
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"transport option {name}={value!r}: {exc}") from None


def conninfo_from_url(url: str | None) -> str:
    """Turn a ``pgbroker://`` (or ``pgbroker+postgresql://``) URL into a libpq URI.

    Host, port, user, password, database and every libpq query parameter
    (``sslmode``, ``connect_timeout``, ``application_name``, …) pass through; what
    the URL leaves out, libpq takes from the standard ``PG*`` environment variables.
    """
    url = (url or "").strip()
    if not url or url in ("pgbroker", "pgbroker://", "localhost"):
        return "postgresql://"
    if "://" not in url:
        raise ConfigurationError(f"not a pgbroker URL: {mask_url(url)!r}")
    scheme, rest = url.split("://", 1)
    schemes = scheme.split("+")
    if schemes[0] not in ("pgbroker", "postgresql", "postgres") or any(
        s not in ("pgbroker", "postgresql", "postgres", "psycopg") for s in schemes
    ):
        raise ConfigurationError(f"unsupported URL scheme {scheme!r} in {mask_url(url)!r}")
    _check_userinfo(url)
    conninfo = "postgresql://" + rest
    try:
        conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"cannot parse {mask_url(url)!r}: {exc}") from None
    return conninfo


def _check_userinfo(url: str) -> None:
    """Refuse a user or password that libpq would read differently from what was meant
    (its error would then show part of the password)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # libpq reports what it cannot parse
        return
    userinfo = parts.netloc.rpartition("@")[0]
    if _unencoded_password(parts, url) is not None or userinfo.count("@") or re.search(r"%(?![0-9A-Fa-f]{2})", userinfo):
        raise ConfigurationError(
            f"the user or password in {mask_url(url)!r} has a character that must be percent-encoded: "
            "write / as %2F, ? as %3F, # as %23, @ as %40 and % as %25 (or use PGPASSWORD or a .pgpass file)")


def broker_url(conninfo: str) -> str:
    """The ``pgbroker://`` broker URL of a ``postgresql://`` conninfo URL."""
    return "pgbroker://" + conninfo.split("://", 1)[1]


def _unencoded_password(parts, url: str) -> tuple[str, str] | None:
    """(user, what follows the password) when an unencoded ``/``, ``?`` or ``#`` in the
    password ended the URL's netloc early ("user:pa" of "user:pa/ss@host/db"); the
    password then runs to the last ``@``. A host and port followed by an ``@`` in a
    parameter's value ("host:5432/db?application_name=a@b") is an ordinary URL."""
    netloc = parts.netloc
    if "@" in netloc or ":" not in netloc or "@" not in (after := url.partition(netloc)[2]):
        return None
    user, port = netloc.split(":", 1)
    if port.isdigit() and "=" in after.rsplit("@", 1)[0]:
        return None
    return user, after.rsplit("@", 1)[1]


def mask_url(url: str, mask: str = "**") -> str:
    """The URL with its password replaced by ``mask`` (also inside ``password=`` parameters)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":" + mask
        netloc = f"{userinfo}@{host}"
    elif (cut := _unencoded_password(parts, url)) is not None:
        return mask_url(f"{parts.scheme}://{cut[0]}:{mask}@{cut[1]}", mask)
    query = re.sub(r"(?i)(password=)[^&]*", r"\1" + mask, parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
