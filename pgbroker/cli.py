"""The ``pgbroker`` command (also ``celery -A app pgbroker …``).

Importing this module also wires :mod:`pgbroker.worker` into ``celery worker``:
the ``celery`` program imports every ``celery.commands`` plug-in at start-up.
"""
from __future__ import annotations

import json
import os
import sys

import click

# Importing pgbroker.worker connects its worker_init hook (see the module docstring).
from .worker import install as install_worker
from .config import Options, conninfo_from_url, mask_url
from .errors import PgBrokerError

__all__ = ["main", "celery_command", "install_worker"]

URL_HELP = "Database URL (pgbroker:// or postgresql://); default: $PGBROKER_URL, then libpq's PG* variables."


def _connect(url: str | None, schema: str):
    import psycopg

    conninfo = conninfo_from_url(url or os.environ.get("PGBROKER_URL"))
    try:
        return psycopg.connect(conninfo, autocommit=True)
    except psycopg.OperationalError as exc:
        raise click.ClickException(f"cannot connect to {mask_url(conninfo)}: {exc}") from None


def _engine(url: str | None, schema: str):
    from .db import Database
    from .engine import engine_for

    db = Database.get(conninfo_from_url(url or os.environ.get("PGBROKER_URL")), Options(schema=schema))
    db.ensure_ready()
    return engine_for(db)


def _commands(get_url):
    @click.command()
    @click.option("--schema", default="pgbroker", show_default=True, help="Postgres schema (prefix).")
    @click.option("--target", type=int, default=None, help="Stop at this migration version.")
    @click.pass_context
    def migrate(ctx, schema, target):
        """Apply pgbroker's schema migrations (idempotent, safe to run concurrently)."""
        from .schema import LATEST, current_version, migrate as run

        with _connect(get_url(ctx), schema) as conn:
            applied = run(conn, schema, target)
            version = current_version(conn, schema)
        click.echo(f"schema {schema}: applied {applied or 'nothing'}; now at version {version} (latest {LATEST})")

    @click.command("install-sql")
    @click.option("--schema", default="pgbroker", show_default=True)
    def install_sql(schema):
        """Print the whole schema as SQL (for Alembic, Django or a DBA to apply)."""
        from .schema import install_sql as sql

        click.echo(sql(schema))

    @click.command()
    @click.option("--schema", default="pgbroker", show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_context
    def queues(ctx, schema, as_json):
        """Jobs per queue and state."""
        counts = _engine(get_url(ctx), schema).state_counts()
        if as_json:
            click.echo(json.dumps(counts))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"pgbroker queues ({schema})")
        table.add_column("queue")
        table.add_column("state")
        table.add_column("jobs", justify="right")
        for row in counts:
            table.add_row(row["queue"], row["state"], str(row["n"]))
        Console().print(table)

    return [migrate, install_sql, queues]


@click.group()
@click.option("--url", envvar="PGBROKER_URL", default=None, help=URL_HELP)
@click.pass_context
def main(ctx, url):
    """pgbroker: Celery's broker in PostgreSQL."""
    ctx.obj = {"url": url}


for _cmd in _commands(lambda ctx: (ctx.find_root().obj or {}).get("url")):
    main.add_command(_cmd)


def _celery_url(ctx):
    app = getattr(ctx.find_root().obj, "app", None)
    return app.connection_for_write().hostname if app is not None else None


@click.group("pgbroker")
def celery_command():
    """pgbroker commands, using the -A app's broker URL."""


for _cmd in _commands(_celery_url):
    celery_command.add_command(_cmd)


def run() -> None:  # pragma: no cover - console entry point helper
    try:
        main()
    except PgBrokerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
