"""Exchanges, bindings and expiring queues shared through the database (no Celery worker).

"Another process" is a real subprocess here: a routing table cached in this
process must not be what makes a test pass.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

from kombu import Connection, Exchange, Queue

from pgbroker.message import channel_name
from tests.helpers import ROOT, wait_for

from .test_transport import consume, jobs


def in_other_process(broker_url: str, options: dict, code: str) -> str:
    """Run ``code`` with ``conn`` (a kombu Connection to the same broker) in a new process."""
    script = (
        "import json, sys\nfrom kombu import Connection, Exchange, Queue\n"
        f"conn = Connection({broker_url!r}, transport_options=json.loads({json.dumps(options)!r}))\n"
        + code
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_fanout_reaches_queues_bound_by_another_process(connection, broker_url, transport_options, sql):
    bcast = Exchange("bcast", type="fanout")
    queues = [Queue(f"listener-{i}", bcast) for i in range(3)]
    for q in queues:
        q(connection.default_channel).declare()
    # The publisher never declared these queues nor saw their bindings.
    in_other_process(broker_url, transport_options, (
        "conn.Producer().publish({'hello': 'all'}, exchange=Exchange('bcast', type='fanout'), "
        "declare=[Exchange('bcast', type='fanout')])\n"
    ))
    for q in queues:
        got = consume(connection, q, 1, timeout=5)
        assert [body for body, _ in got] == [{"hello": "all"}]
    # One row per bound queue, none carrying a task id.
    assert sorted(r["queue"] for r in jobs(sql)) == [q.name for q in queues]


def test_fanout_of_a_task_message_gives_every_queue_its_own_job(connection, sql):
    bcast = Exchange("tasks-bcast", type="fanout")
    for i in range(2):
        Queue(f"b{i}", bcast)(connection.default_channel).declare()
    headers = {"id": "same-task-id", "task": "t.add"}
    connection.Producer().publish({"x": 1}, exchange=bcast, headers=headers)
    rows = jobs(sql)
    assert sorted(r["queue"] for r in rows) == ["b0", "b1"]
    assert {r["task_id"] for r in rows} == {None}


def test_topic_binding_made_elsewhere_routes_our_publishes(connection, broker_url, transport_options):
    topic = Exchange("events", type="topic")
    topic(connection.default_channel).declare()
    # Warm this process's cache of the exchange's (empty) table first.
    connection.Producer().publish({"n": 0}, exchange=topic, routing_key="task.started")
    in_other_process(broker_url, transport_options, (
        "ex = Exchange('events', type='topic')\n"
        "Queue('monitor', ex, routing_key='task.#')(conn.default_channel).declare()\n"
    ))
    for n, key in enumerate(["task.started", "worker.heartbeat", "task.succeeded.late"], start=1):
        connection.Producer().publish({"n": n}, exchange=topic, routing_key=key)
    got = consume(connection, Queue("monitor", topic, routing_key="task.#"), 2, timeout=5, no_ack=True)
    assert [body for body, _ in got] == [{"n": 1}, {"n": 3}]


def test_direct_publish_matching_two_queues_stores_two_jobs(connection, sql):
    ex = Exchange("dx", type="direct")
    for name in ("d1", "d2"):
        Queue(name, ex, routing_key="k")(connection.default_channel).declare()
    connection.Producer().publish({"x": 1}, exchange=ex, routing_key="k", headers={"id": "t1", "task": "t"})
    assert sorted(r["queue"] for r in jobs(sql)) == ["d1", "d2"]


def test_a_deleted_queue_stops_receiving_within_the_cache_bound(broker_url, transport_options, sql):
    options = {**transport_options, "routing_cache_ttl": 0.3}
    with Connection(broker_url, transport_options=options) as conn:
        ex = Exchange("gone", type="direct")
        Queue("soon-deleted", ex, routing_key="k")(conn.default_channel).declare()
        conn.Producer().publish({"n": 1}, exchange=ex, routing_key="k")  # caches the table
        in_other_process(broker_url, options, "conn.default_channel.queue_delete('soon-deleted')\n")
        cached_until = time.monotonic() + 0.3
        # The routing table may be reused until the bound; after it, never.
        while time.monotonic() <= cached_until:
            time.sleep(0.05)
        conn.Producer().publish({"n": 2}, exchange=ex, routing_key="k")
    assert jobs(sql) == []


def test_unbind_and_exchange_delete_are_shared(connection, broker_url, transport_options, sql):
    ex = Exchange("ux", type="direct")
    q = Queue("uq", ex, routing_key="k")
    q(connection.default_channel).declare()
    in_other_process(broker_url, transport_options, "conn.default_channel.queue_unbind('uq', 'ux', 'k')\n")
    connection.Producer().publish({"n": 1}, exchange=ex, routing_key="k")
    assert jobs(sql) == []
    q(connection.default_channel).declare()
    in_other_process(broker_url, transport_options, "conn.default_channel.exchange_delete('ux')\n")
    assert sql("SELECT * FROM {schema}.bindings WHERE exchange = 'ux'") == []


def test_declaring_again_recreates_what_was_deleted_elsewhere_and_renews_a_lease(connection, broker_url,
                                                                                  transport_options, sql):
    """As on RabbitMQ: every declare counts, not only a connection's first."""
    fan = Exchange("refan", type="fanout")
    fan(connection.default_channel).declare()
    in_other_process(broker_url, transport_options, "conn.default_channel.exchange_delete('refan')\n")
    assert sql("SELECT type FROM {schema}.exchanges WHERE name = 'refan'") == []
    fan(connection.default_channel).declare()
    assert sql("SELECT type FROM {schema}.exchanges WHERE name = 'refan'") == [{"type": "fanout"}]
    q = Queue("redeclared", Exchange("rx", type="direct"), routing_key="k", expires=60)
    q(connection.default_channel).declare()
    in_other_process(broker_url, transport_options, "conn.default_channel.queue_delete('redeclared')\n")
    assert sql("SELECT 1 FROM {schema}.queues WHERE name = 'redeclared'") == []
    q(connection.default_channel).declare()
    first = sql("SELECT last_used_at FROM {schema}.queues WHERE name = 'redeclared'")[0]["last_used_at"]
    sql("UPDATE {schema}.queues SET last_used_at = now() - interval '50 seconds' WHERE name = 'redeclared'")
    q(connection.default_channel).declare()
    assert sql("SELECT last_used_at FROM {schema}.queues WHERE name = 'redeclared'")[0]["last_used_at"] >= first


def test_unused_queue_expires_with_its_messages_and_bindings(connection, sql):
    ex = Exchange("reply", type="direct")
    q = Queue("reply-abc", ex, routing_key="abc", expires=1.0, message_ttl=60)
    q(connection.default_channel).declare()
    connection.Producer().publish({"late": "reply"}, exchange=ex, routing_key="abc")
    kept = Queue("kept", ex, routing_key="kept", expires=1.0)
    with connection.Consumer(kept, callbacks=[lambda body, message: None], no_ack=True):
        wait_for(lambda: sql("SELECT name FROM {schema}.queues WHERE name = 'reply-abc'") == [],
                 timeout=15, what="the unused queue to expire")
        assert jobs(sql) == []
        assert [r["queue"] for r in sql("SELECT queue FROM {schema}.bindings")] == ["kept"]
    # The consumer is gone: now that one expires too.
    wait_for(lambda: sql("SELECT name FROM {schema}.queues") == [], timeout=15, what="the consumed queue to expire")


def test_auto_delete_queue_of_a_killed_consumer_goes_with_its_messages(connection, broker_url,
                                                                       transport_options, sql):
    """Celery's Broadcast queues are auto-delete, one per worker: the queue of a worker
    that died (SIGKILL here) goes once its consumer is gone, instead of collecting every
    later broadcast for ever; a live one's stays, as does one never consumed."""
    import os
    import signal
    import socket
    from contextlib import suppress

    from kombu.common import Broadcast

    script = (
        "import json, sys\nfrom kombu import Connection\nfrom kombu.common import Broadcast\n"
        f"conn = Connection({broker_url!r}, transport_options=json.loads({json.dumps(transport_options)!r}))\n"
        "with conn.Consumer(Broadcast('reload', queue='bcast.dead'), callbacks=[lambda b, m: m.ack()]):\n"
        "    while True:\n"
        "        conn.drain_events(timeout=None)\n"
    )
    dead = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, start_new_session=True)
    try:
        consumed = "SELECT name FROM {schema}.queues WHERE consumed ORDER BY name"
        Broadcast("reload", queue="bcast.idle")(connection.default_channel).declare()
        got = []
        with connection.Consumer(Broadcast("reload", queue="bcast.live"), callbacks=[lambda b, m: got.append(b)]):
            wait_for(lambda: [r["name"] for r in sql(consumed)] == ["bcast.dead", "bcast.live"],
                     timeout=30, what="both consumers' heartbeats")
            os.killpg(dead.pid, signal.SIGKILL)
            dead.wait(10)
            connection.Producer().publish({"n": 1}, exchange=Exchange("reload", type="fanout"))
            wait_for(lambda: not sql("SELECT 1 FROM {schema}.queues WHERE name = 'bcast.dead'"),
                     timeout=30, what="the dead consumer's queue to go")
            assert sorted(r["queue"] for r in sql("SELECT queue FROM {schema}.bindings")) == ["bcast.idle",
                                                                                            "bcast.live"]
            assert "bcast.dead" not in {r["queue"] for r in jobs(sql)}


            def received():
                with suppress(socket.timeout):
                    connection.drain_events(timeout=0.2)
                return got

            assert wait_for(received, timeout=10, what="the live consumer's broadcast") == [{"n": 1}]
    finally:
        if dead.poll() is None:
            os.killpg(dead.pid, signal.SIGKILL)
            dead.wait(10)


def test_message_ttl_drops_events_and_discards_tasks(connection, sql):
    ex = Exchange("ttl", type="direct")
    Queue("short-lived", ex, routing_key="k", message_ttl=0.2)(connection.default_channel).declare()
    producer = connection.Producer()
    producer.publish({"kind": "event"}, exchange=ex, routing_key="k")
    producer.publish({"kind": "task"}, exchange=ex, routing_key="k", headers={"id": "t-ttl", "task": "t"})
    # Nobody consumes that queue; a process consuming another one sweeps: it drops the
    # event and discards the task with the reason.
    with connection.Consumer(Queue("elsewhere"), callbacks=[lambda body, message: None]):
        wait_for(lambda: [(r["task_id"], r["state"]) for r in jobs(sql)] == [("t-ttl", "discarded")],
                 timeout=15, what="the sweep")
    assert "x-message-ttl" in jobs(sql)[0]["errors"][0]["error"]


def test_no_ack_consumer_never_gets_a_message_past_its_ttl(connection, sql, engine):
    ex = Exchange("ttl", type="direct")
    Queue("short-lived", ex, routing_key="k", message_ttl=0.2)(connection.default_channel).declare()
    connection.Producer().publish({"kind": "stale"}, exchange=ex, routing_key="k")
    wait_for(lambda: sql("SELECT 1 FROM {schema}.jobs WHERE inserted_at < now() - interval '0.2 s'")
             or not jobs(sql), timeout=5, what="the message to outlive its TTL")
    assert engine.take(["short-lived"], 10) == []
    assert jobs(sql) == []


def test_no_ack_get_skips_expired_messages_to_a_fresh_one(connection, sql):
    queue = Queue("ttl-get", Exchange("ttl-get"), routing_key="k", message_ttl=60)
    producer = connection.Producer()
    for n in range(3):
        producer.publish({"n": n}, exchange=queue.exchange, routing_key="k", declare=[queue])
    sql("UPDATE {schema}.jobs SET inserted_at = now() - interval '1 hour'")  # these three expired an hour ago
    producer.publish({"n": 3}, exchange=queue.exchange, routing_key="k")
    message = queue(connection.default_channel).get(no_ack=True)
    assert message is not None and message.payload == {"n": 3}
    assert jobs(sql) == []


def test_no_ack_consumers_get_one_message_per_drain_and_acking_ones_the_claim(connection, sql):
    queue = Queue("one-by-one", Exchange("obo"), routing_key="obo")
    for i in range(3):
        connection.Producer().publish({"n": i}, exchange=queue.exchange, routing_key="obo", declare=[queue])
    got = []
    with connection.Consumer(queue, callbacks=[lambda body, message: got.append(body)], no_ack=True):
        connection.drain_events(timeout=5)
        # One claim took all three; kombu callers (pidbox counting replies, event
        # receivers counting events) get one per call.
        assert got == [{"n": 0}]
        connection.drain_events(timeout=5)
        connection.drain_events(timeout=5)
        assert got == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert jobs(sql) == []


def test_claimed_but_undelivered_messages_go_back_when_the_consumer_goes(connection, sql):
    queue = Queue("taken", Exchange("tk"), routing_key="tk")
    for i in range(3):
        connection.Producer().publish({"n": i}, exchange=queue.exchange, routing_key="tk", declare=[queue])
    consumer = connection.Consumer(queue, callbacks=[lambda body, message: None])
    consumer.consume()
    # What drain_events does before delivering: claim into the transport's buffer.
    connection.transport._ready.extend((consumer.channel, p, q) for p, q in consumer.channel.claim_ready())
    assert [r["state"] for r in jobs(sql)] == ["executing"] * 3
    consumer.cancel()  # gone before they were delivered: they go back at once
    assert [r["state"] for r in jobs(sql)] == ["available"] * 3
    assert not connection.transport._ready


def test_a_consumer_listens_from_the_moment_it_consumes(connection, broker_url, transport_options):
    """A message published right after basic_consume (a pidbox reply racing the first
    claim) must be notified: the LISTEN is in place before the first claim."""
    queue = Queue("listened", Exchange("ls"), routing_key="ls")
    queue(connection.default_channel).declare()
    with connection.Consumer(queue, callbacks=[lambda body, message: None], no_ack=True):
        with Connection(broker_url, transport_options=transport_options) as other:
            other.Producer().publish({"n": 1}, exchange=queue.exchange, routing_key="ls")
        # A NOTIFY reaches a listening session some time after the publisher's commit:
        # wait for it with a bound (without the LISTEN it never comes).
        notified = []
        wait_for(lambda: notified.extend(connection.transport.listener.wait(0.5)) or notified,
                 timeout=10, what="the publish's NOTIFY")
        assert [n.channel for n in notified] == [channel_name(transport_options["schema"], "listened")]
