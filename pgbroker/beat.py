"""Celery beat with its schedule in Postgres: runtime-editable, every fire exactly once.

Run ``celery -A app beat -S pgbroker`` (or ``-S pgbroker.beat:Scheduler``) on as many
hosts as you like. Entries live in the ``beat_entries`` table; ``beat_schedule`` is
synced into it at start, and :class:`BeatEntries` (or ``pgbroker beat …``) changes it
while beat runs.

How a fire happens once: a beat locks one due entry (``FOR UPDATE SKIP LOCKED``, so
other beats take other entries), records each fire in ``beat_fires`` under the primary
key (entry, fire time) and publishes the task, in one transaction. When the broker is
pgbroker on the same database the job row is written in that transaction too, so a
beat killed between any two statements leaves either the fire and its job, or
neither. No leader is needed; the lock only saves duplicate work.

A :class:`Trigger` is an entry whose fire scans an application table (AshOban's
triggers): one job per matching row, unique per (trigger, row) while incomplete, and
the task (:class:`TriggerTask`) checks that its row still matches before acting.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from time import monotonic
from typing import Any, Iterable, Mapping, Sequence

import psycopg
from celery import Task, beat, schedules
from celery.exceptions import Retry
from croniter import CroniterError, croniter
from kombu.serialization import dumps as serialize
from kombu.utils.uuid import uuid

from . import telemetry
from .db import Database, database_for
from .engine import engine_for
from .enqueue import atomic
from .errors import InvalidSchedule
from .message import channel_name
from .unique import DEFAULT_STATES

__all__ = ["Schedule", "every", "cron", "at", "Entry", "BeatEntries", "Scheduler", "Trigger", "TriggerTask",
           "MISSED_POLICIES"]

logger = logging.getLogger(__name__)

#: What happens to missed fires (all but the latest of a gap, or a latest one beyond the grace).
MISSED_POLICIES = ("skip", "latest", "all")
#: The latest due fire this late (seconds) is still on time rather than missed (``pgbroker_beat_grace``).
DEFAULT_GRACE = 60.0
#: The longest a beat sleeps before looking at the schedule again (seconds).
DEFAULT_MAX_INTERVAL = 5.0
#: The longest interval of an ``every`` schedule (seconds): 100 years.
MAX_EVERY = 100 * 365.25 * 86400
#: Most fires one entry catches up in one go, whatever its policy.
FIRE_SCAN_LIMIT = 100_000
BEAT_CHANNEL = "pgbroker.beat"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _utc(when: datetime) -> datetime:
    return when.astimezone(timezone.utc)


# -- schedules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """A schedule in the JSON form stored with its entry.

    ``{"every": seconds}``, ``{"cron": expression, "tz": zone}``,
    ``{"solar": event, "lat": …, "lon": …}`` or ``{"at": ISO time}`` (one-off).
    Build one with :func:`every`, :func:`cron`, :func:`at` or :func:`schedule_from`;
    construction validates, so an entry is never stored dead.
    """

    spec: dict

    def __post_init__(self):
        kinds = [k for k in ("every", "cron", "solar", "at") if k in self.spec]
        if len(kinds) != 1:
            raise InvalidSchedule(f"a schedule is one of every/cron/solar/at, got {self.spec!r}")
        kind = kinds[0]
        if kind == "every":
            seconds = self.spec["every"]
            if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
                raise InvalidSchedule(f"an interval must be a positive number of seconds, got {seconds!r}")
            if seconds > MAX_EVERY:
                raise InvalidSchedule(f"an interval must be at most {MAX_EVERY:.0f} seconds (100 years), "
                                      f"got {seconds!r}")
        elif kind == "cron":
            expression, zone = self.spec["cron"], self.spec.get("tz", "UTC")
            if not isinstance(expression, str) or not croniter.is_valid(expression):
                raise InvalidSchedule(f"invalid cron expression {expression!r}")
            _zone(zone)
            try:
                self._next_cron(datetime.now(timezone.utc))
            except CroniterError:  # e.g. 30 February
                raise InvalidSchedule(f"cron expression {expression!r} never fires") from None
        elif kind == "solar":
            self._solar()
        else:
            try:
                when = datetime.fromisoformat(self.spec["at"])
            except (TypeError, ValueError):
                raise InvalidSchedule(f"a one-off time is an ISO-8601 string, got {self.spec['at']!r}") from None
            if when.tzinfo is None:
                raise InvalidSchedule(f"a one-off time needs a UTC offset, got {self.spec['at']!r}")

    @property
    def kind(self) -> str:
        return next(k for k in ("every", "cron", "solar", "at") if k in self.spec)

    def _solar(self, now: datetime | None = None) -> schedules.solar:
        try:
            return schedules.solar(self.spec["solar"], self.spec["lat"], self.spec["lon"],
                                   nowfun=(lambda: now) if now else None)
        except ImportError as exc:
            raise InvalidSchedule(f"solar schedules need the ephem package: {exc}") from None
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidSchedule(f"invalid solar schedule {self.spec!r}: {exc}") from None

    def first(self, now: datetime, anchor: datetime) -> datetime | None:
        """The first fire of a new or redefined entry: a one-off keeps its time even when
        past (its missed-fire policy decides), every other kind fires after ``now``."""
        if self.kind == "at":
            return _utc(datetime.fromisoformat(self.spec["at"]))
        return self.next_after(now, anchor)

    def next_after(self, t: datetime, anchor: datetime) -> datetime | None:
        """The first fire strictly after ``t`` (None: never again). Intervals count from
        ``anchor`` (anchor + k × interval, k ≥ 1), so every beat computes the same times."""
        kind = self.kind
        if kind == "every":
            step = timedelta(seconds=self.spec["every"])
            k = max(1, (t - anchor) // step + 1)
            return anchor + k * step
        if kind == "cron":
            return self._next_cron(t)
        if kind == "solar":
            remaining = self._solar(t).remaining_estimate(t)
            return _utc(t + remaining)
        when = _utc(datetime.fromisoformat(self.spec["at"]))
        return when if when > t else None

    def _next_cron(self, t: datetime) -> datetime:
        zone = _zone(self.spec.get("tz", "UTC"))
        fields = self.spec["cron"].split()
        fixed_hours = len(fields) > 1 and fields[1] != "*"
        current = t.astimezone(zone)
        while True:
            nxt = croniter(self.spec["cron"], current, day_or=not self.spec.get("day_and")).get_next(datetime)
            # When clocks go back an hour, a wall time such as 01:30 happens twice. An
            # entry bound to given hours fires at its first occurrence only (as cron
            # does); entries for every hour follow real time and fire in both.
            repeated = nxt.replace(fold=0).utcoffset() != nxt.utcoffset()
            if not (repeated and fixed_hours):
                return _utc(nxt)
            current = nxt

    def fires(self, start: datetime, end: datetime, anchor: datetime, limit: int) -> list[datetime]:
        """Fire times in [start, end] (``start`` is itself a fire), the last ``limit`` of them."""
        out: list[datetime] = []
        if self.kind == "every":
            step = timedelta(seconds=self.spec["every"])
            count = (end - start) // step + 1
            first = max(0, count - limit)
            return [start + i * step for i in range(first, count)] if end >= start else []
        t: datetime | None = start
        scanned = 0
        while t is not None and t <= end and scanned < FIRE_SCAN_LIMIT:
            out.append(t)
            t = self.next_after(t, anchor)
            scanned += 1
        return out[-limit:]

    def describe(self) -> str:
        kind = self.kind
        if kind == "every":
            return f"every {timedelta(seconds=self.spec['every'])}"
        if kind == "cron":
            return f"cron {self.spec['cron']} ({self.spec.get('tz', 'UTC')})"
        if kind == "solar":
            return f"solar {self.spec['solar']} at ({self.spec['lat']}, {self.spec['lon']})"
        return f"once at {self.spec['at']}"


def _zone(name: str):
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidSchedule(f"unknown time zone {name!r}: {exc}") from None


def _aware(when: datetime | None, zone=None) -> datetime:
    if not isinstance(when, datetime):
        raise InvalidSchedule(f"a one-off schedule needs a datetime, got {when!r}")
    return when if when.tzinfo else when.replace(tzinfo=zone or timezone.utc)


def every(interval: float | timedelta) -> Schedule:
    """Fire every ``interval`` (seconds or timedelta), counted from when the entry is added."""
    seconds = interval.total_seconds() if isinstance(interval, timedelta) else interval
    return Schedule({"every": seconds})


def cron(expression: str, tz: str = "UTC", day_and: bool = False) -> Schedule:
    """Fire on a cron expression (croniter syntax, 5 fields or 6 with seconds last) in zone
    ``tz``. When both day fields are restricted, a day matches either of them, as in cron;
    with ``day_and`` it must match both, as in Celery's ``crontab``."""
    return Schedule({"cron": expression, "tz": str(tz), **({"day_and": True} if day_and else {})})


def at(when: datetime) -> Schedule:
    """Fire once, at ``when`` (naive times are UTC)."""
    return Schedule({"at": _aware(when).isoformat()})


def _zone_name(tz) -> str:
    return getattr(tz, "key", None) or str(tz)


def schedule_from(value: Any, app=None) -> Schedule:
    """A :class:`Schedule` from what ``beat_schedule`` accepts (seconds, ``timedelta``,
    ``celery.schedules.schedule``/``crontab``/``solar``), a cron string, a ``datetime``
    (one-off) or the JSON form. Raises :class:`~pgbroker.errors.InvalidSchedule`."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, dict):
        return Schedule(dict(value))
    if isinstance(value, (int, float, timedelta)) and not isinstance(value, bool):
        return every(value)
    if isinstance(value, str):
        return cron(value)
    if isinstance(value, datetime):
        return at(_aware(value, app.timezone if app is not None else None))
    if isinstance(value, schedules.crontab):
        fields = [_cron_field(f) for f in (value._orig_minute, value._orig_hour, value._orig_day_of_month,
                                            value._orig_month_of_year, value._orig_day_of_week)]
        return cron(" ".join(fields), _zone_name(value.tz if app is None else app.timezone),
                    day_and=fields[2] != "*" and fields[4] != "*")
    if isinstance(value, schedules.solar):
        return Schedule({"solar": value.event, "lat": value.lat, "lon": value.lon})
    if isinstance(value, schedules.schedule):
        return every(value.run_every)
    raise InvalidSchedule(f"cannot store a {type(value).__name__} schedule: {value!r}")


def _cron_field(value: Any) -> str:
    """A field of a Celery ``crontab`` (a string, a number, or a set, list or range of
    them) as a cron field."""
    if isinstance(value, (str, int)):
        return str(value)
    return ",".join(str(v) for v in value)


def _json(value: Any, what: str) -> Any:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidSchedule(f"{what} must be JSON-serialisable to be stored: {exc}") from None
    if "\\u0000" in text:
        raise InvalidSchedule(f"{what} contain a NUL character, which Postgres cannot store")
    return json.loads(text)


# -- triggers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    """Run ``task`` for each row of an application table that matches a filter.

    On each fire of ``schedule`` a beat scans the rows ``query`` selects (SQL text or a
    SQLAlchemy ``select``; it must return the ``key`` column) in pages of ``page_size``
    by ``key``, and enqueues ``task(key)`` on ``queue`` (default: the trigger's name)
    once per row while that row's job is incomplete (or ever, with ``trigger_once``).
    The task, declared with ``@app.task(base=TriggerTask, trigger=the_trigger)``,
    does nothing when its row no longer matches, is tried ``max_attempts`` times, and
    ``on_error`` (a task name) is sent ``(key, trigger=, error=)`` after the last failure.
    The query runs on pgbroker's database; write literal ``%`` as ``%%``.
    """

    name: str
    task: str
    schedule: Any
    query: Any
    key: str = "id"
    queue: str | None = None
    max_attempts: int = 1
    trigger_once: bool = False
    on_error: str | None = None
    page_size: int = 1000
    retry_backoff: float = 1.0

    def __post_init__(self):
        if not _IDENTIFIER.match(self.key):
            raise InvalidSchedule(f"trigger key must be a plain column name, got {self.key!r}")
        if self.max_attempts < 1 or self.page_size < 1:
            raise InvalidSchedule("max_attempts and page_size must be >= 1")

    @property
    def target_queue(self) -> str:
        return self.queue or self.name

    def spec(self) -> dict:
        """The JSON stored with the trigger's entry (the query compiled, with its parameters)."""
        sql, params = _compile(self.query)
        return {"sql": sql, "params": _json(params, f"trigger {self.name!r} query parameters"), "key": self.key,
                "queue": self.target_queue, "once": self.trigger_once, "page_size": self.page_size}

    def matches(self, app, key: Any, conn: psycopg.Connection | None = None) -> bool:
        """Whether row ``key`` still matches (on ``conn`` to see your own transaction)."""
        spec = self.spec()
        db = _beat_database(app)
        sql = _trigger_sql(db, "trigger_matches", spec)
        params = {**spec["params"], "key": key}
        if conn is not None:
            return bool(conn.execute(sql, params).fetchone()[0])
        with db.connection() as c:
            return bool(c.execute(sql, params).fetchone()[0])


def _compile(query: Any) -> tuple[str, dict]:
    if isinstance(query, str):
        return query, {}
    try:
        from sqlalchemy.dialects.postgresql import psycopg as pg_dialect
    except ImportError:  # pragma: no cover - a non-string query implies SQLAlchemy
        raise InvalidSchedule("a trigger query is SQL text or a SQLAlchemy select") from None
    try:
        compiled = query.compile(dialect=pg_dialect.dialect())
    except Exception as exc:
        raise InvalidSchedule(f"cannot compile trigger query {query!r}: {exc}") from None
    return str(compiled), dict(compiled.params)


def _trigger_sql(db: Database, name: str, spec: dict) -> str:
    """A trigger statement of queries.sql with the application's query and key filled in."""
    return db.q[name].replace("{key}", f'"{spec["key"]}"').replace("{filter}", spec["sql"])


class TriggerTask(Task):
    """Base of a trigger's task: ``@app.task(base=TriggerTask, trigger=my_trigger)``.

    The task receives the row's key. It returns None without running when the row no
    longer matches, retries up to the trigger's ``max_attempts``, then sends
    ``on_error``.
    """

    trigger: Trigger | None = None

    def __call__(self, key, *args, **kwargs):
        trigger = self.trigger
        if trigger is not None and not trigger.matches(self.app, key):
            logger.info("pgbroker: %s(%r): the row no longer matches trigger %s; nothing to do",
                        self.name, key, trigger.name)
            return None
        try:
            return self.run(key, *args, **kwargs)
        except Retry:
            raise
        except Exception as exc:
            retries = self.request.retries or 0
            if trigger is not None and not self.request.called_directly and retries + 1 < trigger.max_attempts:
                raise self.retry(exc=exc, countdown=trigger.retry_backoff * (2 ** retries),
                                 max_retries=trigger.max_attempts - 1)
            raise

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        trigger = self.trigger
        if trigger is not None and trigger.on_error:
            self.app.send_task(trigger.on_error, args=[args[0] if args else None],
                               kwargs={"trigger": trigger.name, "error": repr(exc)})
        super().on_failure(exc, task_id, args, kwargs, einfo)


# -- entries and the runtime API -------------------------------------------------------------


@dataclass
class Entry:
    """A beat entry as stored (see ``beat_entries``)."""

    name: str
    task: str
    schedule: Schedule
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    missed: str = "latest"
    max_missed: int = 100
    catch_up_on_enable: bool = False
    enabled: bool = True
    source: str = "api"
    trigger: dict | None = None
    anchor_at: datetime | None = None
    next_fire_at: datetime | None = None
    last_fire_at: datetime | None = None
    run_requested_at: datetime | None = None
    fires: int = 0
    last_error: str | None = None

    @classmethod
    def from_row(cls, row: dict) -> "Entry":
        names = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in row.items() if k in names}
        values["schedule"] = Schedule(row["schedule"])
        return cls(**values)


def _beat_database(app) -> Database:
    db = database_for(app, app.conf.get("pgbroker_beat_url"))
    db.ensure_ready()
    return db


class BeatEntries:
    """Add, change, enable, disable, remove and run beat entries at run time.

    ``BeatEntries.of(app)`` uses the app's broker database (or ``pgbroker_beat_url``).
    Every change wakes the running beats, which pick it up within one tick.
    """

    def __init__(self, db: Database, app=None):
        self.db = db
        self.app = app

    @classmethod
    def of(cls, app) -> "BeatEntries":
        return cls(_beat_database(app), app)

    def add(self, name: str, task: str, schedule: Any, *, args: Sequence = (), kwargs: dict | None = None,
            options: dict | None = None, missed: str = "latest", max_missed: int = 100,
            catch_up_on_enable: bool = False, enabled: bool | None = True, source: str = "api",
            trigger: Trigger | None = None) -> Entry:
        """Create or redefine entry ``name``; returns it as stored.

        ``schedule``: anything :func:`schedule_from` takes. ``options``: apply_async
        options (queue, priority, expires, headers, …). ``missed``: ``"skip"``,
        ``"latest"`` (default: one run for a gap) or ``"all"`` (each missed fire, the
        last ``max_missed``). A redefinition with the same schedule keeps the entry's
        next fire; ``enabled=None`` keeps its enabled flag.
        """
        if not isinstance(name, str) or not name or len(name) > 200:
            raise InvalidSchedule(f"an entry name is a non-empty string of at most 200 characters, got {name!r}")
        if not isinstance(task, str) or not task:
            raise InvalidSchedule(f"entry {name!r}: task must be a task name, got {task!r}")
        if missed not in MISSED_POLICIES:
            raise InvalidSchedule(f"entry {name!r}: missed must be one of {MISSED_POLICIES}, got {missed!r}")
        if not isinstance(max_missed, int) or isinstance(max_missed, bool) or max_missed < 1:
            raise InvalidSchedule(f"entry {name!r}: max_missed must be an integer >= 1, got {max_missed!r}")
        for what, value, kind in (("args", args, (list, tuple)), ("kwargs", kwargs, Mapping),
                                  ("options", options, Mapping)):
            if value is not None and not isinstance(value, kind):
                raise InvalidSchedule(f"entry {name!r}: {what} must be a {'list' if what == 'args' else 'mapping'}, "
                                      f"got {type(value).__name__} {value!r}")
        sched = schedule_from(schedule, self.app)
        spec = None
        if trigger is not None:
            spec = trigger.spec()
            self._check_query(name, spec)
        now = datetime.now(timezone.utc).replace(microsecond=0)
        self.db.fetchall(
            "beat_entry_save", entry=name, task=task, schedule=_jsonb(sched.spec),
            args=_jsonb(_json(list(args or ()), f"entry {name!r} args")),
            kwargs=_jsonb(_json(dict(kwargs or {}), f"entry {name!r} kwargs")),
            options=_jsonb(_json(dict(options or {}), f"entry {name!r} options")),
            missed=missed, max_missed=int(max_missed), catch_up_on_enable=bool(catch_up_on_enable),
            enabled=enabled, source=source, trigger=_jsonb(spec) if spec else None, anchor_at=now,
            next_fire_at=sched.first(now, now),
        )
        return self.get(name)

    def add_trigger(self, trigger: Trigger, source: str = "api", enabled: bool | None = True) -> Entry:
        """Create or redefine the entry that fires ``trigger``."""
        return self.add(trigger.name, trigger.task, trigger.schedule, options={"queue": trigger.target_queue},
                        missed="latest", source=source, enabled=enabled, trigger=trigger)

    def _check_query(self, name: str, spec: dict) -> None:
        """Run the trigger's page query for no rows, so a broken filter fails here."""
        sql = _trigger_sql(self.db, "trigger_page", spec)
        try:
            with self.db.transaction() as conn:
                conn.execute(sql, {**spec["params"], "first": True, "after": None, "limit": 0})
        except psycopg.Error as exc:
            raise InvalidSchedule(f"trigger {name!r}: its query does not run: {exc}") from None

    def get(self, name: str) -> Entry | None:
        rows = self.db.fetchall("beat_entries_list", names=[name])
        return Entry.from_row(rows[0]) if rows else None

    def list(self) -> list[Entry]:
        return [Entry.from_row(r) for r in self.db.fetchall("beat_entries_list", names=None)]

    def _require(self, rows: list, name: str) -> None:
        if not rows:
            raise KeyError(f"no beat entry named {name!r}")

    def enable(self, name: str) -> Entry:
        """Enable ``name``. It fires at its next scheduled time after now, unless it was
        added with ``catch_up_on_enable`` (then the disabled time's fires are missed fires)."""
        entry = self.get(name)
        self._require([entry] if entry else [], name)
        now = datetime.now(timezone.utc)
        nxt = None if entry.catch_up_on_enable else entry.schedule.next_after(now, entry.anchor_at)
        if entry.schedule.kind == "at" and entry.fires == 0:
            nxt = entry.next_fire_at  # a one-off that never fired keeps its time
        self.db.fetchall("beat_entry_enable", entry=name, enabled=True, next_fire_at=nxt)
        return self.get(name)

    def disable(self, name: str) -> Entry:
        self._require(self.db.fetchall("beat_entry_enable", entry=name, enabled=False, next_fire_at=None), name)
        return self.get(name)

    def remove(self, name: str) -> None:
        self._require(self.db.fetchall("beat_entry_remove", entry=name), name)

    def run_now(self, name: str) -> datetime:
        """Ask the beats to fire ``name`` once at their next tick (enabled or not);
        returns the request's time, which is that fire's key."""
        rows = self.db.fetchall("beat_entry_run_now", entry=name)
        self._require(rows, name)
        return rows[0]["run_requested_at"]

    def fire_log(self, name: str, limit: int = 100) -> list[dict]:
        """The latest fires of ``name`` (fire time, who fired it, task id), newest first."""
        return self.db.fetchall("beat_fires_of", entry=name, limit=limit)

    def sync(self, entries: dict, triggers: Iterable[Trigger] = ()) -> list[str]:
        """Make the ``source='config'`` entries what ``entries`` (a ``beat_schedule``)
        and ``triggers`` say, keeping each one's enabled flag and next fire when its
        schedule did not change; config entries no longer listed are removed."""
        names = []
        for name, e in entries.items():
            self.add(name, e["task"], e["schedule"], args=e.get("args") or (), kwargs=e.get("kwargs"),
                     options=e.get("options"), missed=e.get("missed", "latest"),
                     max_missed=e.get("max_missed", 100), catch_up_on_enable=e.get("catch_up_on_enable", False),
                     enabled=None, source="config")
            names.append(name)
        for trigger in triggers:
            self.add_trigger(trigger, source="config", enabled=None)
            names.append(trigger.name)
        self.db.fetchall("beat_config_prune", keep=names)
        return names


def _jsonb(value: Any):
    from psycopg.types.json import Jsonb

    return Jsonb(value)


# -- the scheduler -----------------------------------------------------------------------------


class Scheduler(beat.Scheduler):
    """``celery beat -S pgbroker``: the schedule in Postgres, each fire exactly once with
    any number of beats. ``beat_max_loop_interval`` (default 5 s) bounds how long a
    change made elsewhere waits when no notification reaches the beat."""

    max_interval = DEFAULT_MAX_INTERVAL

    def __init__(self, app, *args, **kwargs):
        self.db: Database | None = None
        self.store: BeatEntries | None = None
        self._listener = None
        self._wait = 0.0
        self._joins = False
        self._failed: dict[str, float] = {}  # entry → monotonic time until which it is not tried
        self.who = f"{socket.gethostname()}/{os.getpid()}"
        super().__init__(app, *args, **kwargs)
        self.grace = float(app.conf.get("pgbroker_beat_grace") or DEFAULT_GRACE)

    # Celery's Scheduler API ----------------------------------------------------------------

    def setup_schedule(self):
        from .worker import uses_pgbroker

        self.db = database_for(self.app, self.app.conf.get("pgbroker_beat_url"))
        self.store = BeatEntries(self.db, self.app)
        self._joins = uses_pgbroker(self.app) and database_for(self.app) is self.db
        if not self._joins:
            logger.warning("pgbroker beat: the broker is not pgbroker on %s: fires are recorded once, but a "
                           "crash between recording and publishing can lose that fire", self.db.safe_url)
        self._start()

    def _start(self) -> bool:
        """Sync the configured entries and listen for changes. A database that cannot be
        reached yet is logged and tried again each tick, as a worker waits for its broker;
        any other error (an invalid entry, a schema not migrated) stops the beat."""
        try:
            self._sync_and_listen()
        except (psycopg.OperationalError, ConnectionError) as exc:
            logger.error("pgbroker beat: cannot reach %s: %s; retrying in %.0fs", self.db.safe_url, exc,
                         self.max_interval)
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            return False
        return True

    def _sync_and_listen(self) -> None:
        self.db.ensure_ready()
        entries = dict(self._default_entries())
        entries.update(self.app.conf.beat_schedule or {})
        triggers = list(self.app.conf.get("pgbroker_triggers") or ())
        for task in self.app.tasks.values():
            if isinstance(getattr(task, "trigger", None), Trigger) and task.trigger not in triggers:
                triggers.append(task.trigger)
        synced = self.store.sync(entries, triggers)
        logger.info("pgbroker beat: %d configured entries synced to %s", len(synced), self.db.safe_url)
        self._listener = self.db.listener()
        self._listener.listen([channel_name(self.db.options.schema, BEAT_CHANNEL)])
        self._listener.fds()

    def _default_entries(self) -> dict:
        conf = self.app.conf
        if conf.result_expires and not self.app.backend.supports_autoexpire:
            return {"celery.backend_cleanup": {"task": "celery.backend_cleanup",
                                               "schedule": schedules.crontab("0", "4", "*"),
                                               "options": {"expires": 12 * 3600}}}
        return {}

    def get_schedule(self):
        return {}

    def set_schedule(self, schedule):  # the schedule lives in the database
        pass

    schedule = property(get_schedule, set_schedule)

    @property
    def info(self):
        db = self.db or database_for(self.app, self.app.conf.get("pgbroker_beat_url"))  # connects nothing
        return f"    . db -> {db.safe_url} (schema {db.options.schema})"

    def tick(self, *args, **kwargs) -> float:
        """Wait until something is due (or a change is notified), fire what is due, and
        return 0: the waiting happens here, on the notification socket."""
        if self._listener is None and not self._start():
            return self.max_interval
        if self._wait > 0:
            try:
                self._listener.wait(self._wait)
            except Exception as exc:  # the database went away: try again a tick later
                logger.warning("pgbroker beat: waiting for changes failed: %s", exc)
        try:
            self.run_pending()
            row = self.db.fetchone("beat_next_due", skip=self._failing())
            due = row["seconds"] if row and row["seconds"] is not None else self.max_interval
            self._wait = min(max(due, 0.0), self.max_interval)
        except (psycopg.Error, ConnectionError) as exc:
            logger.error("pgbroker beat: cannot reach %s: %s; retrying in %.0fs", self.db.safe_url, exc,
                         self.max_interval)
            self._wait = self.max_interval
        return 0

    def close(self):
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        super().close()

    # Firing ------------------------------------------------------------------------------------

    def run_pending(self) -> int:
        """Fire every due entry and finish open trigger scans; returns fires recorded here."""
        # Each entry at most once per call, even if it is due again at once; an entry that
        # could not fire waits max_interval before this beat tries it again.
        fired, handled = 0, self._failing()
        while True:
            sent: list[dict] = []
            with self.db.transaction() as conn:
                row = self.db.fetchone("beat_lock_due", conn, skip=handled)
                if row is None:
                    break
                name = row["name"]
                handled.append(name)
                try:
                    with conn.transaction():
                        fired += self._fire(conn, row, sent)
                    self._failed.pop(name, None)
                except Exception as exc:
                    sent.clear()
                    logger.error("pgbroker beat: entry %s could not fire (tried again in %.0fs): %s", name,
                                 self.max_interval, exc,
                                 exc_info=name not in self._failed and not isinstance(exc, psycopg.Error))
                    self._failed[name] = monotonic() + self.max_interval
                    self.db.fetchall("beat_entry_error", conn, entry=name, error=f"{type(exc).__name__}: {exc}")
            for event in sent:  # committed: each fire is reported once, cluster-wide
                telemetry.emit("beat.fired", {"lateness": (event.pop("now") - event["fire_at"]).total_seconds()},
                               {**event, "fire_at": event["fire_at"].isoformat()})
        self.db.fetchall("beat_fire_orphans")
        attempts = 0
        while attempts < 100 and self._scan_page():
            attempts += 1
        return fired

    def _failing(self) -> list[str]:
        """Entries that could not fire less than max_interval ago (this beat leaves them be)."""
        now = monotonic()
        return [name for name, until in self._failed.items() if until > now]

    def _due_fires(self, row: dict, sched: Schedule) -> list[datetime]:
        now, start = row["db_now"], row["next_fire_at"]
        if not row["enabled"] or start is None or start > now:
            return []
        # Only the latest due fire can be on time: the earlier ones of a gap were missed,
        # even when the gap was shorter than the grace, and follow the entry's policy.
        if row["missed"] != "all":
            latest = sched.fires(start, now, row["anchor_at"], limit=1)
            on_time = [t for t in latest if (now - t).total_seconds() <= self.grace]
            return latest if row["missed"] == "latest" else on_time
        due = sched.fires(start, now, row["anchor_at"], limit=row["max_missed"] + 1)
        return due if (now - due[-1]).total_seconds() <= self.grace else due[-row["max_missed"]:]

    def _fire(self, conn: psycopg.Connection, row: dict, sent: list[dict]) -> int:
        sched = Schedule(row["schedule"])
        fires = [(t, False) for t in self._due_fires(row, sched)]
        due = row["enabled"] and row["next_fire_at"] is not None and row["next_fire_at"] <= row["db_now"]
        next_fire_at = sched.next_after(row["db_now"], row["anchor_at"]) if due else row["next_fire_at"]
        if row["run_requested_at"] is not None:
            fires.append((row["run_requested_at"], True))
        recorded = []
        for fire_at, manual in fires:
            trigger = row["trigger"]
            got = self.db.fetchone("beat_fire_record", conn, entry=row["name"], fire_at=fire_at, fired_by=self.who,
                                   manual=manual, done=trigger is None, cursor=None)
            if got is None:
                continue  # another beat fired it
            recorded.append(fire_at)
            if trigger is None:
                task_id = self._send(conn, row, fire_at, manual)
                self.db.fetchall("beat_fire_sent", conn, entry=row["name"], fire_at=fire_at, task_id=task_id)
                sent.append({"now": row["db_now"], "entry": row["name"], "task": row["task"], "task_id": task_id,
                             "fire_at": fire_at})
            logger.info("pgbroker beat: %s fired for %s%s", row["name"], fire_at.isoformat(),
                        " (run now)" if manual else "")
        self.db.fetchall(
            "beat_entry_advance", conn, entry=row["name"], next_fire_at=next_fire_at,
            last_fire_at=max(recorded) if recorded else None, fired=len(recorded),
            handled_request=row["run_requested_at"] or datetime.min.replace(tzinfo=timezone.utc),
        )
        return len(recorded)

    def _send(self, conn: psycopg.Connection, row: dict, fire_at: datetime, manual: bool) -> str:
        options = dict(row["options"])
        headers = dict(options.pop("headers", None) or {})
        meta = {"beat_entry": row["name"], "fire_at": fire_at.isoformat()}
        if manual:
            meta["manual"] = True
        headers.update(celery_beat_task=True, pgbroker_meta=meta)
        task = self.app.tasks.get(row["task"])
        send = task.apply_async if task is not None else (
            lambda a, k, **o: self.app.send_task(row["task"], a, k, **o))
        if self._joins:
            with atomic(conn):
                result = send(row["args"], row["kwargs"], producer=self.producer, headers=headers, **options)
        else:
            result = send(row["args"], row["kwargs"], producer=self.producer, headers=headers, **options)
        return result.id

    # Triggers ----------------------------------------------------------------------------------

    def _scan_page(self) -> bool:
        """Enqueue one page of an open trigger fire; False when none is open (to this beat)."""
        with self.db.transaction() as conn:
            fire = self.db.fetchone("beat_fire_lock_open", conn)
            if fire is None:
                return False
            try:
                with conn.transaction():
                    self._enqueue_page(conn, fire)
            except Exception as exc:
                logger.error("pgbroker beat: trigger %s failed at fire %s: %s", fire["entry"],
                             fire["fire_at"].isoformat(), exc)
                self.db.fetchall("beat_fire_progress", conn, entry=fire["entry"], fire_at=fire["fire_at"],
                                 cursor=_jsonb(fire["cursor"]), enqueued=0, done=True)
                self.db.fetchall("beat_entry_error", conn, entry=fire["entry"], error=f"{type(exc).__name__}: {exc}")
        return True

    def _enqueue_page(self, conn: psycopg.Connection, fire: dict) -> None:
        spec, cursor = fire["trigger"], fire["cursor"]
        if not self._joins:
            raise InvalidSchedule("triggers need the pgbroker broker on the beat's database")
        params = {**spec["params"], "first": cursor is None, "after": cursor["after"] if cursor else None,
                  "limit": spec["page_size"]}
        keys = list(dict.fromkeys(r[0] for r in conn.execute(_trigger_sql(self.db, "trigger_page", spec), params)))
        todo = keys
        if keys and spec["once"]:
            fresh = {r["row_key"] for r in self.db.fetchall("trigger_rows_claim", conn, trigger=fire["entry"],
                                                             keys=[str(k) for k in keys])}
            todo = [k for k in keys if str(k) in fresh]
        inserted = []
        if todo:
            channel = self.producer.channel
            items = [(spec["queue"], self._trigger_message(channel, fire, spec, key)) for key in todo]
            inserted = engine_for(self.db).enqueue_many(items, conn=conn)
        done = len(keys) < spec["page_size"]
        self.db.fetchall("beat_fire_progress", conn, entry=fire["entry"], fire_at=fire["fire_at"],
                         cursor=_jsonb({"after": keys[-1]} if keys else cursor), enqueued=len(inserted), done=done)
        if done:
            logger.info("pgbroker beat: trigger %s fire %s enqueued %d jobs", fire["entry"],
                        fire["fire_at"].isoformat(), fire["enqueued"] + len(inserted))

    def _trigger_message(self, channel, fire: dict, spec: dict, key: Any) -> dict:
        """The kombu message of ``task(key)`` for one matching row (built here so that a
        page is stored in one statement)."""
        amqp = self.app.amqp
        task_id = uuid()
        message = amqp.create_task_message(task_id, fire["task"], [key], {}, origin=self.who)
        headers = dict(message.headers)
        headers.update(
            pgbroker_unique={"key": f"trigger:{fire['entry']}:{key}", "states": list(DEFAULT_STATES), "period": None},
            pgbroker_meta={"trigger": fire["entry"], "row": key, "fire_at": fire["fire_at"].isoformat()},
        )
        content_type, content_encoding, body = serialize(message.body, serializer=self.app.conf.task_serializer)
        properties = dict(message.properties, delivery_mode=2)
        out = channel.prepare_message(body, fire["options"].get("priority"), content_type, content_encoding,
                                      headers, properties)
        channel._inplace_augment_message(out, "", spec["queue"])
        return out
