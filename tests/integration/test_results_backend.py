"""The result backend's storage rules against a real Postgres (no worker: Celery's API only)."""
from __future__ import annotations

import threading
import time

import pytest
from celery import Celery, states

from tests.helpers import wait_for


@pytest.fixture
def make_app(broker_url, transport_options):
    apps = []

    def make(**conf) -> Celery:
        app = Celery("results", broker=broker_url, backend=broker_url)
        app.conf.update({"broker_transport_options": transport_options, **conf})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.mark.parametrize("serializer", ["json", "pickle", "msgpack", "yaml"])
def test_serializers_round_trip(make_app, serializer, sql):
    app = make_app(result_serializer=serializer, result_accept_content=[serializer])
    value = {"n": 1, "items": [1, 2, 3], "text": "ü"}
    app.backend.store_result("t-1", value, states.SUCCESS)
    assert app.AsyncResult("t-1").get(timeout=5) == value
    row = sql("SELECT state, task_id, date_done FROM {schema}.results WHERE key = 'celery-task-meta-t-1'")[0]
    assert row["state"] == "SUCCESS" and row["task_id"] == "t-1" and row["date_done"] is not None


def test_a_success_is_never_overwritten(make_app):
    app = make_app()
    app.backend.store_result("t-2", 42, states.SUCCESS)
    app.backend.store_result("t-2", RuntimeError("late duplicate"), states.FAILURE)
    assert app.AsyncResult("t-2").get(timeout=5) == 42
    app.backend.store_result("t-3", None, states.STARTED)
    app.backend.store_result("t-3", 7, states.SUCCESS)
    assert app.AsyncResult("t-3").get(timeout=5) == 7


def test_pruning_runs_in_batches_with_one_leader(make_app, transport_options, sql):
    app = make_app(broker_transport_options={**transport_options, "prune_batch_size": 7})
    backend = app.backend
    for i in range(40):
        backend.store_result(f"old-{i}", i, states.SUCCESS)
    backend.store_result("fresh", 1, states.SUCCESS)
    backend.incr("celery-chord-old")
    sql("UPDATE {schema}.results SET expires_at = now() - interval '1 s' WHERE key LIKE '%%old-%%'")
    sql("UPDATE {schema}.counters SET expires_at = now() - interval '1 s'")
    sql("INSERT INTO {schema}.chord_parts VALUES ('celery-chord-old', 'part-1', now() - interval '1 s')")
    # Expired but not yet pruned results already read as missing.
    assert app.AsyncResult("old-1").state == states.PENDING
    counts = []
    threads = [threading.Thread(target=lambda: counts.append(backend.cleanup())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backend.cleanup() == 0
    assert sum(counts) == 40  # every expired result deleted exactly once, whoever led
    assert [r["key"] for r in sql("SELECT key FROM {schema}.results")] == ["celery-task-meta-fresh"]
    assert sql("SELECT 1 FROM {schema}.counters") == [] and sql("SELECT 1 FROM {schema}.chord_parts") == []


def test_result_too_large_is_refused(make_app, transport_options):
    from pgbroker.errors import ResultTooLarge

    app = make_app(broker_transport_options={**transport_options, "max_result_size": 1000})
    with pytest.raises(ResultTooLarge, match="max_result_size=1000"):
        app.backend.store_result("t-4", "x" * 2000, states.SUCCESS)
    assert app.AsyncResult("t-4").state == states.PENDING


@pytest.mark.parametrize("expires", [None, 0])
def test_results_that_never_expire_keep_their_saved_groups(make_app, sql, expires):
    """Celery asks for expire(key, 0) when results never expire (a chord saves its group
    so): the row must stay readable, not expire at once."""
    from celery.result import GroupResult

    app = make_app(result_expires=expires)
    saved = GroupResult("g-forever", [app.AsyncResult("m-1")], app=app)
    saved.save()
    app.backend.expire(app.backend.get_key_for_group("g-forever"), 0)
    assert GroupResult.restore("g-forever", app=app).results == saved.results
    row = sql("SELECT expires_at, state FROM {schema}.results WHERE key LIKE '%%g-forever'")[0]
    assert row["expires_at"] is None
    assert row["state"] is None  # group metadata, not a task: counting by state counts tasks


def test_every_thread_waiting_for_a_task_wakes_on_its_result(make_app):
    """Four threads wait for one task: the notification wakes them all (the re-read
    every result_polling_interval is 60 s; get() also reads once more at its timeout)."""
    app = make_app(result_polling_interval=60)
    got, started = [], threading.Barrier(5)

    def wait():
        started.wait(10)
        value = app.AsyncResult("shared").get(timeout=20)
        got.append((value, time.monotonic()))

    threads = [threading.Thread(target=wait) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait(10)
    waiter = wait_for(lambda: getattr(app.backend.db, "_result_waiter", None), timeout=10)
    wait_for(lambda: len(waiter._watchers.get(app.backend.get_key_for_task("shared").decode(), ())) == 4, timeout=10)
    stored = time.monotonic()
    app.backend.store_result("shared", 5, states.SUCCESS)
    for t in threads:
        t.join(30)
    assert [value for value, _ in got] == [5, 5, 5, 5]
    assert max(at for _, at in got) - stored < 5


def test_get_rides_out_a_short_database_outage(make_app, broker_url, database_url, caplog):
    """The connection under a waiting get() dies: it keeps waiting (re-reading every
    result_polling_interval) and returns the result once the database is back."""
    from tests.helpers import TcpProxy, in_thread

    proxy = TcpProxy.in_front_of(database_url)
    try:
        writer = make_app()
        reader = make_app(result_backend=proxy.route(broker_url), result_polling_interval=0.2)
        thread, got = in_thread(lambda: reader.AsyncResult("t-outage").get(timeout=60))
        waiter = wait_for(lambda: getattr(reader.backend.db, "_result_waiter", None), timeout=10)
        wait_for(lambda: waiter._watchers.get("celery-task-meta-t-outage"), timeout=10)
        proxy.cut()
        wait_for(lambda: "reading results failed" in caplog.text or got, timeout=20, what="a failed read")
        writer.backend.store_result("t-outage", 42, states.SUCCESS)
        proxy.restore()
        thread.join(30)
        assert got == [42]
    finally:
        proxy.close()


def test_get_during_an_outage_times_out_on_time(make_app, broker_url, transport_options, database_url):
    """Each read during an outage waits for a pooled connection only as long as the
    get() has left, not ``pool_timeout`` (here 20 s) per try."""
    from celery.exceptions import TimeoutError as CeleryTimeoutError

    from tests.helpers import TcpProxy

    proxy = TcpProxy.in_front_of(database_url)
    try:
        reader = make_app(result_backend=proxy.route(broker_url), result_polling_interval=0.2,
                          result_backend_transport_options={**transport_options, "pool_timeout": 20})
        with pytest.raises(CeleryTimeoutError):
            reader.AsyncResult("t-first").get(timeout=0.5)  # the LISTEN connection is open now
        proxy.cut()
        started = time.monotonic()
        with pytest.raises(CeleryTimeoutError):
            reader.AsyncResult("t-late").get(timeout=2)
        assert time.monotonic() - started < 6  # 2 s, plus at most one connect timeout
    finally:
        proxy.close()


def test_state_during_an_outage_raises_instead_of_retrying_for_ever(make_app, broker_url, transport_options,
                                                                    database_url):
    """Result writes are retried while the database is away; reads (``.state``,
    ``.ready()``) raise after ``pool_timeout``, as with other backends."""
    from pgbroker.errors import DatabaseUnavailable
    from tests.helpers import TcpProxy

    proxy = TcpProxy.in_front_of(database_url)
    try:
        reader = make_app(result_backend=proxy.route(broker_url),
                          result_backend_transport_options={**transport_options, "pool_timeout": 1})
        assert reader.AsyncResult("t-before").state == "PENDING"
        proxy.cut()
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            reader.AsyncResult("t-during").state
        assert time.monotonic() - started < 10  # a pool timeout, plus at most one connect timeout
    finally:
        proxy.close()


@pytest.mark.parametrize("task_id", ["x" * 2000, "y" * 9000, "line\nbreak"])
def test_any_task_id_can_store_and_wait_for_its_result(make_app, task_id):
    """A notification must stay under NOTIFY's 8000 bytes: a long id sends the key alone
    (or, too long or with a newline, no notification: waiters re-read)."""
    app = make_app(result_polling_interval=0.2)
    got = []
    thread = threading.Thread(target=lambda: got.append(app.AsyncResult(task_id).get(timeout=20)))
    thread.start()
    waiter = wait_for(lambda: getattr(app.backend.db, "_result_waiter", None), timeout=10)
    wait_for(lambda: waiter._watchers.get(app.backend.get_key_for_task(task_id).decode()), timeout=10)
    app.backend.store_result(task_id, "v" * 2800, states.SUCCESS)
    thread.join(30)
    assert got == ["v" * 2800]


def test_get_from_a_database_never_reached_raises_at_once(make_app, broker_url, transport_options, database_url):
    """A wrong URL is an error, not an outage to wait out (even with no timeout)."""
    from urllib.parse import urlsplit

    from pgbroker.errors import DatabaseUnavailable

    u = urlsplit(database_url)
    nowhere = broker_url.replace(f"@{u.hostname}:{u.port}", "@127.0.0.1:1")
    app = make_app(result_backend=nowhere, result_backend_transport_options={**transport_options, "pool_timeout": 1})
    got = []

    def wait():
        try:
            app.AsyncResult("t-nowhere").get(timeout=None)
        except Exception as exc:
            got.append(exc)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(20)
    assert len(got) == 1 and isinstance(got[0], DatabaseUnavailable)


def test_an_unusable_database_error_says_why(make_app, broker_url, transport_options):
    """Not only that no connection came within pool_timeout: the server's own reason."""
    from urllib.parse import urlsplit, urlunsplit

    from pgbroker.errors import DatabaseUnavailable

    missing = urlunsplit(urlsplit(broker_url)._replace(path="/pgbroker_no_such_database"))
    app = make_app(result_backend=missing, result_backend_transport_options={**transport_options, "pool_timeout": 1})
    with pytest.raises(DatabaseUnavailable, match='database "pgbroker_no_such_database" does not exist'):
        app.AsyncResult("t-1").state


def test_a_chord_part_returning_twice_counts_once(make_app, sql):
    """A header part delivered again (acks_late, a worker lost after the result was
    stored) neither completes its chord early nor runs the callback a second time."""
    from celery.app.task import Context
    from celery.result import GroupResult

    app = make_app()
    backend = app.backend
    body = app.signature("tests.chord.body", options={"task_id": "body-1"})
    GroupResult("g-dup", [app.AsyncResult("p-1"), app.AsyncResult("p-2")], app=app).save()
    backend.set_chord_size("g-dup", 2)

    def part_returns(task_id, index=None):
        backend.store_result(task_id, task_id, states.SUCCESS)
        request = Context(id=task_id, group="g-dup", group_index=index, chord=dict(body))
        backend.on_chord_part_return(request, states.SUCCESS, task_id)

    def callbacks():
        return sql("SELECT count(*) AS n FROM {schema}.jobs WHERE task_id = 'body-1'")[0]["n"]

    part_returns("p-1")
    part_returns("p-1")  # the same part again: not the second of two
    assert callbacks() == 0 and app.AsyncResult("body-1").state == states.PENDING
    part_returns("p-2")
    assert callbacks() == 1
    part_returns("p-2")  # a late duplicate after the chord completed
    assert callbacks() == 1
    assert [r["part"] for r in sql("SELECT part FROM {schema}.chord_parts ORDER BY part")] == ["p-1", "p-2"]
    # one frozen signature in two places of a header: two parts
    body = app.signature("tests.chord.body", options={"task_id": "body-2"})
    GroupResult("g-dup", [app.AsyncResult("p-3"), app.AsyncResult("p-3")], app=app).save()
    backend.set_chord_size("g-dup", 2)
    sql("DELETE FROM {schema}.chord_parts")
    part_returns("p-3", index=0)
    part_returns("p-3", index=1)
    assert sql("SELECT count(*) AS n FROM {schema}.jobs WHERE task_id = 'body-2'")[0]["n"] == 1


def test_a_chord_counted_complete_by_a_lost_process_is_completed_by_the_redelivery(make_app, sql):
    """The process that counted the last part is killed before it sends the callback
    (acks_late: that part is delivered again): the redelivery sends it, once."""
    from celery.app.task import Context
    from celery.result import GroupResult

    app = make_app()
    backend = app.backend
    body = app.signature("tests.chord.body", options={"task_id": "body-lost"})
    GroupResult("g-lost", [app.AsyncResult("q-1"), app.AsyncResult("q-2")], app=app).save()
    backend.set_chord_size("g-lost", 2)

    def part_returns(task_id):
        backend.store_result(task_id, task_id, states.SUCCESS)
        backend.on_chord_part_return(Context(id=task_id, group="g-lost", chord=dict(body)), states.SUCCESS, task_id)

    part_returns("q-1")
    backend.store_result("q-2", "q-2", states.SUCCESS)  # the last part runs, is counted, and its process dies
    backend._returning.part = "q-2"
    try:
        assert backend.incr(backend.get_key_for_chord("g-lost")) == 2
    finally:
        backend._returning.part = None
    callbacks = "SELECT count(*) AS n FROM {schema}.jobs WHERE task_id = 'body-lost'"
    assert sql(callbacks)[0]["n"] == 0
    part_returns("q-2")  # delivered again
    assert sql(callbacks)[0]["n"] == 1
    part_returns("q-2")  # and again, after the chord completed: no second callback
    assert sql(callbacks)[0]["n"] == 1


def test_an_idle_process_stops_listening_until_its_next_get(make_app, transport_options, sql, schema):
    """Every NOTIFY wakes every listening connection of the database: with nobody waiting
    for result_listener_idle seconds, the process closes its LISTEN connection; the next
    get() opens it again before reading, and wakes on the notification (the re-read
    every result_polling_interval is 60 s)."""
    from pgbroker.backend import RESULTS_QUEUE
    from pgbroker.message import channel_name

    app = make_app(broker_transport_options={**transport_options, "result_listener_idle": 0.3},
                   result_polling_interval=60)
    listen = f'LISTEN "{channel_name(schema, RESULTS_QUEUE)}"'

    def listeners():
        return sql("SELECT count(*) AS n FROM pg_stat_activity WHERE query = %s", listen)[0]["n"]

    app.backend.store_result("first", 1, states.SUCCESS)
    assert app.AsyncResult("first").get(timeout=5) == 1
    wait_for(lambda: listeners() == 0, timeout=10, what="the idle LISTEN connection closed")
    got = []
    thread = threading.Thread(target=lambda: got.append(app.AsyncResult("second").get(timeout=30)))
    started = time.monotonic()
    thread.start()
    wait_for(lambda: listeners() == 1, timeout=10, what="get() listening again")
    app.backend.store_result("second", 2, states.SUCCESS)
    thread.join(40)
    assert got == [2]
    assert time.monotonic() - started < 10


def test_get_against_a_server_that_stopped_answering_times_out(make_app, transport_options, broker_url,
                                                                database_url):
    """The server accepts connections and never answers: get() opening its LISTEN
    connection again gives up after the connect timeout (pool_timeout) and raises
    Celery's TimeoutError at its deadline instead of waiting for the server forever."""
    from celery.exceptions import TimeoutError

    from tests.helpers import TcpProxy, in_thread

    proxy = TcpProxy.in_front_of(database_url)
    try:
        options = {**transport_options, "result_listener_idle": 0.2, "pool_timeout": 2.0}
        app = make_app(result_backend=proxy.route(broker_url), result_backend_transport_options=options,
                       result_polling_interval=0.5)
        app.backend.store_result("before", 1, states.SUCCESS)
        assert app.AsyncResult("before").get(timeout=10) == 1
        waiter = app.backend.db._result_waiter
        wait_for(lambda: not waiter._wanted.is_set(), timeout=10, what="the idle LISTEN connection closed")
        proxy.hang()
        started = time.monotonic()
        thread, got = in_thread(lambda: app.AsyncResult("during").get(timeout=3))
        thread.join(30)
        assert not thread.is_alive(), "get() still waiting for a server that never answers"
        assert isinstance(got[0], TimeoutError) and time.monotonic() - started < 15
    finally:
        proxy.close()


@pytest.mark.parametrize("serializer", ["json", "pickle", "yaml"])
def test_a_revoke_is_durable_whatever_the_task_serializer(make_app, serializer, sql):
    """Celery serialises remote control with the app's task_serializer: a revoke sent by
    an app on pickle or yaml cancels the job and answers waiters as one on json does."""
    app = make_app(task_serializer=serializer, accept_content=[serializer, "json"],
                   result_accept_content=[serializer, "json"])
    job = app.send_task("some.task", countdown=600)
    app.control.revoke(job.id)
    assert sql("SELECT state::text FROM {schema}.jobs WHERE task_id = %s", job.id)[0]["state"] == "cancelled"
    assert app.AsyncResult(job.id).state == "REVOKED"


def test_a_revoke_for_named_workers_leaves_the_job_to_the_others(make_app, sql):
    """revoke(destination=[...]) is for those workers alone (as on any broker): the job
    stays to be run by the others."""
    app = make_app()
    job = app.send_task("some.task")
    app.control.revoke(job.id, destination=["w9@elsewhere"])
    assert sql("SELECT state::text FROM {schema}.jobs WHERE task_id = %s", job.id)[0]["state"] == "available"
    assert app.AsyncResult(job.id).state == "PENDING"


def test_an_early_acked_job_lost_after_its_success_was_stored_is_completed(make_app, engine, sql):
    """A process lost between storing a task's SUCCESS and the worker recording the
    outcome (SIGTERM to the whole process group): the rescue completes its job
    instead of discarding it, so the row does not call a finished task failed."""
    from pgbroker.engine import Outcome

    app = make_app()
    for task_id in ("t-stored", "t-lost"):
        app.send_task("t.any", task_id=task_id, queue="resc")
    engine.heartbeat("host/1/dead", "host", 1, ["host/1/dead#1"])
    claimed = engine.claim(["resc"], 2, "host/1/dead#1")
    engine.settle([Outcome(*payload["properties"]["delivery_info"]["pgbroker_job"], "acked")
                   for payload, _ in claimed])
    app.backend.store_result("t-stored", 1, states.SUCCESS)
    sql("UPDATE {schema}.consumers SET heartbeat_at = now() - interval '1 hour'")
    rescued = engine.rescue(after=60)
    assert (rescued["completed"], rescued["discarded"], rescued["redelivered"]) == (1, 1, 0)
    rows = {r["task_id"]: r for r in sql("SELECT task_id, state, completed_at, errors FROM {schema}.jobs")}
    assert rows["t-stored"]["state"] == "completed" and rows["t-stored"]["completed_at"] is not None
    assert rows["t-stored"]["errors"] == []
    assert rows["t-lost"]["state"] == "discarded" and "task_acks_late=False" in rows["t-lost"]["errors"][-1]["error"]
