"""`.delay()` inside the caller's transaction (pgbroker.atomic), against a real worker.

Every caller kind pgbroker binds to is exercised for commit (runs exactly once) and
rollback (no job, no result, no wake-up); then savepoints, a SIGKILLed caller, 100
concurrent transactions, a transaction held open, canvases, another database and
the cost in round trips.
"""
from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import psycopg
import pytest
from celery import chain, chord, group

import pgbroker
from pgbroker.message import channel_name
from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance

SYNC_CALLERS = ["psycopg", "psycopg2", "sqlalchemy-session", "sqlalchemy-connection", "django", "django-auto"]


@pytest.fixture
def transport_options(transport_options):
    """This process shares one Database per schema: it joins Django's atomic() blocks."""
    return dict(transport_options, join_django_atomic=True)


@pytest.fixture
def app(worker_env, broker_url, monkeypatch):
    """The tests' Celery app with results in Postgres (and Django's atomic() joined when asked)."""
    import importlib

    import tests.apps.celeryapp as module

    worker_env.update(RESULT_BACKEND=broker_url, RESULT_POLLING_INTERVAL="30", PGBROKER_JOIN_DJANGO="1")
    for k, v in worker_env.items():
        monkeypatch.setenv(k, v)
    module = importlib.reload(module)
    module.add.delay(0, 0).forget()  # the schema exists before the first transaction
    yield module
    module.app.close()


def _sqlalchemy_url(database_url: str, driver: str) -> str:
    return database_url.replace("postgresql://", f"postgresql+{driver}://", 1)


@pytest.fixture(scope="session")
def django_db(database_url):
    """Django configured on the test database (psycopg 3 underneath, as Django picks it when installed)."""
    import django
    from django.conf import settings

    if not settings.configured:
        info = psycopg.conninfo.conninfo_to_dict(database_url)
        settings.configure(DATABASES={"default": {
            "ENGINE": "django.db.backends.postgresql", "NAME": info.get("dbname"), "USER": info.get("user"),
            "PASSWORD": info.get("password") or "", "HOST": info.get("host") or "", "PORT": info.get("port") or "",
        }}, USE_TZ=True)
        django.setup()
    from django.db import connection

    yield connection
    connection.close()


@contextmanager
def caller_transaction(kind: str, database_url: str, commit: bool, request):
    """Open a transaction of ``kind`` and yield what to bind (None: Django joins by itself);
    commit or roll back on leaving."""
    if kind in ("psycopg", "psycopg2"):
        driver = __import__(kind)
        conn = driver.connect(database_url)
        try:
            yield conn
            conn.commit() if commit else conn.rollback()
        finally:
            conn.close()
    elif kind.startswith("sqlalchemy"):
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session

        engine = create_engine(_sqlalchemy_url(database_url, "psycopg"))
        try:
            if kind == "sqlalchemy-session":
                with Session(engine) as session:
                    session.begin()
                    yield session
                    session.commit() if commit else session.rollback()
            else:
                with engine.connect() as conn:
                    yield conn
                    conn.commit() if commit else conn.rollback()
        finally:
            engine.dispose()
    else:
        from django.db import transaction

        connection = request.getfixturevalue("django_db")

        class Rollback(Exception):
            pass

        try:
            with transaction.atomic():
                yield connection if kind == "django" else None
                if not commit:
                    raise Rollback
        except Rollback:
            pass


def _bound(target):
    return pgbroker.atomic(target) if target is not None else _nothing()


@contextmanager
def _nothing():
    yield


def _notified(conn, timeout: float) -> int:
    """Notifications that arrive on ``conn`` within ``timeout`` seconds of the last one."""
    count = 0
    while select.select([conn.fileno()], [], [], timeout)[0]:
        count += len(list(conn.notifies(timeout=0)))  # a partial packet reads as none: wait again
    return count


@pytest.mark.parametrize("kind", SYNC_CALLERS)
def test_commit_runs_once_and_rollback_leaves_nothing(kind, app, start_worker, database_url, schema, sql, request):
    listen = psycopg.connect(database_url, autocommit=True)
    listen.execute(f'LISTEN "{channel_name(schema, "celery")}"')
    with caller_transaction(kind, database_url, commit=False, request=request) as target:
        with _bound(target):
            lost = app.record.delay(f"{kind}-rolled-back")
    with caller_transaction(kind, database_url, commit=True, request=request) as target:
        with _bound(target):
            kept = app.record.delay(f"{kind}-committed")
        assert kept.id  # an AsyncResult with its id at once
        assert not sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", kept.id)  # invisible until commit
    # Wake-ups come in commit order: the committed publish's is the only one.
    assert _notified(listen, timeout=5) == 1
    listen.close()
    start_worker(pool="threads")
    assert kept.get(timeout=30) == f"{kind}-committed"
    assert sql("SELECT key FROM {schema}.effects") == [{"key": f"{kind}-committed"}]
    assert not sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", lost.id)
    assert not sql("SELECT 1 FROM {schema}.results WHERE task_id = %s OR key LIKE %s", lost.id, f"%{lost.id}%")
    assert lost.state == "PENDING"


@pytest.mark.parametrize("kind", ["sqlalchemy-async-session", "psycopg-async"])
def test_async_callers(kind, app, start_worker, database_url, sql):
    async def publish(commit: bool):
        if kind == "psycopg-async":
            conn = await psycopg.AsyncConnection.connect(database_url)
            try:
                async with pgbroker.atomic(conn):
                    result = app.record.delay(f"{kind}-{commit}")
                assert not sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", result.id)
                await (conn.commit() if commit else conn.rollback())
            finally:
                await conn.close()
            return result
        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

        engine = create_async_engine(_sqlalchemy_url(database_url, "psycopg"))
        try:
            async with AsyncSession(engine) as session:
                await session.begin()
                async with pgbroker.atomic(session):
                    result = app.record.delay(f"{kind}-{commit}")
                await (session.commit() if commit else session.rollback())
        finally:
            await engine.dispose()
        return result

    lost = asyncio.run(publish(False))
    kept = asyncio.run(publish(True))
    start_worker(pool="threads")
    assert kept.get(timeout=30) == f"{kind}-True"
    assert [r["key"] for r in sql("SELECT key FROM {schema}.effects")] == [f"{kind}-True"]
    assert not sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", lost.id)


def test_django_with_psycopg2(app, database_url, sql, tmp_path):
    """Django picks psycopg 3 whenever it can import it (and pgbroker needs it), so a
    subprocess hides psycopg 3 from Django to run it on psycopg2, as an install
    without psycopg 3 would."""
    script = tmp_path / "django_pg2.py"
    script.write_text(DJANGO_PSYCOPG2)
    env = dict(os.environ, TEST_DB_URL=database_url)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    driver, kept, lost = out.stdout.split()
    assert driver == "psycopg2"
    assert sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", kept)
    assert not sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", lost)


DJANGO_PSYCOPG2 = '''
import sys, psycopg
import tests.apps.celeryapp as m
saved = sys.modules.pop("psycopg")
sys.modules["psycopg"] = None          # Django's import of psycopg 3 fails: it takes psycopg2
import django
from django.conf import settings
info = psycopg.conninfo.conninfo_to_dict(__import__("os").environ["TEST_DB_URL"])
settings.configure(DATABASES={"default": {"ENGINE": "django.db.backends.postgresql",
    "NAME": info.get("dbname"), "USER": info.get("user"), "PASSWORD": info.get("password") or "",
    "HOST": info.get("host") or "", "PORT": info.get("port") or ""}})
django.setup()
from django.db import connection, transaction
connection.ensure_connection()
sys.modules["psycopg"] = saved
import pgbroker
class Rollback(Exception): pass
with transaction.atomic():
    with pgbroker.atomic(connection):
        kept = m.record.delay("django-psycopg2")
try:
    with transaction.atomic():
        with pgbroker.atomic("default"):
            lost = m.record.delay("django-psycopg2-lost")
        raise Rollback
except Rollback:
    pass
print(type(connection.connection).__module__.split(".")[0], kept.id, lost.id)
'''


def test_rolled_back_savepoint_drops_only_its_jobs(app, start_worker, database_url, sql):
    conn = psycopg.connect(database_url)
    with conn.transaction(), pgbroker.atomic(conn):
        before = app.record.delay("before")
        try:
            with conn.transaction():  # a savepoint
                inner = app.record.delay("inner")
                raise RuntimeError("undo the savepoint")
        except RuntimeError:
            pass
        after = app.record.delay("after")
    conn.close()
    start_worker(pool="threads")
    assert before.get(timeout=30) == "before" and after.get(timeout=30) == "after"
    assert sorted(r["key"] for r in sql("SELECT key FROM {schema}.effects")) == ["after", "before"]
    assert not sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", inner.id)


def test_sigkilled_caller_leaves_no_job(app, start_worker, database_url, sql, tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(
        "import psycopg, sys, time, pgbroker\n"
        "import tests.apps.celeryapp as m\n"
        "conn = psycopg.connect(sys.argv[1], application_name='pgbroker-test-hold')\n"
        "with pgbroker.atomic(conn):\n"
        "    r = m.record.delay('killed')\n"
        "print(r.id, flush=True)\n"
        "time.sleep(600)  # the transaction stays open until the test kills us\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), database_url], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    try:
        task_id = proc.stdout.readline().strip()
        assert task_id
        held = "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgbroker-test-hold'"
        assert sql(held)  # the transaction is open, holding the job row
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not sql(held), 30, what="the server to end the killed caller's session")
    finally:
        if proc.poll() is None:
            proc.kill()
    start_worker(pool="threads")
    control = app.record.delay("control")
    assert control.get(timeout=30) == "control"  # the worker is consuming
    assert not sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", task_id)
    assert [r["key"] for r in sql("SELECT key FROM {schema}.effects")] == ["control"]


def test_100_concurrent_transactions_half_roll_back(app, start_worker, database_url, sql):
    start_worker(pool="threads", concurrency=4)
    n = 100
    everyone_published = threading.Barrier(n)
    outcome: dict[str, bool] = {}
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        try:
            with psycopg.connect(database_url) as conn:
                with pgbroker.atomic(conn):
                    result = app.record.delay(f"txn-{i}")
                everyone_published.wait(60)  # all 100 transactions are open at once
                commit = i % 2 == 0
                conn.commit() if commit else conn.rollback()
                outcome[result.id] = commit
        except BaseException as exc:  # reported below
            errors.append(exc)
            everyone_published.abort()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    committed = {k for k, v in outcome.items() if v}
    assert len(committed) == n // 2
    wait_for(lambda: len(sql("SELECT 1 FROM {schema}.effects")) >= n // 2, 60, what="the committed half to run")
    ran = sql("SELECT key, count(*) AS runs FROM {schema}.effects GROUP BY key")
    assert sorted(r["key"] for r in ran) == sorted(f"txn-{i}" for i in range(0, n, 2))
    assert {r["runs"] for r in ran} == {1}
    jobs = sql("SELECT task_id, attempt FROM {schema}.jobs WHERE task_id = ANY(%s)", list(outcome))
    assert {j["task_id"] for j in jobs} == committed and {j["attempt"] for j in jobs} == {1}


def test_worker_never_sees_a_job_before_its_transaction_commits(app, start_worker, database_url, sql):
    start_worker(pool="threads")
    assert app.record.delay("warm").get(timeout=30) == "warm"  # the worker is consuming
    conn = psycopg.connect(database_url)
    with pgbroker.atomic(conn):
        result = app.started_at.delay("held")
    held_until = time.monotonic() + 3
    while time.monotonic() < held_until:  # the scenario: a transaction that stays open for seconds
        assert result.state == "PENDING"
        assert not sql("SELECT 1 FROM {schema}.effects WHERE key = 'held'")
        time.sleep(0.2)
    committing_at = time.time()
    conn.commit()
    conn.close()
    assert result.get(timeout=30) >= committing_at


def test_retry_from_inside_a_transaction_survives_its_rollback(app, start_worker, sql):
    start_worker(pool="threads")
    app.retries_in_transaction.delay("r")
    wait_for(lambda: sql("SELECT 1 FROM {schema}.effects WHERE key = 'r' AND what = 'done'"), 30,
             what="the retried task to finish")
    wait_for(lambda: sql("SELECT 1 FROM {schema}.effects WHERE key = 'r-follow-up-1'"), 30,
             what="the committed follow-up to run")
    assert [r["what"] for r in sql("SELECT what FROM {schema}.effects WHERE key = 'r' ORDER BY id")] == \
        ["attempt", "attempt", "done"]
    assert not sql("SELECT 1 FROM {schema}.effects WHERE key = 'r-follow-up-0'")  # rolled back with attempt 1


def test_canvas_inside_a_transaction(app, start_worker, database_url, sql):
    def canvases():
        return (
            chain(app.add.s(1, 2), app.add.s(3)),
            group(app.add.s(i, i) for i in range(5)),
            chord((app.add.s(i, 1) for i in range(5)), app.tsum.s()),
        )

    def rows():
        return [sql(f"SELECT count(*) AS n FROM {{schema}}.{t}")[0]["n"] for t in ("jobs", "results", "counters")]

    before = rows()
    conn = psycopg.connect(database_url)
    with pgbroker.atomic(conn):
        for canvas in canvases():
            canvas.apply_async()
    conn.rollback()
    assert rows() == before
    with pgbroker.atomic(conn):
        results = [canvas.apply_async() for canvas in canvases()]
        assert rows() == before  # nothing is visible before the commit
    conn.commit()
    assert rows()[0] > before[0] and rows()[2] == before[2] + 1  # the chord's counter
    conn.close()
    start_worker(pool="threads")
    chained, grouped, chorded = results
    assert chained.get(timeout=30) == 6
    assert grouped.get(timeout=30) == [0, 2, 4, 6, 8]
    assert chorded.get(timeout=30) == 15


def test_another_database_is_a_typed_error_or_after_commit(app, start_worker, database_url, sql):
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    info = psycopg.conninfo.conninfo_to_dict(database_url)
    other_url = psycopg.conninfo.make_conninfo(database_url, dbname="postgres")
    assert info.get("dbname") != "postgres"
    with psycopg.connect(other_url) as conn:
        with pytest.raises(pgbroker.ForeignTransaction, match="database 'postgres'"):
            with pgbroker.atomic(conn):
                app.record.delay("foreign")
    engine = create_engine(_sqlalchemy_url(
        f"postgresql://{info.get('user')}:{info.get('password') or ''}@{info.get('host') or ''}"
        f"{':' + str(info['port']) if info.get('port') else ''}/postgres", "psycopg"))
    with Session(engine) as session:
        with session.begin():
            with pgbroker.atomic(session, foreign="after_commit"):
                rolled = app.record.delay("after-commit-rolled-back")
            savepoint = session.begin_nested()
            with pgbroker.atomic(session, foreign="after_commit"):
                app.record.delay("in-rolled-back-savepoint")
            savepoint.rollback()
            session.rollback()
        with session.begin():
            with pgbroker.atomic(session, foreign="after_commit"):
                kept = app.record.delay("after-commit")
            assert not sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", kept.id)
    engine.dispose()
    assert sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", kept.id)  # published on commit
    start_worker(pool="threads")
    assert kept.get(timeout=30) == "after-commit"
    assert [r["key"] for r in sql("SELECT key FROM {schema}.effects")] == ["after-commit"]
    assert not sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", rolled.id)


def test_one_round_trip_per_publish(app, database_url, tmp_path):
    """The database identity is checked once per connection; then each publish is one
    round trip (counted in libpq's protocol trace: one Sync per round trip)."""
    conn = psycopg.connect(database_url)
    conn.execute("SELECT 1")  # the caller's own work has begun the transaction
    trace = tmp_path / "libpq.trace"

    def round_trips(publishes: int) -> int:
        with open(trace, "w") as f:
            conn.pgconn.trace(f.fileno())
            with pgbroker.atomic(conn):
                for i in range(publishes):
                    app.add.delay(i, i)
            conn.pgconn.untrace()
        sent = [line.split("\t")[3] for line in trace.read_text().splitlines() if "\tF\t" in line]
        return sum(1 for message in sent if message in ("Sync", "Query"))  # each ends a round trip

    try:
        # Once per connection: the identity check and the INSERT are prepared (psycopg
        # sends each Parse in a round trip of its own); then one round trip per publish.
        assert round_trips(10) == 13
        assert round_trips(10) == 10
    finally:
        conn.rollback()  # an open transaction would hold the schema the fixture drops
        conn.close()


def test_bad_bindings_are_typed_errors(app, database_url):
    with pytest.raises(pgbroker.NotInTransaction, match="autocommit"):
        with psycopg.connect(database_url, autocommit=True) as conn, pgbroker.atomic(conn):
            app.add.delay(1, 1)
    with pytest.raises(TypeError, match="cannot bind"):
        with pgbroker.atomic(object()):
            pass
    conn = psycopg.connect(database_url)
    conn.execute("SET TRANSACTION READ ONLY")
    with pytest.raises(pgbroker.TransactionFailed, match="read-only transaction"):
        with pgbroker.atomic(conn):
            app.add.delay(1, 1)
    with pytest.raises(pgbroker.NotInTransaction, match="failed"):
        with pgbroker.atomic(conn):
            app.add.delay(1, 1)
    conn.close()


def test_a_commit_hook_inside_pgbroker_atomic_says_what_to_do(app, django_db, sql):
    """pgbroker.atomic() opened outside Django's atomic(): delay_on_commit() runs after
    the commit, still inside pgbroker.atomic(), so there is no transaction to join any
    more. The error says so and how to nest them; nothing is stored half-way."""
    from django.db import transaction

    def jobs():
        return sql("SELECT count(*) AS n FROM {schema}.jobs")[0]["n"]

    before = jobs()
    with pytest.raises(pgbroker.NotInTransaction, match="already committed: open pgbroker.atomic"):
        with pgbroker.atomic(django_db), transaction.atomic():
            transaction.on_commit(lambda: app.add.delay(1, 1))
    assert jobs() == before
    with transaction.atomic(), pgbroker.atomic(django_db):  # the nesting that works
        app.add.delay(1, 1)
    assert jobs() == before + 1
