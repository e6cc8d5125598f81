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

    return [migrate, install_sql, queues, _beat_group(get_url)]


def _entries(url: str | None, schema: str):
    from .beat import BeatEntries

    return BeatEntries(_engine(url, schema).db)


def _when(t, now) -> str:
    if t is None:
        return "-"
    seconds = (t - now).total_seconds()
    rel = f"in {seconds:.0f}s" if seconds >= 0 else f"{-seconds:.0f}s ago"
    return f"{t:%Y-%m-%d %H:%M:%S} ({rel})"


def _beat_group(get_url):
    schema_option = click.option("--schema", default="pgbroker", show_default=True, help="Postgres schema (prefix).")

    @click.group()
    def beat():
        """Beat entries in Postgres: list, add, enable, disable, remove, run now.

        Running beats (celery beat -S pgbroker) pick changes up within one tick."""

    def entry_command(name, help_text):
        """A command taking NAME that reports a missing entry or a refused change clearly."""
        def wrap(fn):
            @beat.command(name, help=help_text)
            @click.argument("entry")
            @schema_option
            @click.pass_context
            def command(ctx, entry, schema):
                try:
                    fn(_entries(get_url(ctx), schema), entry)
                except KeyError as exc:
                    raise click.ClickException(exc.args[0]) from None
            return command
        return wrap

    @beat.command("ls")
    @schema_option
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_context
    def ls(ctx, schema, as_json):
        """Every entry with its schedule, next and last fire."""
        from datetime import datetime, timezone

        entries = _entries(get_url(ctx), schema).list()
        if as_json:
            click.echo(json.dumps([
                {"name": e.name, "task": e.task, "schedule": e.schedule.spec, "enabled": e.enabled,
                 "missed": e.missed, "source": e.source, "trigger": e.trigger is not None, "fires": e.fires,
                 "next_fire_at": e.next_fire_at and e.next_fire_at.isoformat(),
                 "last_fire_at": e.last_fire_at and e.last_fire_at.isoformat(), "last_error": e.last_error}
                for e in entries]))
            return
        from rich.console import Console
        from rich.table import Table

        now = datetime.now(timezone.utc)
        table = Table(title=f"pgbroker beat entries ({schema})")
        for column in ("name", "task", "schedule", "enabled", "missed", "next fire", "last fire", "fires", "error"):
            table.add_column(column, justify="right" if column == "fires" else "left")
        for e in entries:
            kind = "trigger " if e.trigger else ""
            table.add_row(e.name, e.task, kind + e.schedule.describe(), "yes" if e.enabled else "no", e.missed,
                          _when(e.next_fire_at, now) if e.enabled else "-", _when(e.last_fire_at, now),
                          str(e.fires), e.last_error or "")
        Console(width=None if sys.stdout.isatty() else 200).print(table)

    @beat.command("add")
    @click.argument("entry")
    @click.argument("task")
    @click.option("--every", "interval", type=float, help="Interval in seconds.")
    @click.option("--cron", "expression", help="Cron expression (croniter syntax).")
    @click.option("--tz", default="UTC", show_default=True, help="Time zone of --cron.")
    @click.option("--at", "when", help="One-off time, ISO-8601 with a UTC offset.")
    @click.option("--args", default="[]", help="Positional arguments, a JSON list.")
    @click.option("--kwargs", default="{}", help="Keyword arguments, a JSON object.")
    @click.option("--queue", default=None, help="Queue to send to (default: the task's routing).")
    @click.option("--missed", type=click.Choice(["skip", "latest", "all"]), default="latest", show_default=True,
                  help="What to do with fires missed while no beat ran.")
    @click.option("--max-missed", type=int, default=100, show_default=True, help="Most missed fires run with --missed all.")
    @click.option("--catch-up-on-enable", is_flag=True, help="Re-enabling counts the disabled time's fires as missed.")
    @click.option("--disabled", is_flag=True, help="Add it disabled.")
    @schema_option
    @click.pass_context
    def add(ctx, entry, task, interval, expression, tz, when, args, kwargs, queue, missed, max_missed,
            catch_up_on_enable, disabled, schema):
        """Create (or redefine) ENTRY sending TASK on a schedule."""
        from .beat import Schedule, cron, every

        chosen = [x for x in (interval, expression, when) if x is not None]
        if len(chosen) != 1:
            raise click.UsageError("give exactly one of --every, --cron, --at")
        try:
            parsed_args, parsed_kwargs = json.loads(args), json.loads(kwargs)
        except ValueError as exc:
            raise click.BadParameter(f"--args/--kwargs must be JSON: {exc}") from None
        try:
            schedule = every(interval) if interval is not None else (
                cron(expression, tz) if expression is not None else Schedule({"at": when}))
            stored = _entries(get_url(ctx), schema).add(
                entry, task, schedule, args=parsed_args, kwargs=parsed_kwargs,
                options={"queue": queue} if queue else {}, missed=missed, max_missed=max_missed,
                catch_up_on_enable=catch_up_on_enable, enabled=not disabled)
        except PgBrokerError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"{stored.name}: {stored.schedule.describe()}, next fire {stored.next_fire_at}")

    @entry_command("enable", "Enable ENTRY (it fires at its next time, not at once).")
    def enable(entries, entry):
        click.echo(f"{entry}: enabled, next fire {entries.enable(entry).next_fire_at}")

    @entry_command("disable", "Disable ENTRY (kept, not fired).")
    def disable(entries, entry):
        entries.disable(entry)
        click.echo(f"{entry}: disabled")

    @entry_command("rm", "Remove ENTRY.")
    def rm(entries, entry):
        entries.remove(entry)
        click.echo(f"{entry}: removed")

    @entry_command("run-now", "Fire ENTRY once at the beats' next tick (enabled or not).")
    def run_now(entries, entry):
        click.echo(f"{entry}: fire requested at {entries.run_now(entry)}")

    return beat


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
