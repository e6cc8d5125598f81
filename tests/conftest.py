"""Fixtures: a real PostgreSQL for every test, one fresh pgbroker schema per test.

The database is, in order: ``$PGBROKER_TEST_URL``; the local server CI starts
(``pgbroker:pgbroker@127.0.0.1:5432/pgbroker``); else an embedded PostgreSQL
(pgserver) in ``.pgbroker-embedded/`` started for the session.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import psycopg
import pytest
from kombu import Connection

from pgbroker.config import Options, broker_url as broker_url_of, conninfo_from_url
from pgbroker.db import Database
from pgbroker.engine import engine_for

ROOT = Path(__file__).resolve().parent.parent
LOCAL_URL = "postgresql://pgbroker:pgbroker@127.0.0.1:5432/pgbroker"


def _reachable(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=3).close()
        return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def database_url() -> str:
    """A ``postgresql://`` URL of a real server the tests may create schemas in."""
    url = os.environ.get("PGBROKER_TEST_URL")
    if url:
        return conninfo_from_url(url)
    if _reachable(LOCAL_URL):
        return LOCAL_URL
    from pgbroker import embedded

    # One test holds 100 transactions open at once, beside workers and fixtures.
    return embedded.start(ROOT / ".pgbroker-embedded" / "tests", settings={"max_connections": "300"})


def fresh_schema(database_url):
    """A fresh schema name; dropped afterwards with everything in it (a fixture body)."""
    name = "t_" + uuid.uuid4().hex[:12]
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def schema(database_url):
    """A fresh schema name for this test."""
    yield from fresh_schema(database_url)


@pytest.fixture
def broker_url(database_url) -> str:
    return broker_url_of(database_url)


@pytest.fixture
def transport_options(schema) -> dict:
    return {"schema": schema, "polling_interval": 0.5, "heartbeat_interval": 0.5, "rescue_after": 2.0}


@pytest.fixture
def db(database_url, transport_options) -> Database:
    database = Database.get(database_url, Options.from_mapping(transport_options))
    database.ensure_ready()
    yield database
    from pgbroker.maintenance import shutdown

    shutdown(database)


@pytest.fixture
def engine(db):
    return engine_for(db)


@pytest.fixture
def connection(broker_url, transport_options, db):
    """A kombu Connection to the test schema."""
    with Connection(broker_url, transport_options=transport_options) as conn:
        yield conn


@pytest.fixture
def sql(database_url, schema):
    """Run SQL against the test schema: ``sql("SELECT … FROM {schema}.jobs")`` -> rows as dicts."""
    from psycopg.rows import dict_row

    conn = psycopg.connect(database_url, autocommit=True, row_factory=dict_row)

    def run(query: str, *params):
        with conn.cursor() as cur:
            cur.execute(query.replace("{schema}", f'"{schema}"'), params or None)
            return cur.fetchall() if cur.description else []

    yield run
    conn.close()
