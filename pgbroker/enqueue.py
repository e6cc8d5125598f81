"""Publishing inside the caller's database transaction.

``.delay()``/``apply_async()`` write their job with the caller's connection, so the
job is part of the caller's transaction: rollback and it never existed, commit and
it runs (its NOTIFY is sent on commit too)::

    with Session(engine) as session, session.begin():
        session.add(order)
        with pgbroker.atomic(session):
            charge.delay(order.id)           # an AsyncResult with its id, at once

``atomic()`` accepts a SQLAlchemy ``Session``/``Connection``, a Django connection
(or alias), a psycopg 3 or psycopg2 connection, and — with ``async with`` — a
SQLAlchemy ``AsyncSession``/``AsyncConnection`` or a psycopg ``AsyncConnection``.
No framework is imported unless its object is passed in.

While bound, the writes a publish makes in the broker's database from this thread
(or asyncio task) go through the caller's connection: job rows, chord counters and
saved group results of a canvas are written atomically with it (queue declarations
and reads still use pgbroker's pool). The
caller's connection must reach the broker's own database (checked once per
connection); otherwise :class:`~pgbroker.errors.ForeignTransaction` is raised, or,
with ``foreign="after_commit"``, the publishes wait for the caller's commit and go
out through pgbroker's own pool (SQLAlchemy ``Session`` and Django only: they are
the callers that say when they commit).

Async callers: inside ``async with atomic(aconn)`` on a psycopg ``AsyncConnection``
each publish is written at once on that connection, synchronously (Celery publishes
synchronously), so it joins whatever transaction or savepoint is open, as a sync
caller's does. On a SQLAlchemy ``AsyncSession``/``AsyncConnection`` the publishes are
collected and written with the caller's connection when the block exits, with or
without an exception (still inside the caller's transaction, before its commit; to
commit inside the block, ``await binding.flush()`` first); a savepoint rolled back in
the block takes the publishes made inside it.
"""
from __future__ import annotations

import logging
import sys
import weakref
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import ConfigurationError, ForeignTransaction, NotInTransaction, TransactionFailed

if TYPE_CHECKING:  # pragma: no cover
    from .db import Database

#: Statements that publishing runs (jobs, saved group results, chord sizes): the ones
#: that join the caller's transaction, or wait for an async block's end or its commit.
#: Everything else (queue declarations, reads) runs on pgbroker's pool as usual.
DEFERRABLE = frozenset({"enqueue", "enqueue_many", "enqueue_unique", "enqueue_fanout", "result_set",
                        "chord_size_set"})
#: Also joined by a sync binding: writes whose effect must follow the caller's fate.
JOINED = DEFERRABLE | {"result_delete", "result_expire", "unique_holders"}

logger = logging.getLogger(__name__)

_binding: ContextVar["Binding | None"] = ContextVar("pgbroker_binding", default=None)
#: Database identity of each caller connection already checked (by DB-API connection).
_identities: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()


class Deferred(list):
    """What a statement returns when its write waits for the end of an async block or
    the caller's commit: no rows yet (not "nothing was stored")."""


def current() -> "Binding | None":
    """The binding in effect for this thread / asyncio task, if any."""
    return _binding.get()


# -- caller connections -----------------------------------------------------------------------


def _package(obj: Any) -> str:
    """The top-level package that defines ``obj``'s class (nothing is imported to tell)."""
    return (type(obj).__module__ or "").split(".")[0]


def _dbapi_rows(cursor) -> list[dict]:
    if cursor.description is None:
        return []
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _run(raw, sql: str, params: dict) -> list[dict]:
    """Run a statement on a DB-API connection, inside whatever transaction it has open.

    On psycopg 3 a plain server-binding cursor is used whatever cursor class the
    framework configured (Django's binds client-side), and the statement is prepared
    at once: planned once per connection, not per publish. A connection that turned
    preparing off (``prepare_threshold=None``, Django's default) keeps it off.
    """
    if _package(raw) == "psycopg":
        import psycopg
        from psycopg.rows import tuple_row

        with psycopg.Cursor(raw, row_factory=tuple_row) as cur:  # whatever row factory the caller set
            cur.execute(sql, params, prepare=True)
            return _dbapi_rows(cur)
    options = {}
    if _package(raw) == "psycopg2":
        import psycopg2.extensions

        options["cursor_factory"] = psycopg2.extensions.cursor  # not the caller's dict cursor
    with raw.cursor(**options) as cur:
        cur.execute(sql, params)
        return _dbapi_rows(cur)


class _Psycopg:
    """A psycopg 3 connection (sync)."""

    def __init__(self, conn):
        self.raw = conn

    def execute(self, sql: str, params: dict) -> list[dict]:
        return _run(self.raw, sql, params)

    def in_transaction(self) -> bool:
        from psycopg import pq

        status = self.raw.info.transaction_status
        if status == pq.TransactionStatus.INERROR:
            raise NotInTransaction("the caller's transaction has already failed (roll it back first)")
        return status == pq.TransactionStatus.INTRANS or not self.raw.autocommit

    def name(self) -> str:
        return "psycopg connection"


class _Psycopg2(_Psycopg):
    """A psycopg2 connection."""

    def in_transaction(self) -> bool:
        status = self.raw.get_transaction_status()  # 0 idle, 1 active, 2 in transaction, 3 in error
        if status == 3:
            raise NotInTransaction("the caller's transaction has already failed (roll it back first)")
        return status == 2 or not self.raw.autocommit

    def name(self) -> str:
        return "psycopg2 connection"


class _SQLAlchemy:
    """A SQLAlchemy Session or Connection.

    A Session is asked for its connection at every write: that begins its transaction
    when none is open, and emits a ``begin_nested()`` savepoint that SQLAlchemy has
    not sent yet, so a publish inside it is rolled back with it.
    """

    def __init__(self, conn, session=None):
        self.conn = conn
        self.session = session
        self.raw = conn.connection.driver_connection

    def _current(self):
        if self.session is not None:
            self.conn = self.session.connection()
            self.raw = self.conn.connection.driver_connection
        elif not self.conn.in_transaction():
            self.conn.begin()  # what SQLAlchemy does on a caller's first statement (autobegin)
        return self.raw

    def execute(self, sql: str, params: dict) -> list[dict]:
        return _run(self._current(), sql, params)

    def in_transaction(self) -> bool:
        """False when the driver connection commits every statement (an engine or
        connection with ``isolation_level="AUTOCOMMIT"``)."""
        driver = _driver(self._current())
        return driver.in_transaction() if driver is not None else True

    def name(self) -> str:
        return "SQLAlchemy session" if self.session is not None else "SQLAlchemy connection"


class _Django:
    """A Django database connection (psycopg 3 or psycopg2 underneath)."""

    def __init__(self, conn):
        self.conn = conn
        conn.ensure_connection()
        self.raw = conn.connection

    def execute(self, sql: str, params: dict) -> list[dict]:
        return _run(self.raw, sql, params)

    def in_transaction(self) -> bool:
        return self.conn.in_atomic_block or not self.conn.get_autocommit()

    def name(self) -> str:
        return f"Django connection {self.conn.alias!r}"


def _driver(obj: Any):
    """The adapter of a psycopg 3 / psycopg2 connection, or None when ``obj`` is not one."""
    package = _package(obj)
    if package == "psycopg2":
        return _Psycopg2(obj)
    if package == "psycopg" and type(obj).__name__ == "Connection":
        return _Psycopg(obj)
    return None


def _unwrap(obj: Any):
    """An adapter for a sync caller connection, or None when ``obj`` is not one."""
    driver = _driver(obj)
    if driver is not None:
        return driver
    package = _package(obj)
    if package == "sqlalchemy":
        from sqlalchemy.engine import Connection
        from sqlalchemy.orm import Session, scoped_session

        if isinstance(obj, scoped_session):  # Flask-SQLAlchemy's db.session: this thread's session
            obj = obj()
        if isinstance(obj, Session):
            from sqlalchemy.exc import InvalidRequestError

            try:
                return _SQLAlchemy(obj.connection(), session=obj)
            except InvalidRequestError as exc:  # Session(autobegin=False) outside session.begin()
                raise NotInTransaction(f"pgbroker.atomic() needs the session's transaction: {exc}") from None
        if isinstance(obj, Connection):
            return _SQLAlchemy(obj)
    if package == "django":
        return _Django(obj)
    if isinstance(obj, str) and "django.db" in sys.modules:  # a Django database alias
        from django.db import connections

        return _Django(connections[obj])
    return None


def _unwrap_async(obj: Any):
    package = _package(obj)
    if package == "psycopg" and type(obj).__name__ == "AsyncConnection":
        return _AsyncPsycopg(obj)
    if package == "sqlalchemy":
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

        if isinstance(obj, (AsyncSession, AsyncConnection)):
            return _AsyncSQLAlchemy(obj)
    return None


class _AsyncPsycopg:
    """A psycopg ``AsyncConnection``: statements run at once, synchronously, on its libpq
    connection (Celery publishes synchronously; a publish blocks the event loop for one
    round trip, as one on pgbroker's pool does), so a job is inside whatever transaction
    or savepoint is open when it is published, exactly as with a sync connection."""

    def __init__(self, conn):
        self.raw = conn

    def execute(self, sql: str, params: dict) -> list[dict]:
        from psycopg import AsyncClientCursor, pq
        from psycopg.adapt import Transformer

        conn, pgconn, encoding = self.raw, self.raw.pgconn, self.raw.info.encoding
        if pgconn.transaction_status == pq.TransactionStatus.IDLE and not conn.autocommit:
            self._run(pgconn, _begin_command(conn), encoding)  # what psycopg sends before a statement
        query = AsyncClientCursor(conn).mogrify(sql, params).encode(encoding)  # values bound client-side
        result = self._run(pgconn, query, encoding)
        if result.status != pq.ExecStatus.TUPLES_OK:
            return []
        loader = Transformer(conn)
        loader.set_pgresult(result)
        names = [result.fname(i).decode(encoding) for i in range(result.nfields)]
        return [dict(zip(names, row)) for row in loader.load_rows(0, result.ntuples, tuple)]

    @staticmethod
    def _run(pgconn, query: bytes, encoding: str):
        import psycopg
        from psycopg import pq

        result = pgconn.exec_(query)  # libpq's blocking call, whatever mode psycopg set
        if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            raise psycopg.errors.error_from_result(result, encoding=encoding)
        return result

    def in_transaction(self) -> bool:
        return _Psycopg.in_transaction(self)  # same attributes on the async connection

    def name(self) -> str:
        return "psycopg AsyncConnection"


def _begin_command(conn) -> bytes:
    """The BEGIN psycopg sends when a statement starts a transaction on ``conn``."""
    from psycopg import IsolationLevel

    parts = ["BEGIN"]
    if conn.isolation_level is not None:
        parts.append("ISOLATION LEVEL " + IsolationLevel(conn.isolation_level).name.replace("_", " "))
    if conn.read_only is not None:
        parts.append("READ ONLY" if conn.read_only else "READ WRITE")
    if conn.deferrable is not None:
        parts.append("DEFERRABLE" if conn.deferrable else "NOT DEFERRABLE")
    return " ".join(parts).encode()


class _AsyncSQLAlchemy:
    """A SQLAlchemy ``AsyncSession``/``AsyncConnection``: publishes are collected and
    written when the block exits (SQLAlchemy's async connections cannot be used from
    Celery's synchronous publish). Each remembers the savepoints open when it was made:
    one rolled back in the meantime takes it with it.

    Savepoints are those of the session (``begin_nested()``, told by session events:
    a session emits its SAVEPOINT lazily) or of the connection (told by its events).
    """

    def __init__(self, obj):
        self.obj = obj
        self.conn = None
        self.raw = None
        self.rolled_back: set = set()
        self._savepoints: list[object] = []  # a connection's open ones, innermost last
        self._listeners: list[tuple] = []

    async def open(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.ext.asyncio import AsyncSession

        self.conn = await self.obj.connection() if isinstance(self.obj, AsyncSession) else self.obj
        self.raw = (await self.conn.get_raw_connection()).driver_connection
        if isinstance(self.obj, AsyncSession):
            targets = [(self.obj.sync_session, "after_soft_rollback", self._session_rollback)]
        else:
            if self.conn.sync_connection.get_nested_transaction() is not None:
                self._savepoints.append(object())  # begun before the block: ending in it counts too
            targets = [(self.conn.sync_connection, "savepoint", self._savepoint),
                       (self.conn.sync_connection, "release_savepoint", self._release),
                       (self.conn.sync_connection, "rollback_savepoint", self._rollback)]
        for target, name, fn in targets:
            event.listen(target, name, fn)
            self._listeners.append((target, name, fn))

    def close(self) -> None:
        from sqlalchemy import event

        for target, name, fn in self._listeners:
            event.remove(target, name, fn)
        self._listeners.clear()

    def scopes(self) -> tuple:
        """The savepoints open now (a publish made now is gone if one rolls back)."""
        from sqlalchemy.ext.asyncio import AsyncSession

        if not isinstance(self.obj, AsyncSession):
            return tuple(self._savepoints)
        scopes, transaction = [], self.obj.sync_session.get_nested_transaction()
        while transaction is not None:
            if transaction.nested:
                scopes.append(transaction)
            transaction = transaction.parent
        return tuple(scopes)

    def _session_rollback(self, session, previous_transaction) -> None:
        self.rolled_back.add(previous_transaction)

    # A connection's savepoints end innermost first (its event names a savepoint only
    # once it ends): each is a token on a stack.
    def _savepoint(self, conn, name) -> None:
        self._savepoints.append(object())

    def _release(self, conn, name, context) -> None:
        if self._savepoints:
            self._savepoints.pop()

    def _rollback(self, conn, name, context) -> None:
        if self._savepoints:
            self.rolled_back.add(self._savepoints.pop())

    async def execute(self, sql: str, params: dict) -> list[dict]:
        from sqlalchemy.ext.asyncio import AsyncSession

        if isinstance(self.obj, AsyncSession):
            self.conn = await self.obj.connection()  # emits a begin_nested() not sent yet
        result = await self.conn.exec_driver_sql(sql, params)
        return [dict(r) for r in result.mappings()] if result.returns_rows else []

    def in_transaction(self) -> bool:
        return True

    def transaction_open(self) -> bool:
        return self.obj.in_transaction()


# -- bindings ---------------------------------------------------------------------------------


def _is_retry(name: str, params: dict) -> bool:
    """A task's retry (``self.retry()``, ``autoretry_for``) is never part of a caller's
    transaction: raising Retry rolls that transaction back, which would take the retry
    with it and lose the task."""
    return name == "enqueue" and bool(params.get("retry"))


def _foreign_error(db: "Database", caller_identity: tuple, who: str) -> ForeignTransaction:
    mine = db.identity()
    hint = ""
    if caller_identity[0] == f"test_{mine[0]}":
        hint = (f" Under Django's test runner the app's database is {caller_identity[0]!r}: in a "
                f"TransactionTestCase, point the app at it with pgbroker.testing's "
                f"sandbox(django_database_url()).")
    return ForeignTransaction(
        f"cannot publish inside the transaction of this {who}: it is connected to database "
        f"{caller_identity[0]!r} (server started {caller_identity[2]}), while the broker "
        f"{db.safe_url} is database {mine[0]!r} (server started {mine[2]}). Jobs can only "
        f"join a transaction of the broker's own database; pass foreign='after_commit' to "
        f"publish after the commit instead (SQLAlchemy Session and Django only).{hint}"
    )


class Binding:
    """A caller's open transaction that pgbroker statements join (see :func:`atomic`)."""

    def __init__(self, adapter, foreign: str = "error"):
        self.adapter = adapter
        self.foreign = foreign

    def _identity(self, db: "Database") -> tuple:
        raw = self.adapter.raw
        identity = _identities.get(raw)
        if identity is None:
            rows = self._execute_raw(db.q["database_identity"], {})
            identity = _identities[raw] = tuple(rows[0].values())
        return identity

    def _execute_raw(self, sql: str, params: dict) -> list[dict]:
        try:
            return self.adapter.execute(sql, params)
        except Exception as exc:
            raise TransactionFailed(
                f"writing to the caller's transaction ({self.adapter.name()}) failed: {exc}"
            ) from exc

    def fetchall(self, db: "Database", name: str, params: dict) -> list[dict] | None:
        """Run a named statement in the caller's transaction; None: not ours, use the pool."""
        if name not in JOINED or _is_retry(name, params):
            return None
        if not self.adapter.in_transaction():
            raise NotInTransaction(
                f"pgbroker.atomic() needs an open transaction on the {self.adapter.name()} "
                f"(it is in autocommit mode and no transaction was begun; in a commit hook such as "
                f"delay_on_commit() the transaction has already committed: open pgbroker.atomic() "
                f"inside the transaction, or publish outside it)"
            )
        identity = self._identity(db)
        if identity != db.identity() and identity != db.identity(refresh=True):
            if self.foreign != "after_commit":
                raise _foreign_error(db, identity, self.adapter.name())
            if name not in DEFERRABLE:
                return None
            self._defer_until_commit(db, name, params)
            return Deferred()
        return self._execute_raw(db.q[name], params)

    def _defer_until_commit(self, db: "Database", name: str, params: dict) -> None:
        run = lambda: db.fetchall(name, **params)  # noqa: E731 - runs with no binding in effect
        adapter = self.adapter
        if isinstance(adapter, _Django):
            from django.db import transaction

            transaction.on_commit(_unbound(run), using=adapter.conn.alias)
        elif isinstance(adapter, _SQLAlchemy) and adapter.session is not None:
            _after_session_commit(adapter.session, _unbound(run))
        else:
            raise ForeignTransaction(
                f"foreign='after_commit' needs a SQLAlchemy Session or a Django connection to know "
                f"when the transaction commits; a {adapter.name()} does not say"
            )


class AsyncBinding(Binding):
    """The binding of an ``async with atomic(...)`` block on a psycopg ``AsyncConnection``:
    publishes join the caller's transaction at once, as in a sync block."""

    def __init__(self, adapter):
        super().__init__(adapter)
        #: Set when the block exits: an asyncio task created inside it that publishes
        #: later (its context still names this binding) publishes on the pool.
        self.closed = False

    def fetchall(self, db: "Database", name: str, params: dict) -> list[dict] | None:
        return None if self.closed else super().fetchall(db, name, params)

    async def flush(self) -> None:
        """Write the publishes collected so far (none here: each was written at once)."""

    async def finish(self, raised: bool) -> None:
        """The block exited (``raised``: with an exception)."""
        self.closed = True


class CollectingBinding(AsyncBinding):
    """The binding of an ``async with atomic(...)`` block on a SQLAlchemy async session or
    connection: publishes are collected, each with the savepoints open when it was made,
    and written when the block exits, minus those of a savepoint rolled back meanwhile."""

    def __init__(self, adapter: "_AsyncSQLAlchemy"):
        super().__init__(adapter)
        self.pending: list[tuple["Database", str, dict, tuple]] = []

    def fetchall(self, db: "Database", name: str, params: dict) -> list[dict] | None:
        if self.closed or name not in DEFERRABLE or _is_retry(name, params):
            return None  # reads and other statements run on the pool, as outside the block
        self.pending.append((db, name, params, self.adapter.scopes()))
        return Deferred()

    async def flush(self) -> None:
        """Write the block's collected publishes so far with the caller's connection (done
        when the block exits; call it first to commit inside the block)."""
        pending = [p for p in self.pending if self.adapter.rolled_back.isdisjoint(p[3])]
        self.pending.clear()
        if not pending:
            return
        if not self.adapter.in_transaction():
            raise NotInTransaction("pgbroker.atomic() needs an open transaction on the async connection")
        try:
            raw_identity = _identities.get(self.adapter.raw)
            if raw_identity is None:
                rows = await self.adapter.execute(pending[0][0].q["database_identity"], {})
                raw_identity = _identities[self.adapter.raw] = tuple(rows[0].values())
            for db, name, params, _ in pending:
                if raw_identity != db.identity() and raw_identity != db.identity(refresh=True):
                    raise _foreign_error(db, raw_identity, "async connection")
                await self.adapter.execute(db.q[name], params)
        except (ForeignTransaction, NotInTransaction):
            raise
        except Exception as exc:
            raise TransactionFailed(f"writing to the caller's transaction failed: {exc}") from exc

    async def finish(self, raised: bool) -> None:
        await super().finish(raised)
        try:
            await self._write(raised)
        finally:
            self.adapter.close()

    async def _write(self, raised: bool) -> None:
        if not raised:
            await self.flush()
            return
        # The block raised: its publishes still follow the transaction they were made in,
        # as in a sync atomic() (a caller that handles the error and commits keeps them),
        # unless it has already ended (a transaction begun and rolled back inside the
        # block takes them); the caller's own error is what propagates.
        if not self.adapter.transaction_open():
            return
        try:
            await self.flush()
        except NotInTransaction:
            pass  # the transaction failed: its jobs go with it
        except Exception as flush_exc:
            logger.warning("pgbroker: the jobs published in a failed `async with atomic()` block could "
                           "not be written to its transaction: %s", flush_exc)


class _Pool:
    """A binding that joins nothing: every statement runs on pgbroker's pool (it also
    keeps Django's ``atomic()`` from being joined through ``join_django_atomic``)."""

    def fetchall(self, db: "Database", name: str, params: dict) -> None:
        return None


@contextmanager
def unbound() -> Iterator[None]:
    """Within this block pgbroker's writes go to its pool, whatever transaction the
    caller has open: for writes whose effect must not depend on it."""
    token = _binding.set(_Pool())
    try:
        yield
    finally:
        _binding.reset(token)


def _unbound(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with no binding in effect (commit hooks may fire inside another atomic())."""

    def run():
        with unbound():
            fn()

    return run


def _after_session_commit(session, fn: Callable[[], Any]) -> None:
    """Run ``fn`` once the SQLAlchemy session commits the transaction open now.

    A savepoint that rolls back takes its callbacks with it; one that is released
    hands them to the transaction around it; the outermost transaction runs them
    after its commit. (SQLAlchemy reports a commit, of a savepoint too, while the
    transaction is still current, and the end of every transaction, after a
    rollback's end as well: a transaction that ends without a commit drops them.)
    """
    state = session.info.get("pgbroker_after_commit")
    if state is None:
        from sqlalchemy import event

        state = session.info["pgbroker_after_commit"] = {"callbacks": {}, "committed": set()}
        callbacks, committed = state["callbacks"], state["committed"]

        def on_commit(sess):
            committed.add(sess.get_nested_transaction() or sess.get_transaction())

        def on_end(sess, transaction):
            pending = callbacks.pop(transaction, None)
            was_committed = transaction in committed
            committed.discard(transaction)
            if not pending or not was_committed:
                return
            outer = transaction.parent
            while outer is not None and outer.parent is not None and not outer.nested:
                outer = outer.parent  # a savepoint or the root, not a flush's subtransaction
            if outer is not None:  # a released savepoint
                callbacks.setdefault(outer, []).extend(pending)
            else:
                for callback in pending:
                    callback()

        event.listen(session, "after_commit", on_commit)
        event.listen(session, "after_transaction_end", on_end)
    transaction = session.get_nested_transaction() or session.get_transaction()
    state["callbacks"].setdefault(transaction, []).append(fn)


class atomic:  # noqa: N801 - used like a function: `with pgbroker.atomic(session):`
    """Bind pgbroker's publishes to the caller's open transaction (see the module docs).

    ``conn``: a SQLAlchemy ``Session``/``Connection``, a Django connection or alias,
    a psycopg 3 / psycopg2 connection (``with``), or a SQLAlchemy ``AsyncSession`` /
    ``AsyncConnection`` / psycopg ``AsyncConnection`` (``async with``).
    ``foreign``: what to do when that connection is not to the broker's database:
    ``"error"`` (default, raise :class:`~pgbroker.errors.ForeignTransaction`) or
    ``"after_commit"`` (publish once the caller commits; Session and Django only).
    """

    def __init__(self, conn: Any, *, foreign: str = "error"):
        if foreign not in ("error", "after_commit"):
            raise ConfigurationError(f"foreign must be 'error' or 'after_commit', got {foreign!r}")
        self.conn = conn
        self.foreign = foreign
        self._token: Token | None = None
        self.binding: Binding | None = None

    def __enter__(self) -> Binding:
        adapter = _unwrap(self.conn)
        if adapter is None:
            if _unwrap_async(self.conn) is not None:
                raise TypeError(f"{type(self.conn).__name__} is asynchronous: use `async with pgbroker.atomic(...)`")
            raise TypeError(f"pgbroker.atomic() cannot bind to a {type(self.conn).__name__}")
        self.binding = Binding(adapter, self.foreign)
        self._token = _binding.set(self.binding)
        return self.binding

    def __exit__(self, *exc_info) -> None:
        _binding.reset(self._token)

    async def __aenter__(self) -> AsyncBinding:
        adapter = _unwrap_async(self.conn)
        if adapter is None:
            raise TypeError(f"`async with pgbroker.atomic()` needs an async connection, not {type(self.conn).__name__}")
        if self.foreign != "error":
            raise ConfigurationError("foreign='after_commit' is not available for async connections")
        if isinstance(adapter, _AsyncSQLAlchemy):
            await adapter.open()
            self.binding = CollectingBinding(adapter)
        else:
            self.binding = AsyncBinding(adapter)
        self._token = _binding.set(self.binding)
        return self.binding

    async def __aexit__(self, exc_type, exc, tb) -> None:
        _binding.reset(self._token)
        await self.binding.finish(raised=exc_type is not None)


def binding_for(options) -> Binding | None:
    """Where a publish's writes go: the ``pgbroker.atomic()`` block in effect, else the
    Django ``atomic()`` block the options join, else None (pgbroker's own pool)."""
    return current() or django_binding(options)


def django_binding(options) -> Binding | None:
    """The binding Django's open ``atomic()`` block implies, when the option asks for it."""
    if not options.join_django_atomic or "django.db" not in sys.modules:
        return None
    from django.db import connections

    conn = connections[options.django_database]
    if not conn.in_atomic_block or conn.vendor != "postgresql":
        return None
    return Binding(_Django(conn), options.foreign_transaction)
