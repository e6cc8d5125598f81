"""The examples a newcomer copies from keep working."""
from __future__ import annotations

import os
import uuid
import subprocess
import sys

import psycopg
import pytest

from tests.helpers import ROOT, Worker, wait_for

pytestmark = pytest.mark.acceptance


def test_demo_runs_to_completion(database_url):
    out = subprocess.run([sys.executable, "examples/demo.py"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PGBROKER_URL": database_url}, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "all jobs reached a final state" in out.stdout
    assert "in a committed txn" in out.stdout and "left 0 job rows" in out.stdout
    assert "-> 1050 cents" in out.stdout and "add.delay(20, 22).get() -> 42" in out.stdout
    assert "{'demo@" in out.stdout and "waiting in Postgres: True" in out.stdout
    assert "cancelled" in out.stdout and "result state REVOKED" in out.stdout
    assert "two beats, no duplicate" in out.stdout and "│ report    │ 1     │ 1    │ 1 " in out.stdout
    assert "-> 3 waiting jobs cancelled ['cancelled']; queue resumed: add.delay(1, 2) -> 3" in out.stdout
    assert "git log of notes.md: Bob's edits by Bob <bob@example.com>" in out.stdout


def run_example(script: str, env: dict, timeout: float = 120, args=()) -> subprocess.CompletedProcess:
    """Run ``examples/<script>`` with ``env`` (examples/ and the repository on the path); it must succeed."""
    out = subprocess.run([sys.executable, script, *args], cwd=ROOT / "examples", text=True, capture_output=True,
                         env={**os.environ, **env, "PYTHONPATH": str(ROOT / "examples") + os.pathsep + str(ROOT)},
                         timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _example_env(database_url: str, schema: str, sql, tmp_path) -> dict:
    """The examples read DATABASE_URL; their own tables go to the test schema too."""
    sql("CREATE SCHEMA IF NOT EXISTS {schema}")
    sep = "&" if "?" in database_url else "?"
    return {"DATABASE_URL": f"{database_url}{sep}options=-csearch_path%3D{schema}",
            "PGBROKER_SCHEMA": schema, "TEST_READY_DIR": str(tmp_path)}


def test_sqlalchemy_web_app(database_url, schema, sql, tmp_path, monkeypatch):
    import importlib
    import io
    import json
    from wsgiref.util import setup_testing_defaults

    env = _example_env(database_url, schema, sql, tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    shop = importlib.import_module("orders_sqlalchemy")
    shop = importlib.reload(shop)
    shop.create_tables()

    def request(method: str, path: str, query: str = "") -> tuple[str, dict]:
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "wsgi.input": io.BytesIO()}
        setup_testing_defaults(environ)
        status = []
        body = b"".join(shop.application(environ, lambda s, h: status.append(s)))
        return status[0], json.loads(body)

    status, placed = request("POST", "/orders", "item=tea")
    assert status.startswith("201"), placed
    status, failed = request("POST", "/orders", "item=cake&fail=1")
    assert status.startswith("500") and "request failed after enqueueing" in failed["error"]
    lost_task = failed["error"].rsplit(" ", 1)[-1]
    assert [r["item"] for r in sql("SELECT item FROM {schema}.example_orders")] == ["tea"]
    assert not sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", lost_task)

    worker = Worker(env, app="orders_sqlalchemy", pool="threads", cwd=ROOT / "examples").wait_ready()
    try:
        def charged_and_settled():  # the job row is settled just after the result is stored
            body = request("GET", f"/orders/{placed['order']}")[1]
            return body if body["status"] == "charged" and body["job"]["state"] == "completed" else None

        shown = wait_for(charged_and_settled, 30, what="the order to be charged and its job completed")
        assert shown["task_state"] == "SUCCESS" and shown["result"] == f"charged order {placed['order']}"
        assert shown["job"]["attempt"] == 1
    finally:
        worker.stop()
    shop.engine.dispose()
    shop.celery.close()


def test_django_app(database_url, schema, sql, tmp_path):
    project = ROOT / "examples" / "django_orders"
    env = {**os.environ, **_example_env(database_url, schema, sql, tmp_path)}

    def manage(*args: str) -> str:
        out = subprocess.run([sys.executable, "manage.py", *args], cwd=project, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    manage("migrate", "-v", "0")
    out = manage("shell", "-c", (
        "import json; from django.test import Client; c = Client()\n"
        "ok = c.post('/orders?item=tea'); bad = c.post('/orders?item=cake&fail=1')\n"
        "print(json.dumps([ok.status_code, ok.json(), bad.status_code, bad.json()]))"))
    import json

    ok_status, placed, bad_status, failed = json.loads(out.strip().splitlines()[-1])
    assert (ok_status, bad_status) == (201, 500)
    lost_task = failed["error"].rsplit(" ", 1)[-1]
    assert [r["item"] for r in sql("SELECT item FROM {schema}.orders_order")] == ["tea"]
    assert not sql("SELECT 1 FROM {schema}.jobs WHERE task_id = %s", lost_task)
    assert sql("SELECT state FROM {schema}.jobs WHERE task_id = %s", placed["task"]) == [{"state": "available"}]

    worker = Worker(env, app="orders_site", pool="threads", cwd=project).wait_ready()
    try:
        wait_for(lambda: sql("SELECT status FROM {schema}.orders_order WHERE id = %s", placed["order"])
                 == [{"status": "charged"}], 30, what="the order to be charged")
        assert len(sql("SELECT 1 FROM {schema}.orders_payment")) == 1
    finally:
        worker.stop()


def test_django_apps_own_tests_run_with_pgbroker_testing(database_url):
    """`manage.py test` of the example: Django's test database, a sandbox in it, publishes
    joining Django's transactions, jobs drained inline."""
    project = ROOT / "examples" / "django_orders"
    env = {**os.environ, "DATABASE_URL": database_url}  # Django creates test_<its name> and drops it
    out = subprocess.run([sys.executable, "manage.py", "test", "orders", "--noinput", "-v", "2"], cwd=project,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "Ran 2 tests" in out.stderr, out.stdout[-3000:] + out.stderr[-3000:]


def test_async_orders_example(database_url, schema, sql, tmp_path):
    env = _example_env(database_url, schema, sql, tmp_path)
    out = run_example("orders_async.py", env).stdout
    assert "psycopg: no gift wrap for order 1: its wrap job went with the savepoint" in out
    assert "sqlalchemy: no gift wrap for order 3: its wrap job went with the savepoint" in out
    assert "order 1: jobs ['charge']\norder 2: jobs ['charge', 'wrap']\norder 3: jobs ['charge']" in out
    worker = Worker(env, app="orders_async", pool="threads", cwd=ROOT / "examples").wait_ready()
    try:
        wait_for(lambda: sql("SELECT count(*) AS n FROM {schema}.jobs WHERE state = 'completed'") == [{"n": 4}],
                 30, what="the four committed jobs to run")
    finally:
        worker.stop()


def test_remote_control_example(worker_env, start_worker):
    start_worker(name="w1", app="shop", pool="threads", cwd=ROOT / "examples", monitoring=True)
    out = run_example("remote_control.py", worker_env)
    assert "ping: [{'w1@" in out.stdout and "consumes ['celery']" in out.stdout
    assert out.stdout.count("succeeded -> ") == 3
    assert "job cancelled by 'celery remote control revoke from" in out.stdout and "result REVOKED" in out.stdout


def test_beat_schedules_example(worker_env):
    out = run_example("beat_schedules.py", worker_env, timeout=180)
    assert "20 paid orders shipped by trigger ship-paid-orders" in out.stdout
    assert "nightly-cleanup    cron 30 2 * * * (Europe/Paris)     enabled=True fires=1" in out.stdout
    assert "tick               every 0:00:02                      enabled=False" in out.stdout


def test_unique_and_snooze_example(worker_env, start_worker):
    start_worker(name="w1", app="shop", pool="threads", cwd=ROOT / "examples")
    out = run_example("unique_and_snooze.py", worker_env)
    first = out.stdout.split("first ", 1)[1].split(";", 1)[0]
    assert f"is a duplicate of {first}" in out.stdout and "receipt: receipt for order-42" in out.stdout
    assert "ship_when_in_stock: shipped teapot" in out.stdout
    assert "completed, 3 deliveries, snoozed 2 times, 0 errors" in out.stdout


def test_job_admin_example(worker_env, start_worker):
    start_worker(name="w1", app="shop", pool="threads", cwd=ROOT / "examples", monitoring=True)
    out = run_example("job_admin.py", worker_env)
    assert "paused=True available=3 nightly=3" in out.stdout
    assert "cancelled 3, revoked 0; states: ['cancelled']" in out.stdout and "after resume: 42" in out.stdout
    assert "import_feed discarded after 2 attempts: ValueError: feed bad://feed is not valid XML" in out.stdout
    assert "after the manual retry: 3 attempts, meta {'retried': 1}, 3 errors" in out.stdout
    assert "limits: concurrency 2, rate 50/1s" in out.stdout and "sum under limits: 55" in out.stdout
    assert "workers: 1, paused queues: []" in out.stdout


def test_telemetry_example(worker_env):
    out = run_example("telemetry.py", worker_env)
    assert "results: ['hello ann', 'ok on retry']" in out.stdout
    assert "job.retried    example.flaky" in out.stdout and "job.failed     example.broken" in out.stdout
    assert "'pgbroker.job.completed': 2" in out.stdout and "'pgbroker.job.failed': 1" in out.stdout


def test_testing_helpers_example(database_url):
    env = {**os.environ, "PGBROKER_TEST_URL": database_url, "PYTHONPATH": str(ROOT / "examples") + os.pathsep + str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pgbroker.testing", "-p", "no:cacheprovider",
                          "test_with_pgbroker.py"], cwd=ROOT / "examples", env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 passed" in out.stdout


def test_storage_example(worker_env, database_url, start_worker, tmp_path):
    schema = "st_" + uuid.uuid4().hex[:10]
    env = {**worker_env, "DATABASE_URL": database_url, "STORAGE_SCHEMA": schema,
           "STORAGE_ROOT": str(tmp_path / "files")}
    try:
        start_worker(name="storage", app="storage_app", pool="threads", concurrency=4, cwd=ROOT / "examples",
                     queues="storage_processing,storage_cleanup,storage_versioning,default",
                     overrides={**env, "PYTHONPATH": str(ROOT / "examples") + os.pathsep + str(ROOT)})
        out = run_example("storage_app.py", env, args=["run"]).stdout
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    assert "refused at once: Bob <bob@example.com> may not version 'notes.md'" in out
    assert "cancelled 1 waiting job(s) of data.csv" in out
    assert ("git log of notes.md: Bob's edits by Bob <bob@example.com>; Second draft by Ann <ann@example.com>; "
            "Store content by Ann <ann@example.com>") in out
    assert out.count("completed") == 6 and "│ cancelled │" in out and "audit log: 6 background actions" in out
    assert out.count("│ ready  │") == 7  # every resource's content stored (the cancelled cleanup never ran)
