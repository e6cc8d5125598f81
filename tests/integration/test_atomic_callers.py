"""pgbroker.atomic() with callers configured their own way: row factories and cursor
classes, autocommit engines, SQLAlchemy savepoints, a revoke inside the transaction."""
from __future__ import annotations

import psycopg
import pytest
from celery import Celery
from psycopg.rows import dict_row

import pgbroker
from pgbroker.unique import duplicate_of

TASK = "tests.atomic.noop"


@pytest.fixture
def app(broker_url, transport_options, db):
    app = Celery("atomic-callers", broker=broker_url, backend=broker_url, set_as_current=False)
    app.conf.update(broker_transport_options=transport_options)
    app.backend.db  # this process's result backend on the broker's database
    yield app
    app.close()


def task_ids(sql) -> list[str]:
    return [r["task_id"] for r in sql("SELECT task_id FROM {schema}.jobs ORDER BY id")]


def sqlalchemy_engine(database_url, **kwargs):
    from sqlalchemy import create_engine

    return create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1), **kwargs)


def test_a_callers_row_factory_or_cursor_class_does_not_matter(app, sql, database_url):
    import psycopg2
    import psycopg2.extras

    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        with pgbroker.atomic(conn):
            first = app.send_task(TASK)
    conn2 = psycopg2.connect(database_url, cursor_factory=psycopg2.extras.RealDictCursor)
    try:
        with pgbroker.atomic(conn2):
            second = app.send_task(TASK)
        conn2.commit()
    finally:
        conn2.close()
    assert task_ids(sql) == [first.id, second.id]


def test_an_autocommit_sqlalchemy_engine_is_not_a_transaction(app, sql, database_url):
    engine = sqlalchemy_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            with pytest.raises(pgbroker.NotInTransaction):
                with pgbroker.atomic(conn):
                    app.send_task(TASK)
    finally:
        engine.dispose()
    assert task_ids(sql) == []


def test_a_rolled_back_session_savepoint_takes_its_jobs_with_it(app, sql, database_url):
    from sqlalchemy.orm import Session

    engine = sqlalchemy_engine(database_url)
    try:
        with Session(engine) as session, session.begin(), pgbroker.atomic(session):
            kept = app.send_task(TASK)
            savepoint = session.begin_nested()  # SQLAlchemy sends SAVEPOINT only when asked for the connection
            app.send_task(TASK)
            savepoint.rollback()
            after = app.send_task(TASK)
    finally:
        engine.dispose()
    assert task_ids(sql) == [kept.id, after.id]


def test_a_scoped_session_binds_to_this_threads_session(app, sql, database_url):
    from sqlalchemy.orm import Session, scoped_session, sessionmaker

    engine = sqlalchemy_engine(database_url)
    db_session = scoped_session(sessionmaker(engine))  # Flask-SQLAlchemy's db.session
    try:
        with pgbroker.atomic(db_session):
            dropped = app.send_task(TASK)
        db_session.rollback()
        with pgbroker.atomic(db_session):
            kept = app.send_task(TASK)
        assert task_ids(sql) == []  # not committed yet
        db_session.commit()
        with Session(engine, autobegin=False) as idle, pytest.raises(pgbroker.NotInTransaction):
            with pgbroker.atomic(idle):
                app.send_task(TASK)
    finally:
        db_session.remove()
        engine.dispose()
    assert task_ids(sql) == [kept.id] and dropped.id != kept.id


def test_a_revoke_inside_a_rolled_back_transaction_still_answers_waiters(app, sql, database_url):
    """The revoke cancels the job for good on pgbroker's pool; its REVOKED result is
    written there too, so whoever waits for the task gets an answer."""
    job = app.send_task(TASK)
    with psycopg.connect(database_url) as conn:
        with pgbroker.atomic(conn):
            app.control.revoke(job.id)
        conn.rollback()
    assert sql("SELECT state FROM {schema}.jobs WHERE task_id = %s", job.id)[0]["state"] == "cancelled"
    assert app.AsyncResult(job.id).state == "REVOKED"


def test_after_commit_follows_savepoints_and_rollbacks(app, sql, database_url):
    """foreign='after_commit' on a Session of another database: a job published in a
    savepoint goes out only if the savepoint is released and the whole transaction
    commits, whatever order SQLAlchemy reports the rollbacks in."""
    from sqlalchemy import create_engine, make_url
    from sqlalchemy.orm import Session

    engine = create_engine(make_url(database_url).set(drivername="postgresql+psycopg", database="postgres"))
    published = {}

    def publish(session, name):
        with pgbroker.atomic(session, foreign="after_commit"):
            published[name] = app.send_task(TASK).id

    try:
        with Session(engine) as session:
            with session.begin():  # savepoint rolled back, transaction committed
                publish(session, "kept")
                with session.begin_nested() as savepoint:
                    publish(session, "in rolled back savepoint")
                    savepoint.rollback()
            with session.begin():  # savepoint released, transaction rolled back
                with session.begin_nested():
                    publish(session, "in released savepoint, rolled back")
                session.rollback()
            with session.begin():  # nested savepoints released, transaction committed
                with session.begin_nested():
                    with session.begin_nested():
                        publish(session, "in released savepoints")
    finally:
        engine.dispose()
    assert set(task_ids(sql)) == {published["kept"], published["in released savepoints"]}


def test_a_fanout_publish_joins_the_transaction_but_remote_control_does_not(app, sql, database_url, broker_url,
                                                                             transport_options):
    """A message to a fanout exchange (Celery's Broadcast queues) is written in the
    caller's transaction like any other; a remote-control broadcast (a revoke, a ping)
    goes out at once, whatever becomes of the transaction."""
    from kombu import Connection, Exchange, Queue

    broadcast, pidbox = Exchange("bcast", type="fanout"), Exchange("celery.pidbox", type="fanout")
    with Connection(broker_url, transport_options=transport_options) as kombu_conn:
        channel = kombu_conn.default_channel
        Queue("bcast.w1", broadcast, channel=channel).declare()
        Queue("w1.celery.pidbox", pidbox, channel=channel).declare()
        producer = kombu_conn.Producer()
        with psycopg.connect(database_url) as conn:
            with pgbroker.atomic(conn):
                producer.publish({"n": 1}, exchange=broadcast, declare=[broadcast])
                app.control.revoke("some-task", connection=kombu_conn)
            conn.rollback()
            with pgbroker.atomic(conn):
                producer.publish({"n": 2}, exchange=broadcast)
            conn.commit()
    rows = sql("SELECT queue, body FROM {schema}.jobs ORDER BY id")
    assert [r["queue"] for r in rows] == ["w1.celery.pidbox", "bcast.w1"]


def test_an_async_block_that_raises_still_writes_its_jobs(app, sql, database_url):
    """As with a sync atomic(), the jobs published before an exception follow the
    transaction: kept when the caller handles the error and commits, gone with a
    transaction that failed (and the caller's own error is what propagates)."""
    import asyncio

    async def run():
        conn = await psycopg.AsyncConnection.connect(database_url)
        try:
            await conn.execute("SELECT 1")  # the caller's own work has begun the transaction
            try:
                async with pgbroker.atomic(conn):
                    kept = app.send_task(TASK)
                    raise ValueError("handled by the caller")
            except ValueError:
                pass
            await conn.commit()
            with pytest.raises(ValueError):  # a transaction begun and rolled back in the block
                async with pgbroker.atomic(conn):
                    async with conn.transaction():
                        app.send_task(TASK)
                        raise ValueError("rolls the transaction back")
            await conn.commit()  # nothing of that block to commit
            with pytest.raises(psycopg.errors.DivisionByZero):
                async with pgbroker.atomic(conn):
                    app.send_task(TASK)
                    await conn.execute("SELECT 1/0")
            await conn.rollback()
            # an asyncio task created in the block that publishes after it (its context
            # still names the block's binding) publishes on the pool, as outside a block
            late = [None]

            async def publish_late():
                late[0] = app.send_task(TASK).id

            async with pgbroker.atomic(conn):
                task = asyncio.create_task(publish_late())
            await task
            await conn.rollback()
        finally:
            await conn.close()
        return kept.id, late[0]

    kept, late = asyncio.run(run())
    assert task_ids(sql) == [kept, late]


def test_an_async_psycopg_block_writes_each_publish_at_once(app, sql, database_url, schema):
    """On a psycopg AsyncConnection a publish joins the transaction when it is made: the
    caller's own queries see it, a rolled-back savepoint takes it, a commit inside the
    block needs no flush, and a publish on an idle connection begins a transaction as
    psycopg would (with the connection's isolation level)."""
    import asyncio

    async def run():
        conn = await psycopg.AsyncConnection.connect(database_url)
        count = f'SELECT count(*) FROM "{schema}".jobs'
        try:
            await conn.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
            async with pgbroker.atomic(conn):
                kept = app.send_task(TASK)  # the connection was idle: this begins the transaction
                assert (await (await conn.execute("SHOW transaction_isolation")).fetchone())[0] == "serializable"
                assert (await (await conn.execute(count)).fetchone())[0] == 1  # seen by the caller at once
                with pytest.raises(ValueError):
                    async with conn.transaction():  # a savepoint
                        app.send_task(TASK)
                        raise ValueError("rolls the savepoint back")
                async with conn.transaction():
                    released = app.send_task(TASK, args=["once"], unique={})
                # written at once, so a duplicate is known at publish time, as in a sync block
                assert duplicate_of(app.send_task(TASK, args=["once"], unique={}).id) == released.id
                await conn.commit()  # inside the block: nothing waits for its end
                app.send_task(TASK)  # a new transaction, rolled back below
            await conn.rollback()
        finally:
            await conn.close()
        return [kept.id, released.id]

    assert asyncio.run(run()) == task_ids(sql)


@pytest.mark.parametrize("caller", ["session", "connection"])
def test_a_savepoint_rolled_back_in_an_async_sqlalchemy_block_takes_its_publishes(caller, app, sql, database_url):
    """SQLAlchemy's async objects: publishes are collected, and written at the block's
    end without those of a savepoint rolled back meanwhile (released ones stay)."""
    import asyncio

    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def run():
        engine = create_async_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            async with AsyncSession(engine) as session, engine.connect() as connection:
                caller_obj = session if caller == "session" else connection
                await caller_obj.begin()
                async with pgbroker.atomic(caller_obj):
                    kept = app.send_task(TASK)
                    with pytest.raises(ValueError):
                        async with caller_obj.begin_nested():
                            app.send_task(TASK)
                            async with caller_obj.begin_nested():  # released into the rolled-back one
                                app.send_task(TASK)
                            raise ValueError("rolls the savepoint back")
                    async with caller_obj.begin_nested():
                        released = app.send_task(TASK)
                await caller_obj.commit()
        finally:
            await engine.dispose()
        return [kept.id, released.id]

    assert asyncio.run(run()) == task_ids(sql)


def test_a_caller_on_the_unix_socket_joins_a_broker_reached_over_tcp(app, sql, database_url):
    """Django's default HOST="" connects over the Unix socket; the broker URL names a host:
    both reach the same database, so the caller's transaction holds the job."""
    socket_url = psycopg.conninfo.make_conninfo(database_url, host="/var/run/postgresql")
    try:
        conn = psycopg.connect(socket_url)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no password login over the Unix socket here (.ci/run allows it): {exc}")
    with conn:
        with pgbroker.atomic(conn):
            kept = app.send_task(TASK)
    assert task_ids(sql) == [kept.id]


def test_a_foreign_django_test_database_gets_a_hint(db):
    """Django's test runner renames the app's database test_<NAME> while the broker URL
    still names <NAME>: the ForeignTransaction says what to do about it."""
    from pgbroker.enqueue import _foreign_error

    name, *rest = db.identity()
    error = _foreign_error(db, (f"test_{name}", *rest), "Django connection")
    assert isinstance(error, pgbroker.ForeignTransaction)
    assert f"Django's test runner the app's database is 'test_{name}'" in str(error)
    assert "sandbox(django_database_url())" in str(error)
    assert "test runner" not in str(_foreign_error(db, ("other", *rest), "Django connection"))
