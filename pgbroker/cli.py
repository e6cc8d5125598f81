"""The ``pgbroker`` command (also ``celery -A app pgbroker …``).

Importing this module also wires :mod:`pgbroker.worker` into ``celery worker``:
the ``celery`` program imports every ``celery.commands`` plug-in at start-up.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import click

# Importing pgbroker.worker connects its worker_init hook (see the module docstring).
from .worker import install as install_worker
from .config import conninfo_from_url, mask_url, validate_schema
from .errors import InvalidName, PgBrokerError

__all__ = ["main", "celery_command", "install_worker"]

URL_HELP = "Database URL (pgbroker:// or postgresql://); default: $PGBROKER_URL, then libpq's PG* variables."


def _connect(url: str | None, schema: str):
    import psycopg

    from .config import Options
    from .db import connection_defaults

    conninfo = conninfo_from_url(url or os.environ.get("PGBROKER_URL"))
    try:
        return psycopg.connect(conninfo, autocommit=True, **connection_defaults(conninfo, Options()))
    except psycopg.OperationalError as exc:
        raise click.ClickException(f"cannot connect to {mask_url(conninfo)}: {exc}") from None


def _engine(url: str | None, schema: str):
    """The job engine of an existing schema (the job API given a URL creates none: only
    ``migrate`` does, so a mistyped --schema is reported instead of created)."""
    from .jobs import _engine as engine_of

    return engine_of(url or os.environ.get("PGBROKER_URL") or "", schema)


def _commands(get_url, get_beat_url=None):
    @click.command()
    @SCHEMA_OPTION
    @click.option("--target", type=int, default=None, help="Stop at this migration version.")
    @click.pass_context
    @_failing_cleanly
    def migrate(ctx, schema, target):
        """Apply pgbroker's schema migrations (idempotent, safe to run concurrently)."""
        from .schema import LATEST, current_version, migrate as run

        with _connect(get_url(ctx), schema) as conn:
            applied = run(conn, schema, target)
            version = current_version(conn, schema)
        click.echo(f"schema {schema}: applied {applied or 'nothing'}; now at version {version} (latest {LATEST})")

    @click.command()
    @SCHEMA_OPTION
    @click.argument("role")
    @click.option("--sql", "print_sql", is_flag=True, help="Print the statements instead of running them.")
    @click.pass_context
    @_failing_cleanly
    def grant(ctx, schema, role, print_sql):
        """Let ROLE use the schema (publish, work, beat, job API) without owning it.

        Run as the schema's owner, after migrate; tables added by later migrations
        are granted too (default privileges of the role that runs this)."""
        from .schema import current_version, grant_sql

        statements = grant_sql(schema, role)
        if print_sql:
            click.echo(statements)
            return
        with _connect(get_url(ctx), schema) as conn:
            if not current_version(conn, schema):
                raise click.ClickException(f"schema {schema} has no pgbroker tables: run migrate first")
            conn.execute(statements)
        click.echo(f"schema {schema}: {role} may now use it")

    @click.command("install-sql")
    @SCHEMA_OPTION
    def install_sql(schema):
        """Print the whole schema as SQL (for Alembic, Django or a DBA to apply)."""
        from .schema import install_sql as sql

        click.echo(sql(schema))

    return [migrate, install_sql, grant, _queues_group(get_url), _jobs_group(get_url), _status(get_url),
            _beat_group(get_beat_url or get_url)]

def _schema(ctx, param, value):
    """--schema as given, else (under ``celery -A app``) the app's ``schema`` transport
    option, else pgbroker; validated here, so no command reaches the database with a bad one."""
    if value is None:
        app = getattr(ctx.find_root().obj, "app", None)
        options = (app.conf.broker_transport_options or {}) if app is not None else {}
        value = options.get("schema") or options.get("prefix")  # the transport's alias
    try:
        return validate_schema(value or "pgbroker")
    except InvalidName as exc:
        raise click.BadParameter(str(exc)) from None


SCHEMA_OPTION = click.option("--schema", default=None, callback=_schema,
                             help="Postgres schema (prefix); default: the -A app's schema transport option "
                                  "under `celery`, else pgbroker.")
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
STATES = ("available", "scheduled", "executing", "retryable", "completed", "discarded", "cancelled")


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def _table(title: str, columns, rows, right=()):
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    _console().print(table)


def _api(get_url, ctx, schema):
    """(pgbroker.jobs, engine) for a command; pgbroker errors become clean CLI errors."""
    from . import jobs

    return jobs, _engine(get_url(ctx), schema)


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _meta_option(values) -> dict | None:
    """--meta key=value (repeatable; a JSON value is decoded, anything else is a string)."""
    if not values:
        return None
    meta = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"--meta takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            meta[key] = json.loads(value)
        except ValueError:
            meta[key] = value
    return meta


def _failing_cleanly(fn):
    """Report pgbroker's typed errors (bad state, bad rate…) and the database's as CLI
    errors, not tracebacks."""
    import functools

    import psycopg

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (PgBrokerError, psycopg.Error) as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None

    return run


def _admin(group, name: str | None = None, json_output: bool = True):
    """Register an admin command on ``group`` (``click`` itself for a top-level one):
    --schema (and --json), the click context, pgbroker errors as CLI errors."""
    def wrap(fn):
        fn = click.pass_context(_failing_cleanly(fn))
        if json_output:
            fn = JSON_OPTION(fn)
        return group.command(name)(SCHEMA_OPTION(fn))
    return wrap


def _job_dict(job) -> dict:
    from dataclasses import asdict

    data = asdict(job)
    data["state"] = job.state.value
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in data.items()}


def _queues_group(get_url):
    @click.group(invoke_without_command=True)
    @SCHEMA_OPTION
    @JSON_OPTION
    @click.pass_context
    @_failing_cleanly
    def queues(ctx, schema, as_json):
        """Queues: jobs per state, oldest available job, controls. Subcommands change controls."""
        if ctx.invoked_subcommand is not None:
            return
        jobs, engine = _api(get_url, ctx, schema)
        stats = jobs.queues(engine)
        if as_json:
            click.echo(json.dumps(stats))
            return
        _table(f"pgbroker queues ({schema})", ("queue",) + STATES + ("oldest available", "paused", "limits"), [
            [q["queue"], *(q[s] for s in STATES), _age(q["oldest_available"]), "yes" if q["paused"] else "",
             ", ".join(filter(None, [q["concurrency"] and f"concurrency {q['concurrency']}",
                                      q["rate_limit"] and f"{q['rate_limit']}/{q['rate_period']:g}s"]))]
            for q in stats], right=STATES + ("oldest available",))

    def show(queue: str, row: dict) -> None:
        if row["created"]:
            click.echo(f"warning: no producer or worker has declared queue {queue!r}; created it with these "
                       f"controls (check the name: `pgbroker queues` lists the known queues)", err=True)
        limits = [f"concurrency {row['concurrency']}" if row["concurrency"] else "",
                  f"rate {row['rate_limit']}/{row['rate_period']:g}s" if row["rate_limit"] else ""]
        click.echo(f"{queue}: {'paused' if row['paused'] else 'running'}"
                   + (f"; {', '.join(x for x in limits if x)}" if any(limits) else ""))

    def control(name, help_text, apply):
        @_admin(queues, name, json_output=False)
        @click.argument("queue")
        def command(ctx, queue, schema):
            api, engine = _api(get_url, ctx, schema)
            show(queue, apply(api, engine, queue))
        command.help = help_text
        return command

    control("pause", "Stop every worker from starting QUEUE's jobs (persisted; running jobs finish).",
            lambda api, engine, queue: api.pause(engine, queue))
    control("resume", "Let workers start QUEUE's jobs again.", lambda api, engine, queue: api.resume(engine, queue))

    @_admin(queues, "limit", json_output=False)
    @click.argument("queue")
    @click.option("--concurrency", default=None, help="Most executing jobs across all workers, or 'none'.")
    @click.option("--rate", default=None, help="Most jobs started per period: N/s, N/m, N/h, N/5s…, or 'none'.")
    def limit(ctx, queue, concurrency, rate, schema):
        """Set QUEUE's cluster-wide limits (enforced in every worker's claim)."""
        if concurrency is None and rate is None:
            raise click.UsageError("give --concurrency and/or --rate")
        api, engine = _api(get_url, ctx, schema)
        changes = {}
        if concurrency is not None:
            changes["concurrency"] = None if concurrency == "none" else _int(concurrency)
        if rate is not None:
            changes["rate"] = None if rate == "none" else rate
        show(queue, api.limit(engine, queue, **changes))

    return queues


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"expected an integer or 'none', got {text!r}") from None


def _jobs_group(get_url):
    state_option = click.option("--state", "states", multiple=True,
                                help=f"Job state (repeatable): {', '.join(STATES)}.")
    filters = [
        click.option("--queue", default=None, help="Queue name."),
        click.option("--task", default=None, help="Celery task name."),
        click.option("--meta", "meta", multiple=True, help="key=value the job's meta must contain (repeatable)."),
    ]

    def with_filters(fn):
        for option in reversed(filters):
            fn = option(fn)
        return fn

    @click.group()
    def jobs():
        """Jobs: list, show, retry, cancel."""

    @_admin(jobs, "ls")
    @state_option
    @with_filters
    @click.option("--limit", type=click.IntRange(1, 1_000_000), default=50, show_default=True,
                  help="Most jobs shown (newest first).")
    @click.option("--before", type=click.IntRange(1, 2**63 - 1), default=None,
                  help="Only job ids below this (next page).")
    def ls(ctx, states, queue, task, meta, limit, before, schema, as_json):
        """List jobs matching the filters, newest first."""
        api, engine = _api(get_url, ctx, schema)
        found = api.list(engine, state=list(states) or None, queue=queue, task=task, meta=_meta_option(meta),
                         limit=limit, before=before)
        if as_json:
            click.echo(json.dumps([_job_dict(j) for j in found]))
            return
        _table(f"pgbroker jobs ({schema})", ("id", "task id", "task", "queue", "state", "attempt", "scheduled",
                                             "last error"),
               [[j.id, j.task_id, j.task, j.queue, j.state.value, f"{j.attempt}/{j.max_attempts or '-'}",
                 f"{j.scheduled_at:%Y-%m-%d %H:%M:%S}", (j.errors[-1]["error"] if j.errors else "")[:60]]
                for j in found], right=("id", "attempt"))

    @_admin(jobs, "show")
    @click.argument("task_id")
    def show(ctx, task_id, schema, as_json):
        """One job with its attempt history and errors."""
        api, engine = _api(get_url, ctx, schema)
        job = api.get(engine, task_id)
        if job is None:
            raise click.ClickException(f"no job for task id {task_id} (never published, or pruned)")
        data = _job_dict(job)
        if as_json:
            click.echo(json.dumps(data))
            return
        errors = data.pop("errors")
        _table(f"job {job.id} ({job.task_id})", ("field", "value"),
               [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in data.items()])
        _table("attempt history", ("attempt", "at", "error"), [[e.get("attempt"), e.get("at"), e.get("error")]
                                                                for e in errors])

    @_admin(jobs, "retry")
    @click.argument("task_ids", nargs=-1, required=True)
    def retry(ctx, task_ids, schema, as_json):
        """Run discarded or cancelled jobs once more, now (jobs in other states are left
        as they are; an unknown task id is an error)."""
        api, engine = _api(get_url, ctx, schema)
        retried = api.retry(engine, task_ids)
        left = {job.task_id: job.state.value for job in api.get_many(engine, set(task_ids) - set(retried))}
        unknown = sorted(set(task_ids) - set(retried) - set(left))
        if as_json:
            click.echo(json.dumps({"retried": retried, "left": left, "unknown": unknown}))
        else:
            click.echo(f"retried {len(retried)} job(s)" + "".join(
                f"; left {task_id} ({state})" for task_id, state in sorted(left.items())))
        if unknown:  # a mistyped id, or a job pruned since
            raise click.ClickException(f"no job for task id {', '.join(unknown)} (never published, or pruned)")

    @_admin(jobs, "cancel")
    @click.argument("task_ids", nargs=-1)
    @with_filters
    @click.option("--no-revoke", is_flag=True, help="Leave executing jobs running.")
    def cancel(ctx, task_ids, queue, task, meta, no_revoke, schema, as_json):
        """Cancel jobs by TASK_IDS and/or filters: waiting ones never start, executing
        ones are revoked (terminated) through Celery's remote control."""
        api, engine = _api(get_url, ctx, schema)
        where = dict(task_ids=list(task_ids) or None, queue=queue, task=task, meta=_meta_option(meta))
        if as_json:
            done = api.cancel(engine, revoke=not no_revoke, **where)
        else:
            from rich.progress import Progress

            waiting = engine.count_jobs(states=["available", "scheduled", "retryable"], **where)
            with Progress(console=_console(), transient=True) as bar:
                step = bar.add_task("cancelling", total=waiting or None)
                done = api.cancel(engine, revoke=not no_revoke, progress=lambda n: bar.advance(step, n), **where)
        if as_json:
            click.echo(json.dumps({"cancelled": done.cancelled, "revoked": done.revoked, "task_ids": done.task_ids}))
        else:
            click.echo(f"cancelled {done.cancelled} waiting job(s); revoked {done.revoked} executing job(s)")

    return jobs


def _status(get_url):
    @_admin(click, "status")
    def status(ctx, schema, as_json):
        """Database, schema version, live workers and job totals."""
        api, engine = _api(get_url, ctx, schema)
        info = api.status(engine)
        if as_json:
            click.echo(json.dumps(info, default=str))
            return
        console = _console()
        console.print(f"[bold]pgbroker[/bold] {info['database']} schema {info['schema']} "
                      f"(version {info['version']}/{info['latest']}), {info['queues']} queue(s)"
                      + (f", paused: {', '.join(info['paused'])}" if info["paused"] else ""))
        _table("workers", ("consumer", "queues", "connections", "heartbeat"),
               [[c["id"], ", ".join(c["queues"]), c["connections"], f"{c['silent_for']:.1f}s ago"]
                for c in info["consumers"]])
        _table("jobs", STATES, [[info["jobs"][s] for s in STATES]], right=STATES)

    return status



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
    @click.group()
    def beat():
        """Beat entries in Postgres: list, add, enable, disable, remove, run now.

        Running beats (celery beat -S pgbroker) pick changes up within one tick."""

    def entry_command(name, help_text):
        """A command taking NAME that reports a missing entry or a refused change clearly."""
        def wrap(fn):
            @_admin(beat, name, json_output=False)
            @click.argument("entry")
            def command(ctx, entry, schema):
                try:
                    fn(_entries(get_url(ctx), schema), entry)
                except KeyError as exc:
                    raise click.ClickException(exc.args[0]) from None
            command.help = help_text
            return command
        return wrap

    @_admin(beat, "ls")
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

    @_admin(beat, "add", json_output=False)
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
        schedule = every(interval) if interval is not None else (
            cron(expression, tz) if expression is not None else Schedule({"at": when}))
        stored = _entries(get_url(ctx), schema).add(
            entry, task, schedule, args=parsed_args, kwargs=parsed_kwargs,
            options={"queue": queue} if queue else {}, missed=missed, max_missed=max_missed,
            catch_up_on_enable=catch_up_on_enable, enabled=not disabled)
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
    # The pool logs each failed connection attempt; a command's error already ends with the last one.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    ctx.obj = {"url": url}


for _cmd in _commands(lambda ctx: (ctx.find_root().obj or {}).get("url")):
    main.add_command(_cmd)


def _celery_url(ctx):
    app = getattr(ctx.find_root().obj, "app", None)
    return app.connection_for_write().hostname if app is not None else None


def _celery_beat_url(ctx):
    app = getattr(ctx.find_root().obj, "app", None)
    return (app is not None and app.conf.get("pgbroker_beat_url")) or _celery_url(ctx)


@click.group("pgbroker")
def celery_command():
    """pgbroker commands, using the -A app's broker URL (beat: its pgbroker_beat_url)."""


for _cmd in _commands(_celery_url, _celery_beat_url):
    celery_command.add_command(_cmd)
