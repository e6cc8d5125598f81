"""pgbroker's beat scheduler in this process, against a real database: what fires, when,
and how many times (the processes-and-SIGKILL version is tests/acceptance/test_beat.py)."""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from celery import Celery

from pgbroker.beat import BeatEntries, Scheduler, at, cron, every
from pgbroker.errors import InvalidSchedule
from pgbroker.message import channel_name

TASK = "tests.beat.noop"


def noop(*args):
    return args


@pytest.fixture
def app(broker_url, transport_options, db):
    app = Celery("beat-tests", broker=broker_url, set_as_current=False)
    app.conf.update(broker_transport_options=transport_options, beat_schedule={}, result_expires=None)

    app.task(name=TASK)(noop)
    yield app
    app.close()


@pytest.fixture
def scheduler(app):
    made = []

    def make(**conf):
        app.conf.update(conf)
        s = Scheduler(app)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def fires(sql, entry):
    return [r["fire_at"] for r in sql("SELECT fire_at FROM {schema}.beat_fires WHERE entry = %s ORDER BY fire_at", entry)]


def jobs_of(sql, entry):
    return sql("SELECT task, queue, state, meta FROM {schema}.jobs WHERE meta->>'beat_entry' = %s "
               "ORDER BY meta->>'fire_at'", entry)


def backdate(sql, entry, seconds):
    """As if the beats had been down: the entry's schedule and next fire moved back."""
    sql("UPDATE {schema}.beat_entries SET anchor_at = anchor_at - %s * interval '1 second', "
        "next_fire_at = next_fire_at - %s * interval '1 second' WHERE name = %s", seconds, seconds, entry)


def test_beat_schedule_is_synced_and_a_due_entry_becomes_one_job(scheduler, sql):
    s = scheduler(beat_schedule={"nightly": {"task": TASK, "schedule": 60.0, "args": [1],
                                             "options": {"queue": "reports"}}})
    entry = s.store.get("nightly")
    assert entry.source == "config" and entry.schedule.describe() == "every 0:01:00"
    backdate(sql, "nightly", 60)
    assert s.run_pending() == 1
    assert s.run_pending() == 0  # nothing is due any more
    [job] = jobs_of(sql, "nightly")
    assert (job["task"], job["queue"], job["state"]) == (TASK, "reports", "available")
    assert job["meta"]["fire_at"] == fires(sql, "nightly")[0].isoformat()
    assert s.store.get("nightly").fires == 1


def test_sync_keeps_runtime_state_and_removes_entries_gone_from_the_config(scheduler, sql):
    s = scheduler(beat_schedule={"a": {"task": TASK, "schedule": 30.0}, "b": {"task": TASK, "schedule": 30.0}})
    s.store.disable("a")
    s.store.add("made-at-runtime", TASK, every(10))
    next_b = s.store.get("b").next_fire_at
    again = scheduler(beat_schedule={"a": {"task": TASK, "schedule": 30.0}})  # a restart with b removed
    names = {e.name: e for e in again.store.list()}
    assert set(names) == {"a", "made-at-runtime"}
    assert names["a"].enabled is False  # a disabled config entry stays disabled
    scheduler(beat_schedule={"a": {"task": TASK, "schedule": 30.0}, "b": {"task": TASK, "schedule": 30.0}})
    assert s.store.get("b").next_fire_at >= next_b


@pytest.mark.parametrize("policy, expected", [("skip", 0), ("latest", 1), ("all", 5)])
def test_missed_fires_follow_the_entry_policy(scheduler, sql, policy, expected):
    s = scheduler()
    s.store.add("gap", TASK, every(60), missed=policy, max_missed=5)
    backdate(sql, "gap", 10 * 60 + 30)  # ten fires missed, the last 30 s ago (beyond a 20 s grace)
    s.grace = 20
    assert s.run_pending() == expected
    assert len(jobs_of(sql, "gap")) == expected
    entry = s.store.get("gap")
    assert entry.next_fire_at > datetime.now(timezone.utc)
    if policy == "latest":
        assert fires(sql, "gap") == [entry.next_fire_at - timedelta(seconds=60)]


def test_a_late_fire_within_the_grace_is_on_time_whatever_the_policy(scheduler, sql):
    s = scheduler()
    s.store.add("late", TASK, every(60), missed="skip")
    backdate(sql, "late", 62)
    assert s.run_pending() == 1


@pytest.mark.parametrize("policy, expected", [("skip", 1), ("latest", 1), ("all", 3)])
def test_a_gap_shorter_than_the_grace_fires_once_unless_the_entry_catches_up(scheduler, sql, policy, expected):
    s = scheduler()
    s.store.add("short-gap", TASK, every(10), missed=policy)
    backdate(sql, "short-gap", 35)  # three fires due, the latest 5 s ago: all within the grace
    assert s.run_pending() == expected
    entry = s.store.get("short-gap")
    assert fires(sql, "short-gap")[-1] == entry.next_fire_at - timedelta(seconds=10)  # the latest is one of them


def test_reenabling_does_not_fire_at_once_unless_the_entry_catches_up(scheduler, sql):
    s = scheduler()
    s.store.add("plain", TASK, every(60))
    s.store.add("catching-up", TASK, every(60), catch_up_on_enable=True)
    for name in ("plain", "catching-up"):
        s.store.disable(name)
        backdate(sql, name, 600)
    assert s.run_pending() == 0  # disabled entries do not fire
    for name in ("plain", "catching-up"):
        s.store.enable(name)
    assert s.run_pending() == 1
    assert len(jobs_of(sql, "plain")) == 0 and len(jobs_of(sql, "catching-up")) == 1


def test_run_now_fires_once_even_when_disabled(scheduler, sql):
    s = scheduler()
    s.store.add("manual", TASK, cron("0 0 1 1 *"), enabled=False)
    requested = s.store.run_now("manual")
    assert s.run_pending() == 1 and s.run_pending() == 0
    assert fires(sql, "manual") == [requested]
    [job] = jobs_of(sql, "manual")
    assert job["meta"]["manual"] is True
    assert s.store.get("manual").enabled is False


def test_a_one_off_entry_fires_once_and_is_then_done(scheduler, sql):
    s = scheduler()
    s.store.add("once", TASK, at(datetime.now(timezone.utc) - timedelta(seconds=1)))
    assert s.run_pending() == 1
    assert s.store.get("once").next_fire_at is None
    assert s.run_pending() == 0


def test_two_schedulers_ticking_together_fire_each_due_fire_once(scheduler, sql):
    first, second = scheduler(), scheduler()
    for i in range(20):
        first.store.add(f"e{i}", TASK, every(60), missed="all")
        backdate(sql, f"e{i}", 60 * 3)
    barrier = threading.Barrier(2)
    counts = []

    def run(s):
        barrier.wait()
        counts.append(s.run_pending())

    threads = [threading.Thread(target=run, args=(s,)) for s in (first, second)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert sum(counts) == 60
    assert sql("SELECT count(*) AS n FROM {schema}.jobs")[0]["n"] == 60
    assert sql("SELECT count(DISTINCT (meta->>'beat_entry', meta->>'fire_at')) AS n FROM {schema}.jobs")[0]["n"] == 60


def test_a_crash_between_recording_a_fire_and_publishing_it_leaves_neither(scheduler, sql, monkeypatch):
    s = scheduler()
    s.store.add("fragile", TASK, every(60))
    backdate(sql, "fragile", 60)

    def crash(*args, **kwargs):
        raise RuntimeError("the process dies here")

    monkeypatch.setattr(s, "_send", crash)
    assert s.run_pending() == 0
    assert fires(sql, "fragile") == [] and jobs_of(sql, "fragile") == []
    assert "the process dies here" in s.store.get("fragile").last_error
    monkeypatch.undo()
    assert s.run_pending() == 0  # this beat leaves it be for max_interval …
    assert scheduler().run_pending() == 1  # … another one fires the same fire
    assert len(jobs_of(sql, "fragile")) == 1 and s.store.get("fragile").last_error is None


def test_an_entry_that_cannot_publish_records_why_and_keeps_its_fire(scheduler, sql):
    s = scheduler()
    s.store.add("hostile", TASK, every(60), options={"queue": "q" * 2000})
    s.store.add("fine", TASK, every(60))
    backdate(sql, "hostile", 60)
    backdate(sql, "fine", 60)
    assert s.run_pending() == 1  # the other entry still fires
    hostile = s.store.get("hostile")
    assert "InvalidName" in hostile.last_error and hostile.next_fire_at < datetime.now(timezone.utc)
    assert fires(sql, "hostile") == []


def test_a_beat_started_while_the_database_is_down_waits_for_it(app, broker_url, database_url, caplog):
    from tests.helpers import TcpProxy

    proxy = TcpProxy.in_front_of(database_url)
    proxy.cut()
    down = Celery("beat-down", broker=proxy.route(broker_url), set_as_current=False)
    # pool_timeout above the pool's reconnect interval (at most 1 s): the tick after the
    # restore may wait for the next attempt (the one while cut fails at once).
    down.conf.update(broker_transport_options={**app.conf.broker_transport_options, "pool_timeout": 3.0},
                     beat_schedule={"minutely": {"task": TASK, "schedule": 60.0}}, result_expires=None)
    s = None
    try:
        s = Scheduler(down)  # celery beat builds its scheduler here: this must not raise
        assert s.tick() == s.max_interval  # Celery's beat loop sleeps this long, then ticks again
        assert "cannot reach" in caplog.text
        proxy.restore()
        assert s.tick() == 0
        assert s.store.get("minutely").schedule.describe() == "every 0:01:00"
    finally:
        if s is not None:
            s.close()
        down.close()
        proxy.close()


def test_an_entry_that_cannot_fire_is_tried_again_after_max_interval_not_at_once(scheduler, sql, caplog):
    s = scheduler(beat_max_loop_interval=1.0)
    s.store.add("hostile", TASK, every(60), options={"queue": "q" * 2000})
    backdate(sql, "hostile", 60)
    attempts = lambda: [r for r in caplog.records if "could not fire" in r.getMessage()]  # noqa: E731
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="pgbroker.beat"):
        for _ in range(10):
            s.tick()
            if len(attempts()) == 3:
                break
    assert len(attempts()) == 3 and time.monotonic() - started >= 2.0  # two waits of max_interval: no busy loop
    assert attempts()[0].exc_info and not attempts()[1].exc_info  # one traceback


def test_a_beat_with_nothing_to_fire_waits_max_interval(scheduler, sql):
    s = scheduler(beat_max_loop_interval=0.5)
    s.store.add("off", TASK, every(1), enabled=False)
    s.tick()  # takes the notification of the add
    started = time.monotonic()
    s.tick()
    s.tick()
    assert time.monotonic() - started >= 0.5  # no busy loop while nothing is enabled


def test_changes_wake_the_beat(scheduler):
    s = scheduler()
    s._listener.wait(0)  # nothing pending
    s.store.add("new", TASK, every(5))
    got = s._listener.wait(5)
    assert [n.channel for n in got] == [channel_name(s.db.options.schema, "pgbroker.beat")]


@pytest.mark.parametrize("bad, message", [
    (lambda st: st.add("x", TASK, cron("61 * * * *")), "invalid cron expression"),
    (lambda st: st.add("x", TASK, cron("* * * * *", tz="Mars/Olympus")), "unknown time zone"),
    (lambda st: st.add("x", TASK, every(0)), "positive number of seconds"),
    (lambda st: st.add("x", TASK, every(5), missed="sometimes"), "missed must be one of"),
    (lambda st: st.add("x", TASK, every(5), args=[object()]), "JSON-serialisable"),
    (lambda st: st.add("x", TASK, every(5), kwargs={"a": "nul\x00"}), "NUL"),
    (lambda st: st.add("", TASK, every(5)), "entry name"),
    (lambda st: st.add("x", TASK, every(1e12)), "at most"),
    (lambda st: st.add("x", TASK, cron("0 0 30 2 *")), "never fires"),
    (lambda st: st.add("x", TASK, every(5), args={"a": 1}), "args must be a list"),
    (lambda st: st.add("x", TASK, every(5), args="abc"), "args must be a list"),
    (lambda st: st.add("x", TASK, every(5), kwargs=[["a", 1]]), "kwargs must be a mapping"),
    (lambda st: st.add("x", TASK, every(5), max_missed="5"), "max_missed must be an integer"),
])
def test_bad_entries_are_refused_when_added(app, bad, message):
    store = BeatEntries.of(app)
    with pytest.raises(InvalidSchedule, match=message):
        bad(store)
    assert store.get("x") is None


def test_unknown_entries_raise_key_error(app):
    store = BeatEntries.of(app)
    for call in (store.enable, store.disable, store.remove, store.run_now):
        with pytest.raises(KeyError):
            call("nope")


def test_a_trigger_from_a_sqlalchemy_select_enqueues_matching_rows_once(scheduler, sql, app):
    import sqlalchemy as sa

    from pgbroker.beat import Trigger

    sql("CREATE TABLE {schema}.orders (id int PRIMARY KEY, state text NOT NULL)")
    sql("INSERT INTO {schema}.orders SELECT g, CASE WHEN g % 3 = 0 THEN 'new' ELSE 'paid' END "
        "FROM generate_series(1, 30) g")
    orders = sa.table("orders", sa.column("id"), sa.column("state"), schema=app.conf.broker_transport_options["schema"])
    trigger = Trigger("ship", task=TASK, schedule=every(60), query=sa.select(orders.c.id).where(orders.c.state == "paid"),
                      page_size=7, queue="shipping")
    s = scheduler()
    s.store.add_trigger(trigger)
    assert s.run_pending() == 0  # not due yet
    s.store.run_now("ship")
    s.run_pending()
    jobs = sql("SELECT queue, meta->>'row' AS row FROM {schema}.jobs ORDER BY (meta->>'row')::int")
    assert [int(j["row"]) for j in jobs] == [i for i in range(1, 31) if i % 3] and {j["queue"] for j in jobs} == {"shipping"}
    [fire] = sql("SELECT done, enqueued FROM {schema}.beat_fires WHERE entry = 'ship'")
    assert fire == {"done": True, "enqueued": 20}
    s.store.run_now("ship")  # again while the jobs are incomplete: nothing new
    s.run_pending()
    assert sql("SELECT count(*) AS n FROM {schema}.jobs")[0]["n"] == 20
    assert trigger.matches(app, 1) and not trigger.matches(app, 3)


def test_a_trigger_whose_query_does_not_run_is_refused(app):
    from pgbroker.beat import Trigger

    broken = Trigger("broken", task=TASK, schedule=every(60), query="SELECT id FROM no_such_table")
    with pytest.raises(InvalidSchedule, match="its query does not run.*no_such_table"):
        BeatEntries.of(app).add_trigger(broken)
    with pytest.raises(InvalidSchedule, match="plain column name"):
        Trigger("bad-key", task=TASK, schedule=every(60), query="SELECT 1", key="id; DROP TABLE x")
