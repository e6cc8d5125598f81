"""What survives a server crash: a PostgreSQL of the test's own (embedded), stopped
with ``pg_ctl -m immediate`` (no shutdown checkpoint: the server's crash recovery
keeps exactly what was flushed to the WAL)."""
from __future__ import annotations

import pytest

from pgbroker import embedded
from pgbroker.config import Options
from pgbroker.db import Database
from pgbroker.engine import JobEngine, Outcome


@pytest.fixture
def crashable(tmp_path):
    """(URL, crash and restart) of a server of this test's own. The WAL writer flushes
    every 10 s and autovacuum is off, so only commits that wait for it are flushed."""
    pytest.importorskip("pgserver")
    path = tmp_path / "pg"
    url = embedded.start(path, settings={"wal_writer_delay": "10s", "autovacuum": "off"})

    def crash_and_restart() -> None:
        embedded._pg_ctl(path.resolve(), "-w", "-m", "immediate", "stop")
        embedded._pg_ctl(path.resolve(), "-w", "restart")  # with the options it was started with

    yield url, crash_and_restart
    embedded.stop(path)


def test_a_written_outcome_survives_a_server_crash(crashable):
    """An early-acknowledged job is never redelivered: had its outcome been lost, it
    would stay executing until its worker exits, though the task ran."""
    url, crash_and_restart = crashable
    db = Database(url, Options(schema="crash"))
    try:
        db.ensure_ready()
        engine = JobEngine(db)
        job_id = engine.enqueue("q", {"body": "x", "headers": {"id": "t-1", "task": "t"}, "properties": {}})
        (message, _), = engine.claim(["q"], 1, "c#1")
        attempt = message["properties"]["delivery_info"]["pgbroker_job"][1]
        engine.settle([Outcome(job_id, attempt, "acked"), Outcome(job_id, attempt, "completed")])
    finally:
        db.close()
    crash_and_restart()
    db = Database(url, Options(schema="crash"))
    try:
        assert [j.state.value for j in JobEngine(db).jobs(["t-1"])] == ["completed"]
    finally:
        db.close()
