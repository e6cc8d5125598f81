"""An application role that may use pgbroker's schema but not create in the database:
the schema's owner migrates and runs `pgbroker grant`; workers, beat, producers, the
result backend and the job API then run as the application role."""
from __future__ import annotations

import json
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from pgbroker import schema as S
from pgbroker.config import Options
from pgbroker.db import Database
from pgbroker.errors import PermissionDenied
from tests.helpers import run_pgbroker, wait_for

pytestmark = pytest.mark.acceptance


def _as(url: str, role: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{parts.netloc.rpartition('@')[2]}"))


@pytest.fixture
def role(database_url):
    """A login role with no privilege of its own: ``(name, postgresql:// URL)``."""
    name, password = "app_" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    yield name, _as(database_url, name, password)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {name}")
        conn.execute(f"DROP ROLE {name}")


@pytest.fixture
def worker_env(worker_env, role, database_url, schema):
    """The acceptance tests' environment, with broker and results reached as ``role``
    (granted by the schema's owner through the command line)."""
    granted = run_pgbroker(database_url, schema, "grant", role[0])
    assert granted.returncode == 0, granted.stderr
    url = role[1].replace("postgresql://", "pgbroker://", 1)
    return {**worker_env, "BROKER_URL": url, "RESULT_BACKEND": url, "RESULT_POLLING_INTERVAL": "30"}


def test_granted_role_runs_everything_without_ddl(role, worker_env, celery_app, start_worker, start_beat,
                                                  schema, sql):
    with psycopg.connect(role[1], autocommit=True) as conn:
        assert S.migrate(conn, schema) == []  # up to date: nothing to create, nothing refused
    worker = start_worker(pool="threads")
    m = celery_app
    assert m.add.delay(2, 3).get(timeout=30) == 5
    assert m.add.apply_async((1, 1), countdown=0.2).get(timeout=30) == 2
    m.fails_twice.delay("r").get(timeout=30)  # two retries, then success
    assert [r["what"] for r in sql("SELECT what FROM {schema}.effects WHERE key = 'r' ORDER BY id")] == [
        "attempt", "attempt", "attempt", "done"]
    beat = start_beat(overrides={"BEAT_SCHEDULE": json.dumps(
        {"tick": {"task": "tests.apps.celeryapp.record", "schedule": 1.0, "args": ["tick"]}})})
    wait_for(lambda: sql("SELECT 1 FROM {schema}.effects WHERE key = 'tick'"), what="a beat fire run")
    listed = run_pgbroker(role[1], schema, "jobs", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {"tests.apps.celeryapp.add", "tests.apps.celeryapp.record"} <= {j["task"] for j in json.loads(listed.stdout)}
    sql("CREATE TABLE {schema}.added_later (x int)")  # as a later migration would, by the owner
    with psycopg.connect(role[1], autocommit=True) as conn:
        conn.execute(f'INSERT INTO "{schema}".added_later VALUES (1)')
    for process in (worker, beat):
        assert "permission denied" not in process.output().lower()


def test_role_without_grants_gets_a_typed_error(role, database_url, schema, engine):
    db = Database(role[1], Options(schema=schema))
    try:
        with pytest.raises(PermissionDenied, match=f"pgbroker grant --schema {schema} {role[0]}"):
            db.ensure_ready()
    finally:
        db.close()


def test_auto_migrate_without_create_privilege_says_who_must_migrate(role, schema):
    db = Database(role[1], Options(schema=schema))
    try:
        with pytest.raises(PermissionDenied, match="pgbroker migrate .* as the schema's owner"):
            db.ensure_ready()
    finally:
        db.close()
    refused = run_pgbroker(role[1], schema, "migrate")
    assert refused.returncode == 1
    assert "needs its owner" in refused.stderr and "Traceback" not in refused.stderr
