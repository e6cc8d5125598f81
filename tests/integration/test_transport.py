"""The kombu transport and the job engine against a real Postgres (no Celery worker)."""
from __future__ import annotations

import dataclasses
import re
import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from kombu import Connection, Exchange, Queue
from kombu.exceptions import ChannelError

from pgbroker.engine import Outcome
from pgbroker.errors import MessageTooLarge
from pgbroker.message import channel_name
from tests.helpers import wait_for


def publish(conn, queue_name, body, exchange="ex", **kwargs):
    q = Queue(queue_name, Exchange(exchange), routing_key=queue_name)
    conn.Producer().publish(body, exchange=q.exchange, routing_key=queue_name, declare=[q], **kwargs)
    return q


def consume(conn, queue, n, timeout=10, ack=True, **consumer_kwargs):
    got = []

    def on_message(body, message):
        got.append((body, message))
        if ack:
            message.ack()

    with conn.Consumer(queue, callbacks=[on_message], **consumer_kwargs):
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.5)
            except TimeoutError:
                pass
    return got


def jobs(sql):
    return sql("SELECT * FROM {schema}.jobs ORDER BY id")


def test_roundtrip_priority_order_and_ack(connection, sql, engine):
    for i, prio in enumerate([0, 9, 5, 5, 1]):
        q = publish(connection, "work", {"i": i}, priority=prio)
    got = consume(connection, q, 5)
    assert [b["i"] for b, _ in got] == [1, 2, 3, 4, 0]  # 9, 5, 5 (FIFO), 1, 0
    engine.settler.flush()
    assert {r["state"] for r in jobs(sql)} == {"completed"}
    assert all(r["attempt"] == 1 for r in jobs(sql))


def test_scheduled_rows_wait_until_due(connection, sql, engine):
    eta = (datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat()
    q = publish(connection, "later", "x", headers={"id": "t-eta", "task": "t", "eta": eta})
    assert jobs(sql)[0]["state"] == "scheduled"
    assert engine.claim(["later"], 10, "nobody") == []  # not deliverable before it is due
    got = consume(connection, q, 1, timeout=10)  # the consumer's maintainer stages it
    assert got and got[0][0] == "x"
    row = jobs(sql)[0]
    assert row["attempted_at"] >= row["scheduled_at"]


def test_jobs_scheduled_for_later_wake_the_stager_only_when_it_would_sleep_past_them(
        broker_url, transport_options, connection, sql):
    """A consumer's stager sleeping up to 30 s stages a 0.3 s countdown on time, and
    jobs due after its next look do not make it look again (no query per publish)."""
    from pgbroker.maintenance import shutdown

    def drain_until(n):
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            try:
                consumer.drain_events(timeout=0.5)
            except TimeoutError:
                pass

    slow = {**transport_options, "polling_interval": 30, "heartbeat_interval": 30, "rescue_after": 60}
    got = []
    with Connection(broker_url, transport_options=slow) as consumer:
        q = publish(connection, "later", "first")
        with consumer.Consumer(q, callbacks=[lambda body, m: got.append(body) or m.ack()]):
            drain_until(1)  # the consumer's maintainer now sleeps 30 s
            engine = consumer.transport.engine
            looks = []
            stage = engine.stage
            engine.stage = lambda *a, **kw: looks.append(1) or stage(*a, **kw)
            far = (datetime.now(timezone.utc) + timedelta(seconds=20)).isoformat()
            for i in range(50):  # each its own transaction and NOTIFY, read by the consumer
                publish(connection, "later", f"far{i}", headers={"id": f"far{i}", "task": "t", "eta": far})
                with pytest.raises(TimeoutError):
                    consumer.drain_events(timeout=0.02)
            eta = (datetime.now(timezone.utc) + timedelta(seconds=0.3)).isoformat()
            publish(connection, "later", "soon", headers={"id": "soon", "task": "t", "eta": eta})
            drain_until(2)
        assert got == ["first", "soon"]
        row = sql("SELECT scheduled_at, attempted_at FROM {schema}.jobs WHERE task_id = 'soon'")[0]
        assert (row["attempted_at"] - row["scheduled_at"]).total_seconds() < 2.0
        assert len(looks) <= 3, len(looks)  # the soon job's look, not one per far job
        shutdown(consumer.transport.database)


def test_a_no_ack_consumer_going_away_puts_back_what_it_did_not_receive(connection, sql):
    """A no-ack claim deletes a page of messages but delivers one per drain_events call:
    cancelling the consumer (or closing its channel) puts the rest back, in order."""
    for i in range(20):
        q = publish(connection, "noack", i, priority=9 if i == 7 else 0)
    got = []
    consumer = connection.Consumer(q, no_ack=True, callbacks=[lambda body, m: got.append(body)])
    consumer.consume()
    connection.drain_events(timeout=5)
    consumer.cancel()
    assert got == [7]
    assert [r["state"] for r in jobs(sql)] == ["available"] * 19
    with connection.SimpleQueue(q, no_ack=True) as simple:  # get one, then close
        assert simple.get(timeout=5).payload == 0
    with connection.SimpleQueue(q, no_ack=True) as simple:
        assert [simple.get(timeout=5).payload for _ in range(18)] == [i for i in range(1, 20) if i != 7]
    assert jobs(sql) == []


def test_claims_are_sized_by_prefetch(connection, sql):
    for i in range(10):
        q = publish(connection, "pf", i)
    channel = connection.channel()
    channel.basic_qos(0, 3, False)
    seen = []
    consumer = connection.Consumer(q, channel=channel, callbacks=[lambda b, m: seen.append(m)])
    consumer.consume()
    connection.drain_events(timeout=5)  # one claim of three, delivered in one call
    assert len(seen) == 3
    assert [r["state"] for r in jobs(sql)].count("executing") == 3
    with pytest.raises(TimeoutError):  # the window is full: nothing more is claimed
        connection.drain_events(timeout=0.3)
    assert [r["state"] for r in jobs(sql)].count("executing") == 3
    channel.close()  # unacked deliveries are restored at once
    assert [r["state"] for r in jobs(sql)].count("available") == 10
    assert sum(r["redelivered"] for r in jobs(sql)) == 3


def test_acks_are_fenced_by_attempt(engine, sql, connection):
    publish(connection, "fence", "x")
    [(payload, _)] = engine.claim(["fence"], 1, "old-owner")
    job_id, attempt = payload["properties"]["delivery_info"]["pgbroker_job"]
    assert engine.requeue(job_id, attempt)  # e.g. rescued
    [(payload2, _)] = engine.claim(["fence"], 1, "new-owner")
    assert payload2["properties"]["delivery_info"]["pgbroker_job"] == [job_id, attempt + 1]
    engine.settle([Outcome(job_id, attempt, "completed")])  # the old owner's late ack
    row = jobs(sql)[0]
    assert (row["state"], row["attempt"], row["attempted_by"]) == ("executing", 2, "new-owner")
    assert not engine.requeue(job_id, attempt)


def generic_plan(db, name: str, params: dict) -> str:
    """EXPLAIN of the named query as pgbroker runs it: prepared, with its generic plan."""
    names: dict[str, str] = {}  # parameter -> the cast it is first written with

    def number(match):
        names.setdefault(match.group(1), match.group(2) or "")
        return f"${list(names).index(match.group(1)) + 1}{match.group(2) or ''}"

    text = re.sub(r"%\((\w+)\)s((?:::\w+(?:\[\])?)?)", number, db.q[name])
    with db.connection() as conn:  # plan_cache_mode = force_generic_plan there
        conn.execute(f"PREPARE plan_probe AS {text}")
        try:
            arguments = ", ".join(f"%s{cast}" for cast in names.values())
            with psycopg.ClientCursor(conn) as cur:  # EXECUTE's arguments as typed literals
                rows = cur.execute(f"EXPLAIN EXECUTE plan_probe({arguments})", [params[n] for n in names]).fetchall()
        finally:
            conn.execute("DEALLOCATE plan_probe")
    return "\n".join(r[0] for r in rows)


def test_jobs_are_found_by_key_whatever_the_statistics(db, sql):
    """Statistics taken while few jobs were executing or discarded must not make the
    outcome, requeue and retry statements read every such job through a partial index
    instead of looking theirs up by key (their cost would grow with the number of jobs
    in flight: 2 ms per outcome with 3,000 of them, measured)."""
    sql("""INSERT INTO {schema}.jobs (task_id, queue, state, headers, properties, body)
           SELECT g::text, 'q', CASE WHEN g <= 5 THEN 'executing' WHEN g <= 10 THEN 'discarded'
                                     ELSE 'completed' END::{schema}.job_state, '{}', '{}', 'x'
           FROM generate_series(1, 6000) AS g""")
    sql("ANALYZE {schema}.jobs")
    sql("UPDATE {schema}.jobs SET state = 'executing' WHERE id <= 2000")  # bursts since
    sql("UPDATE {schema}.jobs SET state = 'discarded' WHERE id > 4000")
    settle = {"ids": [1], "attempts": [0], "ops": ["completed"], "errors": [None], "delays": [None]}
    for name, params, index in (("settle", settle, "jobs_pkey"), ("requeue", {"id": 1, "attempt": 0}, "jobs_pkey"),
                                ("jobs_retry", {"task_ids": ["4001"], "result_keys": [None]}, "jobs_task_id_key")):
        plan = generic_plan(db, name, params)
        assert index in plan and "jobs_executing_idx" not in plan and "jobs_finished_idx" not in plan, plan


def test_reject_requeue_and_discard(connection, sql, engine):
    q = publish(connection, "rej", "a")
    publish(connection, "rej", "b")
    got = consume(connection, q, 2, ack=False)
    first, second = got[0][1], got[1][1]
    first.reject(requeue=True)
    second.reject(requeue=False)
    engine.settler.flush()
    rows = jobs(sql)
    assert (rows[0]["state"], rows[0]["redelivered"]) == ("available", True)
    assert rows[1]["state"] == "discarded" and "rejected" in rows[1]["errors"][0]["error"]
    again = consume(connection, q, 1)
    assert again[0][0] == "a" and again[0][1].delivery_info["redelivered"] is True


def test_ack_from_another_thread(connection, sql, engine):
    q = publish(connection, "thr", "x")
    got = consume(connection, q, 1, ack=False)
    t = threading.Thread(target=got[0][1].ack)
    t.start()
    t.join()
    engine.settler.flush()
    assert jobs(sql)[0]["state"] == "completed"


def test_notify_wakes_a_waiting_consumer(broker_url, transport_options, sql):
    """With a 30 s fallback poll, only NOTIFY can deliver within the bound."""
    opts = {**transport_options, "polling_interval": 30.0}
    with Connection(broker_url, transport_options=opts) as consumer_conn, \
            Connection(broker_url, transport_options=opts) as producer_conn:
        q = Queue("wake", Exchange("wake"), "wake")
        got = []
        with consumer_conn.Consumer(q, callbacks=[lambda b, m: (got.append(b), m.ack())]):
            timer = threading.Timer(0.5, lambda: publish(producer_conn, "wake", "ping", exchange="wake"))
            timer.start()
            started = time.monotonic()
            consumer_conn.drain_events(timeout=20)
            assert got == ["ping"] and time.monotonic() - started < 10


def test_a_stopping_consumer_claims_nothing_and_waits_no_more(broker_url, transport_options, sql):
    """What a worker's shutdown signal does to its connection: a wait in progress ends,
    and later drains (Celery runs one more loop cycle) neither wait nor claim."""
    opts = {**transport_options, "polling_interval": 30.0}
    with Connection(broker_url, transport_options=opts) as conn:
        q = Queue("stopping", Exchange("stopping"), "stopping")
        got = []
        with conn.Consumer(q, callbacks=[lambda b, m: (got.append(b), m.ack())]):
            timer = threading.Timer(0.5, conn.transport.stop_consuming)
            timer.start()
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=20)  # ended by the stop, not by its timeout
            assert time.monotonic() - started < 10
            publish(conn, "stopping", "late", exchange="stopping")
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=20)
            assert time.monotonic() - started < 10
        assert got == [] and [r["state"] for r in jobs(sql)] == ["available"]


def test_hostile_names_are_stored_and_routed(connection, sql):
    names = ["q'uote", 'dq"uote', "semi;colon", "'; DROP TABLE jobs; --", "é🚀队列", "n" * 200]
    for name in names:
        publish(connection, name, name, exchange=name)
    for name in names:
        got = consume(connection, Queue(name, Exchange(name), name), 1)
        assert [b for b, _ in got] == [name]
    assert {r["queue"] for r in jobs(sql)} == set(names)


def test_oversized_message_is_refused_and_nothing_stored(broker_url, transport_options, sql):
    with Connection(broker_url, transport_options={**transport_options, "max_message_size": 1000}) as conn:
        with pytest.raises(MessageTooLarge, match="max_message_size=1000"):
            publish(conn, "big", "x" * 2000)
    assert jobs(sql) == []


def test_database_down_at_publish_is_a_connection_error(transport_options):
    """kombu (hence Celery's retry_policy) sees a connection error; the password never shows."""
    from kombu.exceptions import OperationalError

    url = "pgbroker://someone:s3cret@127.0.0.1:1/nowhere?connect_timeout=1"
    with Connection(url, transport_options={**transport_options, "pool_timeout": 1}) as conn:
        with pytest.raises(OperationalError) as err:
            conn.ensure_connection(max_retries=1)
        assert "s3cret" not in str(err.value) and "s3cret" not in str(err.value.__cause__)
        with pytest.raises(conn.connection_errors) as err:
            conn.transport.engine.enqueue("q", {"body": "x", "headers": {}, "properties": {}})
        assert "s3cret" not in str(err.value) and "s3cret" not in conn.as_uri()


def test_rescue_by_liveness(engine, sql, connection):
    for i in range(3):
        publish(connection, "resc", i)
    engine.heartbeat("host/1/dead", "host", 1, ["host/1/dead#1"])
    engine.heartbeat("host/2/live", "host", 2, ["host/2/live#1"])
    dead = engine.claim(["resc"], 2, "host/1/dead#1")
    live = engine.claim(["resc"], 1, "host/2/live#1")
    dead_acked = dead[0][0]["properties"]["delivery_info"]["pgbroker_job"]
    engine.settle([Outcome(*dead_acked, "acked")])
    sql("UPDATE {schema}.consumers SET heartbeat_at = now() - interval '1 hour' WHERE pid = 1")
    result = engine.rescue(after=60)
    assert (result["dead"], result["redelivered"], result["discarded"]) == (1, 1, 1)
    rows = {r["id"]: r for r in jobs(sql)}
    assert rows[dead_acked[0]]["state"] == "discarded"
    assert "task_acks_late=False" in rows[dead_acked[0]]["errors"][-1]["error"]
    live_id = live[0][0]["properties"]["delivery_info"]["pgbroker_job"][0]
    assert rows[live_id]["state"] == "executing"  # the live consumer keeps its job
    # The live process closes that connection: its unacked job comes back at once.
    engine.heartbeat("host/2/live", "host", 2, [])
    assert engine.rescue(after=60)["redelivered"] == 1
    assert {r["state"] for r in jobs(sql)} == {"available", "discarded"}


def test_queue_size_purge_delete(connection, engine):
    for i in range(4):
        publish(connection, "pq", i)
    publish(connection, "pq", "later", headers={"id": "later", "task": "t",
                                                "eta": (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()})
    channel = connection.default_channel
    assert channel.queue_declare("pq", passive=True).message_count == 5
    assert channel.queue_purge("pq") == 5
    assert engine.queue_size("pq") == 0
    with pytest.raises(Exception):
        channel.queue_declare("never-declared", passive=True)
    publish(connection, "pq", "taken")
    consume(connection, Queue("pq"), 1)  # acknowledged: its finished row waits to be pruned
    channel.queue_delete("pq")
    with pytest.raises(ChannelError, match="NOT_FOUND"):
        channel.queue_declare("pq", passive=True)


def test_enqueue_in_a_rolled_back_transaction_leaves_nothing(engine, database_url, schema, sql):
    message = {"body": "x", "headers": {}, "properties": {}}
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{channel_name(schema, "tx")}"')
        with psycopg.connect(database_url) as conn:
            engine.enqueue("tx", message, conn=conn)
            conn.rollback()
        assert jobs(sql) == []
        assert list(listener.notifies(timeout=0.5)) == []
        with psycopg.connect(database_url) as conn:
            engine.enqueue("tx", message, conn=conn)
            conn.commit()
        assert len(list(listener.notifies(timeout=5, stop_after=1))) == 1
    assert len(jobs(sql)) == 1


def test_bulk_enqueue(engine, sql):
    ids = engine.enqueue_many([("bulk", {"body": str(i), "headers": {}, "properties": {}}) for i in range(500)])
    assert len(ids) == 500 and ids == sorted(ids)
    claimed = engine.claim(["bulk"], 1000, "c")
    assert [p["body"] for p, _ in claimed] == [str(i) for i in range(500)]


def test_basic_get(connection, sql, engine):
    publish(connection, "get", "a")
    publish(connection, "get", "b")
    channel = connection.channel()
    first = channel.basic_get("get", no_ack=True)
    second = channel.basic_get("get")
    assert channel.basic_get("get") is None
    assert (first.payload, second.payload) == ("a", "b")
    second.ack()
    engine.settler.flush()
    # a no-ack delivery is gone from the table (at most once, nothing left behind)
    assert [r["state"] for r in jobs(sql)] == ["completed"]


def test_settler_isolates_a_refused_outcome(engine, sql, connection):
    for i in range(3):
        publish(connection, "iso", i)
    claimed = engine.claim(["iso"], 3, "c")
    jobs_ = [p["properties"]["delivery_info"]["pgbroker_job"] for p, _ in claimed]
    engine.settler.submit(Outcome(*jobs_[0], "completed"))
    engine.settler.submit(Outcome(*jobs_[1], "no-such-state"))  # the database refuses this one
    engine.settler.submit(Outcome(*jobs_[2], "completed"))
    assert engine.settler.flush()
    assert [r["state"] for r in jobs(sql)] == ["completed", "executing", "completed"]


def test_a_wake_up_sent_before_the_wait_ends_it_at_once(db):
    """An ack that frees prefetch room just before the consumer starts waiting must not
    be lost (it was: the wait emptied the wake-up pipe and slept a polling interval)."""
    listener = db.listener()
    try:
        listener.listen(["pgb_wake_test"])
        listener.fds()
        listener.wake()
        started = time.monotonic()
        assert listener.wait(10.0) == []
        assert time.monotonic() - started < 1.0
        started = time.monotonic()  # and the wake-up is used up: the next wait times out
        listener.wait(0.2)
        assert time.monotonic() - started >= 0.2
    finally:
        listener.close()


def test_options_are_not_taken_from_whoever_connected_first(broker_url, transport_options, schema):
    """Two configurations of one database and schema in a process (the job API by URL,
    then an app) each keep their own options: here the app's max_message_size."""
    from pgbroker import jobs
    from pgbroker.config import conninfo_from_url
    from pgbroker.schema import migrate

    with psycopg.connect(conninfo_from_url(broker_url), autocommit=True) as conn:
        migrate(conn, schema)  # `pgbroker migrate`: the job API by URL creates no schema
    assert jobs.count(broker_url, schema=schema) == 0  # default options, connected first
    with Connection(broker_url, transport_options={**transport_options, "max_message_size": 1000}) as conn:
        queue = conn.SimpleQueue("small")
        with pytest.raises(MessageTooLarge, match="max_message_size=1000"):
            queue.put("x" * 2000)
        queue.close()
        databases = conn.transport.database.same_schema()
    assert len(databases) == 2 and len({id(d.options) for d in databases}) == 2
    from pgbroker.maintenance import shutdown

    shutdown(databases[1])  # a test's teardown closes every configuration of its schema
    assert all(d.pool.closed for d in databases)


def test_a_consumer_facing_a_server_that_never_answers_gets_a_connection_error(broker_url, database_url,
                                                                                  transport_options):
    """The server stops answering (it accepts connections and says nothing): a consumer
    whose LISTEN connection broke gives up reconnecting it after the connect timeout
    (pool_timeout) with a connection error, which kombu's and Celery's reconnect logic
    handle, instead of waiting forever."""
    from contextlib import suppress

    from tests.helpers import TcpProxy

    proxy = TcpProxy.in_front_of(database_url)
    conn = None
    try:
        conn = Connection(proxy.route(broker_url), transport_options={**transport_options, "pool_timeout": 2.0})
        q = publish(conn, "stuck", "before")
        got = []
        consumer = conn.Consumer(q, callbacks=[lambda body, message: (got.append(body), message.ack())])
        consumer.consume()
        conn.drain_events(timeout=10)
        assert got == ["before"]
        proxy.hang()
        errors, done = [], threading.Event()

        def drain():
            for _ in range(2):  # the first finds the LISTEN connection cut, the second reconnects it
                try:
                    conn.drain_events(timeout=1)
                except Exception as exc:
                    errors.append(exc)
            done.set()

        started = time.monotonic()
        threading.Thread(target=drain, daemon=True).start()
        assert done.wait(30), "drain_events() still connecting to a server that never answers"
        assert len(errors) == 2 and all(isinstance(e, conn.connection_errors) for e in errors)
        assert time.monotonic() - started < 15
    finally:
        proxy.close()
        if conn is not None:
            with suppress(Exception):
                conn.release()


def test_a_publish_with_a_retry_policy_outlasts_an_outage(broker_url, database_url, transport_options):
    """kombu's ensure() (publish(retry=True), Celery's publish retries) keeps retrying a
    lost database up to its max_retries, and the pool reconnects soon after the server
    is back (its reconnect backoff is capped)."""
    from contextlib import suppress

    from tests.helpers import TcpProxy, in_thread

    proxy = TcpProxy.in_front_of(database_url)
    conn = Connection(proxy.route(broker_url), transport_options={**transport_options, "pool_timeout": 1.0})
    try:
        q = publish(conn, "outage", "before")
        proxy.cut()
        errbacks = []
        policy = {"max_retries": 60, "interval_start": 0.2, "interval_step": 0, "interval_max": 0.2,
                  "errback": lambda exc, interval: errbacks.append(exc)}
        thread, outcome = in_thread(lambda: conn.Producer().publish(
            "during", exchange=q.exchange, routing_key="outage", retry=True, retry_policy=policy))
        wait_for(lambda: len(errbacks) >= 3, 30, what="three failed attempts")  # well past one reconnect
        assert thread.is_alive()
        proxy.restore()
        thread.join(30)
        assert outcome and not isinstance(outcome[0], Exception), outcome
    finally:
        proxy.close()
        with suppress(Exception):
            conn.release()
    with Connection(broker_url, transport_options=transport_options) as direct:
        assert sorted(b for b, _ in consume(direct, q, 2)) == ["before", "during"]


def test_a_refused_connection_fails_each_attempt_without_waiting_out_pool_timeout(schema):
    """A wrong port (or a server that is down) is reported once a connection attempt
    failed, not after pool_timeout: kombu's and Celery's retries then run at their pace."""
    from pgbroker.config import Options
    from pgbroker.db import Database
    from pgbroker.errors import DatabaseUnavailable

    db = Database("postgresql://pgbroker@127.0.0.1:1/nowhere", Options(schema=schema, pool_timeout=60))
    try:
        for _ in range(3):  # the first attempt, then the pool's reconnects (at most 1 s apart)
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match="Connection refused"):
                db.ensure_ready()
            assert time.monotonic() - started < 20  # not the 60 s pool_timeout
    finally:
        db.close()


def test_a_busy_pool_waits_for_a_connection_to_come_back(db):
    """No attempt failed: a caller waits (past the fail-fast checks) for a busy connection."""
    from tests.helpers import in_thread

    small = type(db)(db.conninfo, dataclasses.replace(db.options, pool_min_size=1, pool_max_size=1))

    def borrow():
        with small.connection() as conn:
            return conn.execute("SELECT 7").fetchone()[0]

    try:
        with small.connection() as held:
            thread, got = in_thread(borrow)
            wait_for(lambda: small.pool.get_stats().get("requests_waiting"), what="a waiting caller")
            wait_for(lambda: small.pool.get_stats().get("requests_num", 0) >= 5, what="several fail-fast checks")
            held.execute("SELECT 1")
        thread.join(10)
        assert got == [7]
    finally:
        small.close()


def test_pool_reconnect_attempts_stay_at_most_a_second_apart():
    from pgbroker.db import RECONNECT_MAX_DELAY, _Attempt

    attempt = _Attempt(timeout=300)
    delays = []
    for i in range(10):  # psycopg's pool alone: 1, 2, 4, … 512 s
        attempt.update_delay(float(i))
        delays.append(attempt.delay)
    assert max(delays) <= RECONNECT_MAX_DELAY and delays[-1] > 0


def test_connections_notice_a_vanished_server_within_a_minute(broker_url, transport_options, schema):
    """Pool and LISTEN connections carry TCP keepalives and a TCP user timeout (a host
    that went away is noticed in about a minute, not after the kernel's two hours or
    quarter of an hour); a URL's own settings win."""
    from pgbroker.config import Options, conninfo_from_url
    from pgbroker.db import Database
    from pgbroker.maintenance import shutdown

    url = broker_url + ("&" if "?" in broker_url else "?") + "keepalives_idle=7"
    db = Database.get(conninfo_from_url(url), Options.from_mapping({**transport_options, "pool_timeout": 4}))
    listener = db.listener()
    try:
        with db.connection() as conn:
            pooled = conn.info.get_parameters()
        listening = listener._connection().info.get_parameters()
        for params in (pooled, listening):
            assert (params["keepalives"], params["keepalives_idle"], params["keepalives_interval"],
                    params["keepalives_count"], params["tcp_user_timeout"]) == ("1", "7", "10", "3", "30000")
            assert params["connect_timeout"] == "4"
    finally:
        listener.close()
        shutdown(db)
