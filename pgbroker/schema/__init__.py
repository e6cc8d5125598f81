"""Versioned schema migrations: numbered ``NNNN_name.sql`` files in this package.

:func:`migrate` applies the missing ones in one transaction under an advisory
lock, so concurrent workers starting against an empty database agree, and
records each version in ``<schema>.migrations``. It is idempotent.
:func:`install_sql` returns the whole schema as a script for teams whose own
migration tool (Alembic, Django) owns the database.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import psycopg
from psycopg import sql

from ..config import validate_schema
from ..errors import InvalidName, PermissionDenied

_FILE_RE = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration shipped with this version of pgbroker, in order."""
    found = []
    for entry in files(__package__).iterdir():
        m = _FILE_RE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    return tuple(found)


LATEST = migrations()[-1].version


def render(sql: str, schema: str) -> str:
    """Fill in ``{schema}`` (quoted identifier) and ``{schema_name}`` (string literal)."""
    validate_schema(schema)
    return sql.replace("{schema}", f'"{schema}"').replace("{schema_name}", f"'{schema}'")


_PREAMBLE = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


def install_sql(schema: str = "pgbroker") -> str:
    """The full schema as one SQL script (for Alembic/Django migrations or review)."""
    parts = [render(_PREAMBLE, schema)]
    for m in migrations():
        parts.append(f"-- migration {m.version:04d} {m.name}\n" + render(m.sql, schema))
        parts.append(
            render("INSERT INTO {schema}.migrations (version, name) VALUES ", schema)
            + f"({m.version}, '{m.name}') ON CONFLICT DO NOTHING;\n"
        )
    return "\n".join(parts)


def applied_versions(conn: psycopg.Connection, schema: str) -> set[int]:
    """The migrations recorded in ``schema`` (none for a database without pgbroker)."""
    validate_schema(schema)
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".migrations',)
    ).fetchone()
    if not row[0]:
        return set()
    return {r[0] for r in conn.execute(render("SELECT version FROM {schema}.migrations", schema))}


_GRANTS = """
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role};
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role};
ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role};
ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT EXECUTE ON FUNCTIONS TO {role};
"""


def grant_sql(schema: str, role: str) -> str:
    """What ``role`` needs to run producers, workers, beat and the job API on ``schema``
    (no DDL: it cannot create or migrate the schema). Run it as the schema's owner, the
    role that runs ``pgbroker migrate``: its default privileges then cover the tables
    that later migrations add."""
    if not role:
        raise InvalidName("a role name is needed")
    return render(_GRANTS, schema).replace("{role}", sql.Identifier(role).as_string(None))


def current_version(conn: psycopg.Connection, schema: str) -> int:
    """The highest applied migration, 0 for a database without pgbroker."""
    return max(applied_versions(conn, schema), default=0)


def migrate(conn: psycopg.Connection, schema: str = "pgbroker", target: int | None = None) -> list[int]:
    """Apply missing migrations up to ``target`` (default: all); return the versions applied.

    Runs in its own transaction on ``conn`` (which must not be inside one), holding
    ``pg_advisory_xact_lock`` keyed by the schema so that only one process migrates.
    A schema that is already up to date is only read: a role that may use the schema
    but not create in the database (see :func:`grant_sql`) can run this on every deploy.
    A role that may not do what is needed gets :class:`PermissionDenied`.
    """
    try:
        return _migrate(conn, schema, [m for m in migrations() if target is None or m.version <= target])
    except psycopg.errors.InsufficientPrivilege as exc:
        raise PermissionDenied.of(exc, conn.info.user, schema) from exc


def _migrate(conn: psycopg.Connection, schema: str, wanted: list[Migration]) -> list[int]:
    if {m.version for m in wanted} <= applied_versions(conn, schema):
        return []
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"pgbroker.migrate.{schema}",))
        conn.execute(render(_PREAMBLE, schema))
        done = applied_versions(conn, schema)
        for m in wanted:
            if m.version in done:
                continue
            conn.execute(render(m.sql, schema))
            conn.execute(
                render("INSERT INTO {schema}.migrations (version, name) VALUES (%s, %s)", schema),
                (m.version, m.name),
            )
            applied.append(m.version)
    return applied
