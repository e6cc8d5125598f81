"""Connections: one psycopg pool per (process, database, schema), plus LISTEN connections.

This module and :mod:`pgbroker.schema` are the only ones that hold psycopg
connections. The pool is per process and forked children get their own: a
connection inherited across ``fork()`` is never used nor closed by the child
(closing it would end the parent's session).
"""
from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from . import enqueue as _enqueue
from . import schema as _schema
from .config import Options, conninfo_from_url, mask_url
from .errors import DatabaseUnavailable, PermissionDenied, SchemaNotReady
from .sql import queries

logger = logging.getLogger(__name__)

_registry: dict[tuple[str, Options], "Database"] = {}
_registry_lock = threading.Lock()
_inherited: list[Any] = []  # objects from the parent process, kept alive and untouched


def _after_fork_in_child() -> None:
    global _registry_lock
    _inherited.extend(_registry.values())
    _registry.clear()
    _registry_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


#: TCP settings of pgbroker's connections, unless the URL sets them: a peer that
#: vanished (host down, failover, network cut) is noticed in about a minute, by an idle
#: connection (keepalives: 30 s idle, then 3 probes 10 s apart) as by one waiting for
#: the acknowledgement of what it sent (30 s), instead of after the kernel's defaults
#: (two hours; about 15 minutes). Ignored on Unix sockets.
TCP_DEFAULTS = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
                "tcp_user_timeout": 30_000}


def connection_defaults(conninfo: str, options: Options) -> dict[str, int]:
    """libpq parameters of pgbroker's own connections where the URL leaves them out:
    :data:`TCP_DEFAULTS`, and ``connect_timeout`` (``pool_timeout`` rounded up, at least
    libpq's 2 s, unless ``PGCONNECT_TIMEOUT`` sets it) so that a server that accepts
    connections and never answers does not hold a connect forever."""
    given = conninfo_to_dict(conninfo)
    defaults = {k: v for k, v in TCP_DEFAULTS.items() if k not in given}
    if "PGCONNECT_TIMEOUT" not in os.environ and "connect_timeout" not in given:
        defaults["connect_timeout"] = max(2, math.ceil(options.pool_timeout))
    return defaults


#: Longest wait between two reconnect attempts of a pool (seconds). psycopg's pool
#: doubles the wait without bound: after a 40 s outage its next attempt could be half a
#: minute away, and every caller waits for it.
RECONNECT_MAX_DELAY = 1.0

try:  # psycopg_pool's own backoff, capped (its class lives in a private module)
    from psycopg_pool.base import AttemptWithBackoff

    class _Attempt(AttemptWithBackoff):
        def update_delay(self, now: float) -> None:
            super().update_delay(now)
            self.delay = min(self.delay, RECONNECT_MAX_DELAY)
except ImportError:  # pragma: no cover - another psycopg_pool layout: its own backoff applies
    _Attempt = None

# pgbroker reports a failed connection itself (DatabaseUnavailable, with the reason):
# psycopg's pool should not also print a warning per attempt when logging is unconfigured.
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())


#: How often a caller waiting for a pooled connection looks whether a connection
#: attempt failed meanwhile (then it gives up at once: see _Pool.getconn).
FAIL_FAST_CHECK = 0.1


class _Pool(ConnectionPool):
    """psycopg's pool, remembering why its last connection attempt failed: a caller that
    times out waiting for a connection is told that (a wrong password, a missing
    database, the server refusing) rather than only that it waited. Reconnect attempts
    are at most RECONNECT_MAX_DELAY apart."""

    last_error: Exception | None = None
    failed_at = -math.inf

    def getconn(self, timeout: float | None = None) -> psycopg.Connection:
        """A connection, waiting up to ``timeout`` (default: the pool's) for one, but not
        after a connection attempt begun meanwhile failed for a reason other than the
        server's lack of room (too many connections: then a busy connection may still
        come back). A wrong port, host or password, or a server that is down, then fails
        in about a reconnect interval instead of the whole ``pool_timeout``."""
        started = time.monotonic()
        deadline = started + (self.timeout if timeout is None else timeout)
        while True:
            wait = deadline - time.monotonic()
            try:
                return super().getconn(timeout=max(0.0, min(wait, FAIL_FAST_CHECK)))
            except PoolTimeout:
                error = self.last_error
                if wait <= FAIL_FAST_CHECK or (
                    self.failed_at > started and error is not None
                    and not (getattr(error, "sqlstate", None) or "").startswith("53")
                ):
                    raise PoolTimeout(f"couldn't get a connection after {time.monotonic() - started:.2f} sec") from None

    def _add_connection(self, attempt=None, growing: bool = False) -> None:
        if attempt is None and _Attempt is not None:
            attempt = _Attempt(timeout=self.reconnect_timeout)
        super()._add_connection(attempt, growing)

    def _connect(self, timeout: float | None = None):
        begun = time.monotonic()
        try:
            conn = super()._connect(timeout)
        except Exception as exc:
            # Dated by its start: an attempt begun before the server came back says
            # nothing about a caller that started waiting since.
            self.last_error, self.failed_at = exc, begun
            raise
        self.last_error = None
        return conn


class Database:
    """A pooled connection to one pgbroker schema, with its named queries.

    Use :meth:`get` to share one per process; every call borrows a connection
    for one statement (autocommit) unless it runs inside :meth:`transaction`.
    """

    def __init__(self, conninfo: str, options: Options):
        self.conninfo = conninfo
        self.options = options
        self.safe_url = mask_url(conninfo)
        self.q = queries(options.schema)
        self._ready = False
        self._ready_lock = threading.Lock()
        #: What every connection of this Database is opened with (pool and LISTEN).
        self.connect_kwargs = {"autocommit": True, **connection_defaults(conninfo, options)}
        self.pool = _Pool(
            conninfo,
            min_size=options.pool_min_size,
            max_size=options.pool_max_size,
            timeout=options.pool_timeout,
            kwargs=self.connect_kwargs,
            configure=self._configure,
            open=False,
            name=f"pgbroker-{os.getpid()}",
        )
        self._opened = False
        self._identity: tuple | None = None
        self._result_backend: Callable[[], Any] | None = None

    @property
    def result_backend(self) -> Any:
        """The pgbroker Celery result backend on this database used in this process, if any
        (a durable revoke marks the cancelled tasks REVOKED through it)."""
        return self._result_backend() if self._result_backend is not None else None

    @result_backend.setter
    def result_backend(self, backend: Any) -> None:
        self._result_backend = weakref.ref(backend)

    @classmethod
    def get(cls, conninfo: str, options: Options) -> "Database":
        """The process-wide Database for ``conninfo`` and ``options`` (a configuration
        with other options, on the same schema too, gets its own: whoever connects first
        does not decide the options of the others)."""
        key = (conninfo, options)
        with _registry_lock:
            db = _registry.get(key)
            if db is None:
                db = _registry[key] = cls(conninfo, options)
            return db

    @property
    def ready(self) -> bool:
        """The database was reached (and its schema checked) by this process."""
        return self._ready

    @staticmethod
    def all() -> list["Database"]:
        """Every Database of this process (not those inherited from a parent process)."""
        with _registry_lock:
            return list(_registry.values())

    def same_schema(self) -> list["Database"]:
        """This Database first, then the process's others on the same database and schema."""
        with _registry_lock:
            others = [db for (conninfo, options), db in _registry.items()
                      if db is not self and conninfo == self.conninfo and options.schema == self.options.schema]
        return [self, *others]

    def _configure(self, conn: psycopg.Connection) -> None:
        conn.execute("SET TIME ZONE 'UTC'")
        # Every pgbroker statement is index-driven whatever its parameters, so the plan
        # cached at prepare time is as good as a fresh one; left to choose, the server
        # re-plans the claim on each call (about 0.15 ms, more than it takes to run).
        conn.execute("SET plan_cache_mode = force_generic_plan")
        if self.options.synchronous_commit:
            conn.execute("SELECT set_config('synchronous_commit', %s, false)", (self.options.synchronous_commit,))

    # -- readiness -----------------------------------------------------------------------------

    def ensure_ready(self) -> None:
        """Connect once and check the schema; migrate it when ``auto_migrate`` is on."""
        if self._ready:
            return
        with self._ready_lock:
            if self._ready:
                return
            with self.connection() as conn:
                version = _schema.current_version(conn, self.options.schema)
                if version < _schema.LATEST:
                    if not self.options.auto_migrate:
                        schema = self.options.schema
                        raise SchemaNotReady(
                            f"schema {schema!r} in {self.safe_url} has no pgbroker tables: check the schema name, "
                            f"or create them with `pgbroker migrate --schema {schema}`" if version == 0 else
                            f"schema {schema!r} in {self.safe_url} is at version {version}, pgbroker needs "
                            f"{_schema.LATEST}: run `pgbroker migrate` (or enable the auto_migrate transport option)"
                        )
                    applied = _schema.migrate(conn, self.options.schema)
                    if applied:
                        logger.info("pgbroker: applied migrations %s to %s", applied, self.safe_url)
            self._ready = True

    # -- statements ----------------------------------------------------------------------------

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[psycopg.Connection]:
        """Borrow a pooled connection, waiting at most ``timeout`` seconds for one (default
        ``pool_timeout``); driver errors leave as DatabaseUnavailable when the server cannot
        be reached (with the URL's password masked)."""
        if not self._opened:  # lazily: creating a transport (e.g. `celery report`) connects nothing
            self.pool.open(wait=False)
            self._opened = True
        try:
            with self.pool.connection(timeout=timeout) as conn:
                yield conn
        except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable):
            raise  # a statement or lock timeout, or a cancel: the statement's fate, not an outage
        except psycopg.errors.InsufficientPrivilege as exc:
            role = conninfo_to_dict(self.conninfo).get("user") or os.environ.get("PGUSER") or "this role"
            raise PermissionDenied.of(exc, role, self.options.schema, f" in {self.safe_url}") from exc
        except psycopg.OperationalError as exc:
            # After a server restart every idle pooled connection is dead: replace them
            # now so that the caller's retry (kombu's, Celery's) gets a working one.
            try:
                self.pool.check()
            except Exception:  # pragma: no cover - the server may still be down
                pass
            why = self.pool.last_error
            why = f" (last connection attempt: {str(why).strip()})" if why is not None and why is not exc else ""
            raise DatabaseUnavailable(f"cannot use {self.safe_url}: {exc}{why}") from exc

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        with self.connection() as conn, conn.transaction():
            yield conn

    def fetchall(self, name: str, conn: psycopg.Connection | None = None, **params: Any) -> list[dict]:
        """Run the named query and return its rows as dicts.

        Inside ``pgbroker.atomic()`` (or a Django atomic block when configured) the
        writes of a publish run in the caller's transaction instead of on the pool.
        """
        if conn is None:
            binding = _enqueue.binding_for(self.options)
            if binding is not None:
                rows = binding.fetchall(self, name, params)
                if rows is not None:
                    return rows
        if conn is not None:
            with conn.cursor(row_factory=dict_row) as cur:
                cur.execute(self.q[name], params)
                return cur.fetchall() if cur.description else []
        with self.connection() as c:
            return self.fetchall(name, c, **params)

    def fetchone(self, name: str, conn: psycopg.Connection | None = None, **params: Any) -> dict | None:
        rows = self.fetchall(name, conn, **params)
        return rows[0] if rows else None

    def identity(self, refresh: bool = False) -> tuple:
        """What ``database_identity`` says of this database (queried once, or again on
        ``refresh``: a server restart changes its start time)."""
        if self._identity is None or refresh:
            with self.connection() as conn:
                self._identity = tuple(self.fetchall("database_identity", conn)[0].values())
        return self._identity

    def run_in_transaction(self, statements: Sequence[tuple[str, dict]]) -> list[dict]:
        """Run named statements in one transaction and one round trip; rows of the last one.
        Always on the pool (never in a caller's ``pgbroker.atomic()`` transaction); a lone
        statement runs as its own transaction, without BEGIN/COMMIT around it."""
        with self.connection() as conn:
            if len(statements) == 1:
                return self.fetchall(statements[0][0], conn, **statements[0][1])
            with conn.cursor(row_factory=dict_row) as cur:
                with conn.pipeline(), conn.transaction():
                    for name, params in statements:
                        cur.execute(self.q[name], params)
                return cur.fetchall() if cur.description else []

    def listener(self) -> "Listener":
        return Listener(self)

    def close(self) -> None:
        self.pool.close()
        with _registry_lock:
            for key, db in list(_registry.items()):
                if db is self:
                    del _registry[key]


def database_for(app, url: str | None = None) -> Database:
    """The Database of a Celery app's pgbroker broker: its URL (or ``url``) and its
    ``broker_transport_options`` (schema, pool, …)."""
    options = Options.from_mapping(app.conf.broker_transport_options)
    return Database.get(conninfo_from_url(url or app.connection_for_write().hostname), options)


class Listener:
    """A dedicated autocommit connection that LISTENs to queue channels.

    :meth:`wait` blocks on the server socket and on a wake-up pipe (so another
    thread, e.g. an ack that frees prefetch room, can interrupt it) and never
    busy-polls.
    """

    def __init__(self, db: Database):
        self.db = db
        self._conn: psycopg.Connection | None = None
        self._channels: set[str] = set()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(self.db.conninfo, **self.db.connect_kwargs)
                for channel in self._channels:
                    self._conn.execute(f'LISTEN "{channel}"')
            except psycopg.OperationalError as exc:
                self.close_connection()
                raise DatabaseUnavailable(f"cannot LISTEN on {self.db.safe_url}: {exc}") from exc
        return self._conn

    def listen(self, channels: Sequence[str]) -> None:
        new = [c for c in channels if c not in self._channels]
        self._channels.update(new)
        if self._conn is not None and not self._conn.closed:
            for channel in new:  # channel names are our own md5-based identifiers
                self._conn.execute(f'LISTEN "{channel}"')

    def unlisten(self, channels: Sequence[str]) -> None:
        for channel in channels:
            if channel in self._channels:
                self._channels.discard(channel)
                if self._conn is not None and not self._conn.closed:
                    self._conn.execute(f'UNLISTEN "{channel}"')

    def wake(self) -> None:
        """Interrupt a :meth:`wait` in progress (safe from any thread)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full, the waiter will wake anyway

    def fds(self) -> tuple[int, int]:
        """(LISTEN socket, wake-up pipe): what :meth:`wait` selects on."""
        return self._connection().fileno(), self._wake_r

    def _drain_wake_pipe(self) -> bool:
        """Empty the wake-up pipe; True if a wake-up was pending."""
        woken = False
        try:
            while os.read(self._wake_r, 4096):
                woken = True
        except BlockingIOError:
            pass
        return woken

    def _notifies(self) -> list[psycopg.Notify]:
        try:
            return list(self._connection().notifies(timeout=0))
        except (psycopg.OperationalError, ValueError, OSError) as exc:
            self.close_connection()
            raise DatabaseUnavailable(f"LISTEN connection to {self.db.safe_url} lost: {exc}") from exc

    def pending(self) -> list[psycopg.Notify]:
        """Without blocking, take the notifications received (wake-ups stay pending)."""
        return self._notifies()

    def consume(self) -> list[psycopg.Notify]:
        """Without blocking, take the notifications received and empty the wake-up pipe."""
        self._drain_wake_pipe()
        return self._notifies()

    def wait(self, timeout: float) -> list[psycopg.Notify]:
        """Block up to ``timeout`` seconds for a notification or a wake-up.

        Returns the notifications received (empty on timeout or wake-up).
        Raises DatabaseUnavailable when the LISTEN connection is lost.
        """
        # A wake-up sent before this call must end it at once (an ack that freed
        # prefetch room just before we got here), and notifications may already sit
        # in the driver's buffer (read along with an earlier reply), where select()
        # cannot see them.
        woken = self._drain_wake_pipe()
        notified = self._notifies()
        if notified or woken:
            return notified
        try:
            select.select(list(self.fds()), [], [], max(timeout, 0))
        except (ValueError, OSError) as exc:
            self.close_connection()
            raise DatabaseUnavailable(f"LISTEN connection to {self.db.safe_url} lost: {exc}") from exc
        return self.consume()

    def close_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # pragma: no cover - best effort on a broken socket
                pass
            self._conn = None

    def close(self) -> None:
        self.close_connection()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
