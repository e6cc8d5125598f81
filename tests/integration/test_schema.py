"""Migrations against a real server."""
from __future__ import annotations

import threading

import psycopg
import pytest

from pgbroker import schema as S
from pgbroker.config import Options
from pgbroker.db import Database
from pgbroker.errors import SchemaNotReady


def test_migrate_is_idempotent_and_recorded(database_url, schema):
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert S.current_version(conn, schema) == 0
        assert S.migrate(conn, schema) == [m.version for m in S.migrations()]
        assert S.migrate(conn, schema) == []
        assert S.current_version(conn, schema) == S.LATEST


def test_concurrent_migrations_agree(database_url, schema):
    results, errors = [], []

    def run():
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                results.append(S.migrate(conn, schema))
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(map(len, results)) == [0, 0, 0, len(S.migrations())]


def test_install_sql_builds_the_same_schema(database_url, schema):
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(S.install_sql(schema))
        assert S.current_version(conn, schema) == S.LATEST
        assert S.migrate(conn, schema) == []


def test_auto_migrate_off_gives_a_clear_error(database_url, schema):
    db = Database(database_url, Options(schema=schema, auto_migrate=False))
    try:
        with pytest.raises(SchemaNotReady, match="pgbroker migrate"):
            db.ensure_ready()
    finally:
        db.close()


def test_notify_channel_matches_python(db, sql, schema):
    from pgbroker.message import channel_name

    for queue in ["celery", "x" * 300, "é🚀; drop"]:
        got = sql("SELECT {schema}.notify_channel(%s) AS c", queue)[0]["c"]
        assert got == channel_name(schema, queue)


def test_url_parameters_and_pg_environment(database_url, schema, monkeypatch):
    """`pgbroker://` alone takes everything from libpq's PG* variables; URL parameters pass through."""
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(database_url)
    for key, env in (("host", "PGHOST"), ("port", "PGPORT"), ("user", "PGUSER"),
                     ("password", "PGPASSWORD"), ("dbname", "PGDATABASE")):
        if parts.get(key):
            monkeypatch.setenv(env, str(parts[key]))
    from pgbroker.config import conninfo_from_url

    url = conninfo_from_url("pgbroker://?application_name=pgbroker-test&connect_timeout=5")
    db = Database(url, Options(schema=schema))
    try:
        db.ensure_ready()
        with db.connection() as conn:
            assert conn.execute("SHOW application_name").fetchone()[0] == "pgbroker-test"
    finally:
        db.close()


@pytest.mark.parametrize("column", ["task_id", "part"])
def test_upgrade_keeps_counted_chord_parts(database_url, schema, column):
    """A database at version 10 upgrades in place, whichever name its chord_parts
    column has (version 10 named it part for a while): a part counted before the
    upgrade is not counted again after it."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        S.migrate(conn, schema, target=10)
        if column == "part":
            conn.execute(S.render("ALTER TABLE {schema}.chord_parts RENAME task_id TO part", schema))
        conn.execute(S.render("INSERT INTO {schema}.chord_parts (key, " + column + ") VALUES ('k', 'a:0')", schema))
        conn.execute(S.render("INSERT INTO {schema}.counters (key, value) VALUES ('k', 1)", schema))
        assert S.migrate(conn, schema) == [v for v in (m.version for m in S.migrations()) if v > 10]
    db = Database(database_url, Options(schema=schema))
    try:
        again = db.fetchone("chord_part_count", key="k", part="a:0", expires=None)
        fresh = db.fetchone("chord_part_count", key="k", part="b:1", expires=None)
        assert (again, fresh["value"]) == (None, 2)
    finally:
        db.close()


#: sha256 (first 16 hex digits) of every shipped migration. A database that ran one
#: never runs it again, so a change to it never reaches that database: change the
#: schema in a new migration, and add its line here.
SHIPPED = {
    1: "38910ad859db18ff",
    2: "fb987e06adf005ce",
    3: "33f93ac4b48b463c",
    4: "7e1faa79125ef6aa",
    5: "ea2d33d6a57edb8d",
    6: "26c19ca6fd2acfa5",
    7: "cfc8287858e5b730",
    8: "bd19d85c7119aebf",
    9: "297d805ee56ddceb",
    10: "ede08a6ac321b018",
    11: "f628c3a218bde373",
    12: "504febc2ac0517ba",
}


def test_shipped_migrations_never_change():
    import hashlib

    assert {m.version: hashlib.sha256(m.sql.encode()).hexdigest()[:16] for m in S.migrations()} == SHIPPED
