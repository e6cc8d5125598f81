"""Two pgbroker schemas (``prefix``) in one database share nothing: jobs, wake-ups,
results, beat entries, unique keys."""
from __future__ import annotations

import pytest
from celery import Celery
from kombu import Connection, Queue

from pgbroker.beat import BeatEntries, every
from pgbroker.message import channel_name

from tests.conftest import fresh_schema

from .test_transport import consume


@pytest.fixture
def other_schema(database_url):
    yield from fresh_schema(database_url)


def echo(x):
    return x


def make_app(broker_url, schema):
    app = Celery(f"iso-{schema}", broker=broker_url, backend=broker_url, set_as_current=False)
    app.conf.update(broker_transport_options={"schema": schema, "polling_interval": 0.5},
                    result_backend_transport_options={"schema": schema})
    app.task(name="iso.echo", shared=False)(echo)
    return app


def test_two_prefixes_in_one_database_share_nothing(broker_url, schema, other_schema, db, sql):
    a, b = make_app(broker_url, schema), make_app(broker_url, other_schema)
    try:
        sent = a.send_task("iso.echo", args=[1], queue="shared-name", unique={})
        b.send_task("iso.echo", args=[1], queue="shared-name", unique={})  # same key, other schema: stored
        with Connection(broker_url, transport_options={"schema": other_schema}) as conn_b:
            got_b = consume(conn_b, Queue("shared-name"), 2, timeout=2)
        assert [m.headers["id"] for _, m in got_b] != [sent.id] and len(got_b) == 1
        with Connection(broker_url, transport_options={"schema": schema}) as conn_a:
            got_a = consume(conn_a, Queue("shared-name"), 2, timeout=2)
        assert [m.headers["id"] for _, m in got_a] == [sent.id]
        assert channel_name(schema, "shared-name") != channel_name(other_schema, "shared-name")

        a.backend.store_result(sent.id, 42, "SUCCESS")
        assert a.AsyncResult(sent.id).get(timeout=5) == 42
        assert b.AsyncResult(sent.id).state == "PENDING"

        BeatEntries.of(a).add("nightly", "iso.echo", every(60))
        assert [e.name for e in BeatEntries.of(b).list()] == []
    finally:
        a.close()
        b.close()
