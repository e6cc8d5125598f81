"""The job API and CLI (pgbroker.jobs, `pgbroker jobs|queues|status`), queue controls in
the claim, per-call options, telemetry of the engine and maintenance, and the
testing helpers, against a real database."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
from celery import Celery
from click.testing import CliRunner

import pgbroker
import pgbroker.jobs as jobs
from pgbroker import telemetry
from pgbroker.cli import main
from pgbroker.engine import Outcome
from pgbroker.errors import InvalidJobOption, InvalidState, SchemaNotReady
from pgbroker.maintenance import Maintainer
from pgbroker.message import channel_name


def work(*args, **kwargs):
    return args


@pytest.fixture
def app(broker_url, transport_options, db):
    app = Celery("jobs-api-tests", broker=broker_url, set_as_current=False, task_cls="pgbroker:Task")
    app.conf.update(broker_transport_options=transport_options)
    app.task(name="t.work", max_retries=2)(work)
    app.task(name="t.other")(work)
    yield app
    app.close()


@pytest.fixture
def events():
    seen = []
    leave = telemetry.subscribe(lambda name, m, md: seen.append((name, dict(m), dict(md))))
    yield seen
    leave()


def test_per_call_options_land_on_the_job(app):
    task = app.tasks["t.work"]
    r = task.apply_async((1,), queue="emails", priority=7, countdown=60, max_attempts=9, meta={"tenant": 3},
                         retry_backoff=2, retry_jitter=False)
    job = jobs.get(app, r.id)
    assert (job.queue, job.priority, job.state.value, job.max_attempts, job.meta) == (
        "emails", 7, "scheduled", 9, {"tenant": 3})
    assert 55 < (job.scheduled_at - job.inserted_at).total_seconds() <= 60
    assert jobs.get(app, task.delay(2).id).max_attempts == 3  # the task's max_retries + 1
    assert [j.task_id for j in jobs.get_many(app, [r.id, "no-such-task"])] == [r.id]
    with pytest.raises(InvalidJobOption, match="max_attempts"):
        task.apply_async((3,), max_attempts=-1)
    assert jobs.count(app) == 2  # the refused publish stored nothing


def test_meta_as_a_task_option_applies_to_every_publish(app):
    fixed = app.task(name="t.fixed", meta={"team": "ops"})(work)
    derived = app.task(name="t.derived", meta=lambda args, kwargs: {"order": args[0], "rush": kwargs.get("rush")})(work)
    assert jobs.get(app, fixed.delay(1).id).meta == {"team": "ops"}
    assert jobs.get(app, fixed.apply_async((1,), meta={"team": "web", "x": 1}).id).meta == {"team": "web", "x": 1}
    assert jobs.get(app, app.send_task("t.derived", (42,), {"rush": True}).id).meta == {"order": 42, "rush": True}
    broken = app.task(name="t.broken", meta=lambda args, kwargs: args[5])(work)
    with pytest.raises(InvalidJobOption, match="meta function of task 't.broken' failed"):
        broken.delay(1)
    assert derived.name == "t.derived"


def test_list_filters_and_pages(app):
    ids = [app.tasks["t.work"].apply_async((i,), meta={"tenant": i % 2}).id for i in range(6)]
    app.tasks["t.other"].apply_async((9,), queue="other")
    assert [j.task_id for j in jobs.list(app, meta={"tenant": 1})] == [ids[5], ids[3], ids[1]]
    assert [j.task for j in jobs.list(app, queue="other")] == ["t.other"]
    page = jobs.list(app, task="t.work", limit=4)
    rest = jobs.list(app, task="t.work", limit=4, before=page[-1].id)
    assert [j.task_id for j in page + rest] == ids[::-1]
    assert jobs.count(app, state=["available"], task="t.work") == 6
    with pytest.raises(InvalidState):
        jobs.list(app, state="done")
    assert jobs.get(app, "no-such-task") is None


def test_cancel_by_filter_in_batches_leaves_the_rest(app, engine, events):
    for i in range(25):
        app.tasks["t.work"].apply_async((i,), meta={"order": 42 if i < 20 else 7})
    app.tasks["t.work"].apply_async((99,), meta={"order": 42}, countdown=3600)  # scheduled: cancelled too
    running = engine.claim(["celery"], 1, "test#1")  # the oldest job is executing
    assert running[0][0]["headers"]["id"]
    batches = []
    done = jobs.cancel(app, meta={"order": 42}, revoke=False, progress=batches.append)
    assert (done.cancelled, done.revoked) == (20, 0)  # 19 waiting + the scheduled one; one is executing
    assert jobs.count(app, state="cancelled") == 20 and jobs.count(app, state="available") == 5
    assert sum(batches) == 20
    assert jobs.list(app, state="cancelled")[0].cancelled_by.startswith("pgbroker.jobs.cancel on ")
    assert ("job.cancelled", {"cancelled": 20, "revoked": 0},
            {"queue": None, "task": None, "by": jobs.list(app, state="cancelled")[0].cancelled_by}) in events
    with pytest.raises(InvalidJobOption, match="needs task ids or a filter"):
        jobs.cancel(app)


def test_retry_runs_a_discarded_job_once_more(app, engine, sql):
    r = app.tasks["t.work"].delay(1)
    other = app.tasks["t.work"].delay(2)
    sql("UPDATE {schema}.jobs SET state = 'discarded', attempt = 3, discarded_at = now(), "
        "errors = '[{\"attempt\": 3, \"error\": \"boom\"}]' WHERE task_id = %s", r.id)
    assert jobs.retry(app, [r.id, other.id]) == [r.id]  # the available one is left alone
    job = jobs.get(app, r.id)
    assert (job.state.value, job.max_attempts, job.meta, job.errors[0]["error"]) == ("available", 4, {"retried": 1},
                                                                                       "boom")
    assert [m["headers"]["id"] for m, _ in engine.claim(["celery"], 10, "t#1")] == [r.id, other.id]


def test_queue_stats_show_counts_age_and_controls(app, sql):
    for i in range(3):
        app.tasks["t.work"].apply_async((i,), queue="stats")
    sql("UPDATE {schema}.jobs SET scheduled_at = now() - interval '90 seconds' WHERE queue = 'stats'")
    assert not jobs.limit(app, "stats", concurrency=2, rate="10/m")["created"]  # declared by its publisher
    assert jobs.pause(app, "idle")["created"]  # set ahead of any producer or worker (or a typo)
    stats = {q["queue"]: q for q in jobs.queues(app)}
    assert stats["stats"]["available"] == 3 and 89 < stats["stats"]["oldest_available"] < 120
    assert (stats["stats"]["concurrency"], stats["stats"]["rate_limit"], stats["stats"]["rate_period"]) == (2, 10, 60)
    assert stats["idle"]["paused"] and stats["idle"]["available"] == 0 and stats["idle"]["oldest_available"] is None
    assert jobs.limit(app, "stats", concurrency=None)["concurrency"] is None
    assert jobs.queues(app, "stats")[0]["rate_limit"] == 10  # a limit left out is kept
    with pytest.raises(InvalidJobOption):
        jobs.limit(app, "stats", rate="0/s")
    with pytest.raises(InvalidJobOption):
        jobs.limit(app, "stats", concurrency=0)


def test_a_paused_queue_is_not_claimed_until_resumed(app, engine):
    for i in range(3):
        app.tasks["t.work"].apply_async((i,), queue="p")
    jobs.pause(app, "p")  # another process's view of the controls may be stale: the plain claim still skips it
    engine._controls = (float("inf"), frozenset())
    assert engine.claim(["p"], 10, "c#1") == []
    engine._controls = None
    assert engine.claim(["p"], 10, "c#1") == []
    jobs.resume(app, "p")
    assert len(engine.claim(["p"], 10, "c#1")) == 3


def test_concurrency_limit_holds_across_concurrent_claimers(app, engine, sql):
    for i in range(40):
        app.tasks["t.work"].apply_async((i,), queue="limited")
    jobs.limit(app, "limited", concurrency=3)
    claimed, errors = [], []

    def claimer(n):
        try:
            for _ in range(5):
                claimed.extend(engine.claim(["limited"], 10, f"claimer#{n}"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(claimed) == 3
    sql("UPDATE {schema}.jobs SET state = 'completed' WHERE state = 'executing'")  # they finish
    assert len(engine.claim(["limited"], 10, "claimer#9")) == 3


def test_a_slot_freed_in_a_limited_queue_wakes_its_consumers(app, engine, db, schema, sql):
    """Workers waiting on a concurrency-limited queue hear of a freed slot at once,
    not at their next poll."""
    for i in range(2):
        app.tasks["t.work"].apply_async((i,), queue="slot")
    jobs.limit(app, "slot", concurrency=1)
    [(message, _)] = engine.claim(["slot"], 10, "a#1")
    job = message["properties"]["delivery_info"]["pgbroker_job"]
    assert engine.claim(["slot"], 10, "b#1") == []  # the one slot is taken
    channel = channel_name(schema, "slot")
    listener = db.listener()

    def payloads_until(last):
        """Notification payloads on the queue's channel up to ``last`` (in commit order)."""
        seen, deadline = [], time.monotonic() + 10
        while last not in seen and time.monotonic() < deadline:
            seen += [n.payload for n in listener.wait(deadline - time.monotonic()) if n.channel == channel]
        return seen

    try:
        listener.listen([channel])
        listener.fds()  # LISTEN now
        engine.settle([Outcome(*job, "acked")])  # still running: no slot freed
        sql("SELECT pg_notify(%s, 'marker')", channel)
        assert payloads_until("marker") == ["marker"]
        engine.settle([Outcome(*job, "completed")])
        assert payloads_until("") == [""]
    finally:
        listener.close()
    assert len(engine.claim(["slot"], 10, "b#1")) == 1


def test_rate_limit_counts_claims_per_window(app, engine, sql):
    for i in range(10):
        app.tasks["t.work"].apply_async((i,), queue="rated")
    jobs.limit(app, "rated", rate=(4, 3600))  # 4 per hour: the rest waits for the next window
    assert len(engine.claim(["rated"], 10, "r#1")) == 4
    sql("UPDATE {schema}.jobs SET state = 'completed' WHERE state = 'executing'")
    assert engine.claim(["rated"], 10, "r#2") == []
    sql("UPDATE {schema}.queues SET rate_window = rate_window - 1 WHERE name = 'rated'")  # as if the hour passed
    assert len(engine.claim(["rated"], 10, "r#2")) == 4


def test_engine_and_maintenance_emit_their_events(app, engine, sql, events):
    r = app.tasks["t.work"].apply_async((1,), queue="tele")
    engine.claim(["tele"], 1, "tele#1")
    sql("UPDATE {schema}.jobs SET state = 'completed', completed_at = now() - interval '1 day'")
    maintainer = Maintainer(engine)
    maintainer.prune()
    maintainer.rescue()
    names = [e[0] for e in events]
    assert names == ["job.enqueued", "job.claimed", "jobs.pruned", "jobs.rescued"]
    assert events[0][2] == {"queue": "tele", "task": "t.work", "task_id": r.id, "unique_duplicate": False}
    claimed = events[1]
    assert claimed[2]["task_id"] == r.id and claimed[2]["attempt"] == 1 and claimed[2]["consumer"] == "tele#1"
    assert 0 <= claimed[1]["queue_time"] < 60
    assert events[2][1]["completed"] == 1 and events[2][1]["duration"] >= 0
    for name, measurements, metadata in events:
        event = telemetry.EVENTS[name]
        assert (tuple(measurements), tuple(metadata)) == (event.measurements, event.metadata)


def test_the_opentelemetry_bridge_records_metrics(app, engine):
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import pgbroker.otel

    reader = InMemoryMetricReader()
    stop = pgbroker.otel.install(MeterProvider(metric_readers=[reader]))
    try:
        for i in range(3):
            app.tasks["t.work"].apply_async((i,), queue="otel")
        engine.claim(["otel"], 10, "o#1")
    finally:
        stop()
    metrics = {m.name: m for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
               for m in sm.metrics}
    enqueued = metrics["pgbroker.job.enqueued"].data.data_points[0]
    assert enqueued.value == 3 and dict(enqueued.attributes) == {"queue": "otel", "task": "t.work"}
    assert metrics["pgbroker.job.claimed.queue_time"].data.data_points[0].count == 3


def test_cli_jobs_queues_and_status(app, database_url, schema):
    run = CliRunner().invoke
    r = app.tasks["t.work"].apply_async((1,), meta={"tenant": 5})
    app.tasks["t.other"].apply_async((2,), queue="other")
    base = ["--url", database_url]
    out = run(main, base + ["jobs", "ls", "--schema", schema, "--meta", "tenant=5", "--json"])
    assert out.exit_code == 0, out.output
    assert [j["task_id"] for j in json.loads(out.output)] == [r.id]
    shown = json.loads(run(main, base + ["jobs", "show", r.id, "--schema", schema, "--json"]).output)
    assert shown["state"] == "available" and shown["max_attempts"] == 3
    table = run(main, base + ["jobs", "show", r.id, "--schema", schema])
    assert table.exit_code == 0 and "attempt history" in table.output
    out = run(main, base + ["queues", "limit", "other", "--concurrency", "2", "--rate", "5/s", "--schema", schema])
    assert out.output.strip() == "other: running; concurrency 2, rate 5/1s"
    assert run(main, base + ["queues", "pause", "other", "--schema", schema]).output.startswith("other: paused")
    stats = {q["queue"]: q for q in json.loads(run(main, base + ["queues", "--schema", schema, "--json"]).output)}
    assert stats["other"]["paused"] and stats["celery"]["available"] == 1
    assert "other" in run(main, base + ["queues", "--schema", schema]).output
    out = run(main, base + ["jobs", "cancel", "--queue", "other", "--schema", schema])
    assert out.exit_code == 0 and "cancelled 1 waiting job(s); revoked 0" in out.output, out.output
    assert json.loads(run(main, base + ["jobs", "retry", r.id, "--schema", schema, "--json"]).output) == {
        "retried": [], "left": {r.id: "available"}, "unknown": []}
    typo = run(main, base + ["jobs", "retry", r.id, "no-such-id", "--schema", schema])
    assert typo.exit_code == 1, typo.output
    assert f"left {r.id} (available)" in typo.output and "no job for task id no-such-id" in typo.output
    status = json.loads(run(main, base + ["status", "--schema", schema, "--json"]).output)
    assert status["jobs"]["cancelled"] == 1 and status["paused"] == ["other"] and status["version"] == status["latest"]
    bad = run(main, base + ["jobs", "ls", "--state", "finished", "--schema", schema])
    assert bad.exit_code != 0 and "InvalidState" in bad.output
    bad = run(main, base + ["queues", "limit", "other", "--rate", "0/s", "--schema", schema])
    assert bad.exit_code != 0 and "InvalidJobOption" in bad.output
    assert run(main, base + ["jobs", "show", "nope", "--schema", schema]).exit_code != 0
    typo = run(main, base + ["queues", "pause", "othre", "--schema", schema])
    assert typo.exit_code == 0 and "no producer or worker has declared queue 'othre'" in typo.output


def test_cli_reports_bad_input_unknown_schemas_and_a_dead_database_without_tracebacks(database_url, schema):
    import psycopg

    run = CliRunner().invoke
    base = ["--url", database_url]
    typo = run(main, base + ["status", "--schema", "no_such_schema"])
    assert typo.exit_code == 1 and "has no pgbroker tables" in typo.output, typo.output
    with pytest.raises(SchemaNotReady):  # the job API given a URL does not create one either
        jobs.queues(database_url, schema="no_such_schema")
    with psycopg.connect(database_url) as conn:  # only `migrate` creates a schema
        assert conn.execute("SELECT to_regnamespace('no_such_schema')").fetchone()[0] is None
    reserved = run(main, base + ["jobs", "ls", "--schema", "pg_jobs"])
    assert reserved.exit_code == 2 and "reserves names starting with pg_" in reserved.output
    for option, value in (("--limit", "-5"), ("--limit", "9" * 20), ("--before", "9" * 20)):
        out_of_range = run(main, base + ["jobs", "ls", option, value, "--schema", schema])
        assert out_of_range.exit_code == 2 and option in out_of_range.output
    for command in (["beat", "ls"], ["beat", "rm", "nightly"]):
        dead = run(main, ["--url", "pgbroker://nobody@127.0.0.1:1/none", *command, "--schema", schema])
        assert dead.exit_code == 1 and "DatabaseUnavailable" in dead.output, (command, dead.output)
        assert isinstance(dead.exception, SystemExit)  # a message, not a traceback


def test_celery_pgbroker_commands_use_the_apps_schema(app, schema):
    from types import SimpleNamespace

    from pgbroker.cli import celery_command

    app.tasks["t.work"].delay(1)
    out = CliRunner().invoke(celery_command, ["status", "--json"], obj=SimpleNamespace(app=app))  # celery -A app …
    assert out.exit_code == 0, out.output
    status = json.loads(out.output)
    assert status["schema"] == schema and status["jobs"]["available"] == 1
    options = dict(app.conf.broker_transport_options)
    app.conf.broker_transport_options = {**{k: v for k, v in options.items() if k != "schema"}, "prefix": schema}
    out = CliRunner().invoke(celery_command, ["status", "--json"], obj=SimpleNamespace(app=app))  # the alias
    assert out.exit_code == 0 and json.loads(out.output)["schema"] == schema, out.output


def test_celery_pgbroker_beat_commands_use_the_apps_beat_url(broker_url, transport_options, db):
    from types import SimpleNamespace

    from pgbroker.beat import BeatEntries
    from pgbroker.cli import celery_command

    app = Celery("beat-url", broker="pgbroker://nobody@127.0.0.1:1/none", set_as_current=False)  # never reached
    app.conf.update(broker_transport_options=transport_options, pgbroker_beat_url=broker_url)
    out = CliRunner().invoke(celery_command, ["beat", "add", "via-cli", "t.work", "--every", "30"],
                             obj=SimpleNamespace(app=app))
    assert out.exit_code == 0, out.output
    assert [e.name for e in BeatEntries(db).list()] == ["via-cli"]


def test_a_sandbox_left_with_an_uncommitted_publish_says_why_it_cannot_clean_up(database_url):
    """A Django TestCase's transaction is never committed: the sandbox cannot drop its
    schema while it is open, and says so instead of waiting for ever."""
    import psycopg

    from pgbroker.errors import TransactionError
    from pgbroker.testing import sandbox

    app = Celery("sandboxed", set_as_current=False)
    app.task(name="s.work")(work)
    with psycopg.connect(database_url) as conn:  # a caller's transaction, left open
        with pytest.raises(TransactionError, match="use a TransactionTestCase"):
            with sandbox(database_url) as box:
                box.configure(app)
                with pgbroker.atomic(conn):
                    app.tasks["s.work"].delay(1)
                box.refute_enqueued(task="s.work")  # not committed: nobody else sees it
        conn.rollback()


def test_testing_helpers_record_assert_and_drain(database_url):
    from pgbroker.testing import sandbox

    app = Celery("sandboxed", set_as_current=False, task_cls="pgbroker:Task")

    @app.task(name="s.add")
    def add(x, y):
        if x == 0:
            add.delay(5, 5)  # a job enqueued by a drained job is drained too
        return x + y

    @app.task(name="s.snooze")
    def snooze():
        raise pgbroker.Snooze(60)

    @app.task(name="s.fail", bind=True, max_retries=1)
    def fail(self):
        raise self.retry(exc=ValueError("nope"), countdown=1)

    with sandbox(database_url) as box:
        box.configure(app)
        add.delay(1, 2)
        add.apply_async((0, 1), meta={"k": 1})
        snooze.delay()
        fail.delay()
        box.assert_enqueued(task="s.add", args=[1, 2])
        box.assert_enqueued(task="s.add", meta={"k": 1}, count=1)
        box.refute_enqueued(task="s.add", args=[9, 9])
        with pytest.raises(AssertionError, match="expected no job matching"):
            box.refute_enqueued(task="s.snooze")
        with pytest.raises(AssertionError, match="expected 3 job"):
            box.assert_enqueued(task="s.add", count=3)
        drained = box.drain(app)
        assert (drained.completed, drained.failed, drained.snoozed) == (3, 1, 1)
        assert sorted(drained.results.values()) == [1, 3, 10]
        box.refute_enqueued(task="s.add")
        box.assert_enqueued(task="s.snooze", state="scheduled")
        failed = jobs.list(box.engine, state="discarded")
        assert [j.task for j in failed] == ["s.fail"] and "nope" in failed[0].errors[-1]["error"]
        assert box.drain(app, with_scheduled=True).snoozed == 1  # scheduled jobs run now
        schema = box.schema
    import psycopg

    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regnamespace(%s)", (schema,)).fetchone()[0] is None


def test_a_busy_plain_queue_does_not_starve_a_limited_one(app, engine):
    for i in range(20):
        app.tasks["t.work"].apply_async((i,), queue="busy")
    for i in range(3):
        app.tasks["t.work"].apply_async((i,), queue="capped")
    jobs.limit(app, "capped", concurrency=2)
    claimed = engine.claim(["busy", "capped"], 5, "both#1")  # a window smaller than the busy queue
    assert Counter(q for _, q in claimed) == {"capped": 2, "busy": 3}


def test_the_claim_lock_covers_paused_controlled_queues(app, engine, db, database_url, schema):
    """A paused queue's row is locked too: if it is resumed between a claimer's lock and
    its claim, a second claimer still waits, so the limit holds."""
    import psycopg

    jobs.limit(app, "gated", concurrency=2)
    jobs.pause(app, "gated")
    with db.transaction() as conn:
        db.fetchall("queue_controls_lock", conn, queues=["gated"])
        with psycopg.connect(database_url) as other:
            with pytest.raises(psycopg.errors.LockNotAvailable):
                other.execute(f'SELECT 1 FROM "{schema}".queues WHERE name = %s FOR UPDATE NOWAIT', ("gated",))


def test_leader_runs_once_per_interval_across_processes(engine, sql):
    assert engine.rescue(60, lease=30) is not None            # this process won the interval's run
    assert engine.rescue(60, lease=30) is None                # a second process in the same interval skips
    assert engine.prune(lease=30) is not None and engine.prune(lease=30) is None  # each service has its own
    sql("UPDATE {schema}.services SET ran_at = now() - interval '1 minute'")
    assert engine.rescue(60, lease=30) is not None            # the next interval has a leader again
    assert engine.rescue(60, wait=True) is not None           # a shutdown's own rescue needs no lease
    assert {r["name"]: r["ran_by"] is not None for r in sql("SELECT name, ran_by FROM {schema}.services")} == {
        "rescue": True, "prune-jobs": True, "prune-results": False}


def test_drain_honours_max_attempts(database_url):
    """drain() runs retries inline as a worker would run them: a call's max_attempts
    (or the task's) stops them, not Celery's max_retries."""
    from pgbroker.testing import sandbox

    app = Celery("sandboxed", set_as_current=False, task_cls="pgbroker:Task")
    runs = []

    @app.task(name="s.flaky", bind=True, max_retries=10)
    def flaky(self, key):
        runs.append(key)
        raise self.retry(exc=ValueError("still failing"), countdown=0)

    @app.task(name="s.capped", bind=True, max_retries=10, max_attempts=3)
    def capped(self):
        runs.append("capped")
        raise self.retry(exc=ValueError("still failing"), countdown=0)

    with sandbox(database_url) as box:
        box.configure(app)
        flaky.apply_async(("call",), max_attempts=2)
        capped.delay()
        drained = box.drain(app)
        assert drained.failed == 2
        assert sorted(runs) == ["call", "call", "capped", "capped", "capped"]
        assert {j.task: j.state.value for j in jobs.list(box.engine)} == {"s.flaky": "discarded", "s.capped": "discarded"}


def test_cli_against_a_server_that_never_answers_fails_with_a_clear_error(database_url, schema):
    from tests.helpers import TcpProxy

    proxy = TcpProxy.in_front_of(database_url)
    try:
        proxy.hang()
        started = time.monotonic()
        out = CliRunner().invoke(main, ["--url", proxy.route(database_url), "migrate", "--schema", schema])
        assert out.exit_code != 0 and "cannot connect" in out.output
        assert time.monotonic() - started < 30
    finally:
        proxy.close()
