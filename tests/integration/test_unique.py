"""Unique jobs: one live job per key, enforced by the database, per call and per task."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import psycopg
import pytest
from celery import Celery

import pgbroker
from pgbroker.unique import InvalidUnique, duplicate_of
from tests.helpers import ROOT

TASK = "tests.unique.send_mail"


def send_mail(*args, **kwargs):
    return args


@pytest.fixture
def app(broker_url, transport_options, db):
    app = Celery("unique-tests", broker=broker_url, set_as_current=False)
    app.conf.update(broker_transport_options=transport_options)
    app.task(name=TASK)(send_mail)
    app.task(name="tests.unique.per_user", unique={"fields": ["task", "kwargs"], "keys": ["user_id"]})(send_mail)
    app.task(name="tests.unique.base", base=pgbroker.unique.Task, unique=True)(send_mail)
    yield app
    app.close()


def jobs(sql):
    return sql("SELECT task_id, state, unique_key FROM {schema}.jobs ORDER BY id")


def test_a_second_publish_of_a_held_key_stores_nothing_and_names_the_holder(app, sql):
    first = app.send_task(TASK, args=["ann@example.com"], unique={})
    second = app.send_task(TASK, args=["ann@example.com"], unique={})
    other = app.send_task(TASK, args=["bob@example.com"], unique={})
    assert [j["task_id"] for j in jobs(sql)] == [first.id, other.id]
    assert duplicate_of(second.id) == first.id and duplicate_of(first.id) is None


def test_a_task_option_selects_the_kwargs_that_count(app, sql):
    task = app.tasks["tests.unique.per_user"]
    kept = task.apply_async(kwargs={"user_id": 7, "template": "welcome"})
    task.apply_async(kwargs={"user_id": 7, "template": "reminder"})  # same user: a duplicate
    task.apply_async(kwargs={"user_id": 8, "template": "welcome"})
    assert len(jobs(sql)) == 2 and jobs(sql)[0]["task_id"] == kept.id


def test_the_unique_task_base_returns_the_holders_result(app, sql):
    task = app.tasks["tests.unique.base"]
    first = task.delay(1)
    again = task.delay(1)
    assert first.duplicate is False and again.duplicate is True and again.id == first.id


def test_a_key_is_released_when_its_job_finishes_or_its_period_ends(app, sql):
    first = app.send_task(TASK, args=[1], unique={})
    sql("UPDATE {schema}.jobs SET state = 'completed' WHERE task_id = %s", first.id)
    second = app.send_task(TASK, args=[1], unique={})
    assert duplicate_of(second.id) is None and len(jobs(sql)) == 2
    timed = app.send_task(TASK, args=[2], unique={"period": 3600, "states": ["available", "completed"]})
    sql("UPDATE {schema}.jobs SET state = 'completed' WHERE task_id = %s", timed.id)
    assert duplicate_of(app.send_task(TASK, args=[2], unique={"period": 3600}).id) == timed.id  # completed counts
    sql("UPDATE {schema}.jobs SET unique_until = now() - interval '1 second' WHERE task_id = %s", timed.id)
    later = app.send_task(TASK, args=[2], unique={"period": 3600})
    assert duplicate_of(later.id) is None


def test_scheduled_only_uniqueness_debounces_countdown_tasks(app, sql):
    spec = {"states": ["scheduled"]}
    first = app.send_task(TASK, args=["digest"], countdown=60, unique=spec)
    assert duplicate_of(app.send_task(TASK, args=["digest"], countdown=60, unique=spec).id) == first.id
    sql("UPDATE {schema}.jobs SET state = 'executing' WHERE task_id = %s", first.id)  # started: no longer debounced
    assert duplicate_of(app.send_task(TASK, args=["digest"], countdown=60, unique=spec).id) is None


def test_a_unique_publish_rolled_back_with_the_callers_transaction_holds_nothing(app, sql, database_url):
    with psycopg.connect(database_url) as conn:
        with pgbroker.atomic(conn):
            app.send_task(TASK, args=["tx"], unique={})
        conn.rollback()
    kept = app.send_task(TASK, args=["tx"], unique={})
    assert [j["task_id"] for j in jobs(sql)] == [kept.id]


def test_a_publish_of_a_key_held_in_an_open_transaction_waits_for_it_at_most_pool_timeout(
        broker_url, transport_options, sql, database_url):
    app = Celery("unique-wait", broker=broker_url, set_as_current=False)
    app.conf.update(broker_transport_options={**transport_options, "pool_timeout": 1.0})
    with psycopg.connect(database_url) as conn:
        with pgbroker.atomic(conn):
            first = app.send_task(TASK, args=["open"], unique={})
        # The same thread publishes the key again before its commit: this cannot wait for it.
        with pytest.raises(pgbroker.UniqueKeyBusy, match="not committed or rolled back within 1s"):
            app.send_task(TASK, args=["open"], unique={})
        conn.commit()
    again = app.send_task(TASK, args=["open"], unique={})  # committed: an ordinary duplicate
    assert duplicate_of(again.id) == first.id and [j["task_id"] for j in jobs(sql)] == [first.id]
    app.close()


@pytest.mark.parametrize("spec, message", [
    ({"fields": ["colour"]}, "unique fields"),
    ({"states": ["sleeping"]}, "unique states"),
    ({"period": -5}, "positive number of seconds"),
    ({"period": 0}, "positive number of seconds"),
    ({"keys": "user_id"}, "list of keyword-argument names"),
    ({"forever": True}, "unknown unique option"),
    ("yes", "must be a dict"),
])
def test_bad_unique_specs_are_refused_at_publish(app, sql, spec, message):
    with pytest.raises(InvalidUnique, match=message):
        app.send_task(TASK, args=[1], unique=spec)
    assert jobs(sql) == []


def test_eight_processes_racing_on_a_thousand_keys_store_one_job_per_key(broker_url, transport_options, sql,
                                                                          db):
    script = textwrap.dedent(f"""
        import sys
        from celery import Celery
        from pgbroker.unique import duplicate_of
        app = Celery(broker={broker_url!r})
        app.conf.broker_transport_options = {transport_options!r}
        with app.connection_for_write() as conn:
            conn.ensure_connection()
        sys.stdin.readline()  # all start together
        dup = sum(duplicate_of(app.send_task("race", args=[k], unique={{}}).id) is not None for k in range(1000))
        print(dup)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    duplicates = [int(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    counts = sql("SELECT count(*) AS n, count(DISTINCT unique_key) AS keys FROM {schema}.jobs")[0]
    assert counts == {"n": 1000, "keys": 1000}
    assert sum(duplicates) == 7000


def test_publishing_in_an_open_transaction_leaves_a_stale_holder_unlocked(app, sql, database_url, schema):
    """Freeing a key whose holder finished is committed at once: the caller's open
    transaction must not hold the holder's row (the worker records its outcome there)."""
    holder = app.send_task(TASK, args=["lock"], unique={})
    sql("UPDATE {schema}.jobs SET state = 'completed' WHERE task_id = %s", holder.id)
    with psycopg.connect(database_url) as conn:
        with pgbroker.atomic(conn):
            new = app.send_task(TASK, args=["lock"], unique={})
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute("SET lock_timeout = '2s'")
            other.execute(f'UPDATE "{schema}".jobs SET attempted_by = attempted_by WHERE task_id = %s', [holder.id])
        conn.commit()
    assert duplicate_of(new.id) is None
    assert [(j["task_id"], j["unique_key"] is not None) for j in jobs(sql)] == [(holder.id, False), (new.id, True)]


def test_a_unique_period_counts_from_the_publish_not_the_transactions_start(app, sql, database_url):
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT pg_sleep(0.5)")  # the transaction began half a second ago
        with pgbroker.atomic(conn):
            app.send_task(TASK, args=["period"], unique={"period": 10})
        conn.commit()
    [row] = sql("SELECT extract(epoch FROM unique_until - inserted_at)::float8 AS held FROM {schema}.jobs")
    assert row["held"] >= 10.4


def test_a_unique_publish_waiting_for_the_commit_does_not_name_a_holder(app, sql, database_url):
    """With foreign='after_commit' the write waits for the caller's commit: whether the
    key is held is not known at publish time, so no holder is named."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    holder = app.send_task(TASK, args=["later"], unique={})
    sql("UPDATE {schema}.jobs SET state = 'completed' WHERE task_id = %s", holder.id)
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    assert info.get("dbname") != "postgres"
    engine = create_engine(f"postgresql+psycopg://{info.get('user')}:{info.get('password') or ''}@"
                           f"{info.get('host') or ''}{':' + str(info['port']) if info.get('port') else ''}/postgres")
    try:
        with Session(engine) as session, session.begin():
            with pgbroker.atomic(session, foreign="after_commit"):
                new = app.send_task(TASK, args=["later"], unique={})
            assert duplicate_of(new.id) is None and len(jobs(sql)) == 1
    finally:
        engine.dispose()
    assert [j["task_id"] for j in jobs(sql)] == [holder.id, new.id]
