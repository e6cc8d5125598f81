"""Periodic tasks and triggers kept in Postgres, fired once each with two beats running.

This file is a Celery app and a script. As a script it starts a worker and two beats
of itself, changes the schedule while they run, and lets a trigger ship paid orders:

    BROKER_URL=pgbroker://user:pass@host/db python beat_schedules.py

What you would run yourself:

    celery -A beat_schedules worker -Q celery,shipping
    celery -A beat_schedules beat -S pgbroker        # on as many hosts as you like
    pgbroker --url postgresql://user:pass@host/db beat ls
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from celery import Celery
from celery.schedules import crontab

from pgbroker.beat import BeatEntries, Trigger, TriggerTask, cron

URL = os.environ.get("BROKER_URL", "pgbroker://localhost/shop")
SCHEMA = os.environ.get("PGBROKER_SCHEMA", "pgbroker")
DB_URL = "postgresql://" + URL.split("://", 1)[1]

app = Celery("beat_schedules", broker=URL)
app.conf.update(
    broker_transport_options={"schema": SCHEMA},
    task_ignore_result=True,
    beat_max_loop_interval=1.0,  # look at the schedule at least every second
    # Synced into Postgres when a beat starts; edits made at run time are kept.
    beat_schedule={
        "tick": {"task": "beat_schedules.tick", "schedule": 2.0, "args": ["every 2 s"]},
        "weekday-report": {"task": "beat_schedules.tick", "schedule": crontab(minute=0, hour=7, day_of_week="mon-fri"),
                           "args": ["weekday report"], "missed": "skip"},
    },
)

# An application table, and a trigger over it: each paid order gets one `ship` job.
ORDERS = f'"{SCHEMA}".example_orders'
ship_paid = Trigger(
    name="ship-paid-orders", task="beat_schedules.ship", schedule=1.0,
    query=f"SELECT id FROM {ORDERS} WHERE state = 'paid'", key="id",
    queue="shipping", max_attempts=3, on_error="beat_schedules.shipping_failed",
)


def _db():
    return psycopg.connect(DB_URL, autocommit=True)


@app.task
def tick(label):
    with _db() as conn:
        conn.execute(f'INSERT INTO "{SCHEMA}".example_ticks (label) VALUES (%s)', (label,))


@app.task(base=TriggerTask, trigger=ship_paid)
def ship(order_id):
    """Runs only while the order is still paid (TriggerTask checks first)."""
    with _db() as conn:
        conn.execute(f"UPDATE {ORDERS} SET state = 'shipped' WHERE id = %s", (order_id,))


@app.task
def shipping_failed(order_id, trigger, error):
    print(f"order {order_id}: {trigger} gave up: {error}")


def setup() -> None:
    with _db() as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"')
        conn.execute(f"CREATE TABLE IF NOT EXISTS {ORDERS} (id int PRIMARY KEY, state text NOT NULL)")
        conn.execute(f'CREATE TABLE IF NOT EXISTS "{SCHEMA}".example_ticks (label text, at timestamptz DEFAULT now())')


def count(sql: str) -> int:
    with _db() as conn:
        return conn.execute(sql).fetchone()[0]


def wait(what: str, check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def main() -> int:
    setup()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    here = Path(__file__).parent
    procs = [subprocess.Popen([sys.executable, "-m", "celery", "-A", "beat_schedules", *args, "-l", "warning"],
                              cwd=here, env=env, start_new_session=True)
             for args in (["worker", "-P", "threads", "-Q", "celery,shipping", "-n", "beat-example@%h"],
                          ["beat", "-S", "pgbroker", "--pidfile", ""], ["beat", "-S", "pgbroker", "--pidfile", ""])]
    try:
        entries = BeatEntries.of(app)
        wait("the beats to sync beat_schedule", lambda: entries.get("tick") is not None)
        # At run time: a new entry, in a time zone, and one fire right now.
        entries.add("nightly-cleanup", "beat_schedules.tick", cron("30 2 * * *", tz="Europe/Paris"),
                    args=["nightly cleanup"])
        entries.run_now("nightly-cleanup")
        with _db() as conn:
            conn.execute(f"INSERT INTO {ORDERS} SELECT g, 'paid' FROM generate_series(1, 20) g "
                         f"ON CONFLICT (id) DO UPDATE SET state = 'paid'")
        wait("the run-now fire", lambda: count(f"SELECT count(*) FROM \"{SCHEMA}\".example_ticks "
                                               f"WHERE label = 'nightly cleanup'") == 1)
        wait("every paid order shipped", lambda: count(f"SELECT count(*) FROM {ORDERS} WHERE state = 'shipped'") == 20)
        wait("two runs of tick", lambda: count(f"SELECT count(*) FROM \"{SCHEMA}\".example_ticks "
                                                f"WHERE label = 'every 2 s'") >= 2)
        ticks = count(f"SELECT count(*) FROM \"{SCHEMA}\".example_ticks WHERE label = 'every 2 s'")
        fires = count(f"SELECT count(*) FROM \"{SCHEMA}\".beat_fires WHERE entry = 'tick'")
        print(f"tick: {fires} fires by two beats, {ticks} runs")
        print("20 paid orders shipped by trigger ship-paid-orders, one job each")
        entries.disable("tick")
        print("disabled tick; entries now:")
        for e in entries.list():
            print(f"  {e.name:18} {e.schedule.describe():34} enabled={e.enabled} fires={e.fires}")
        return 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
