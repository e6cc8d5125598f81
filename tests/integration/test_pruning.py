"""Pruning finished jobs: per-state retention, batches, one pruner at a time."""
from __future__ import annotations

import psycopg
import pytest

from pgbroker.config import Options
from pgbroker.db import Database
from pgbroker.engine import JobEngine


def seed(sql, state, n, age_seconds, stamp):
    sql(f"INSERT INTO {{schema}}.jobs (queue, state, body, {stamp}) "
        f"SELECT 'q', %s, 'x', now() - %s * interval '1 second' FROM generate_series(1, %s)", state, age_seconds, n)


def counts(sql):
    return {r["state"]: r["n"] for r in sql("SELECT state::text, count(*) AS n FROM {schema}.jobs GROUP BY 1")}


def test_finished_jobs_past_their_retention_are_deleted_in_batches(engine, sql):
    seed(sql, "completed", 2500, 120, "completed_at")
    seed(sql, "completed", 10, 5, "completed_at")       # too recent
    seed(sql, "discarded", 5, 120, "discarded_at")
    seed(sql, "cancelled", 5, 120, "cancelled_at")
    seed(sql, "available", 5, 120, "inserted_at")       # never pruned
    sql("INSERT INTO {schema}.beat_entries (name, task, schedule) VALUES ('e', 't', '{\"every\": 1}')")
    sql("INSERT INTO {schema}.beat_fires (entry, fire_at, fired_at) VALUES ('e', now(), now() - interval '8 days'),"
        " ('e', now() - interval '1 second', now())")
    assert engine.prune() == {"completed": 2500, "cancelled": 5, "discarded": 5, "fires": 1}
    assert counts(sql) == {"completed": 10, "available": 5}
    assert sql("SELECT count(*) AS n FROM {schema}.beat_fires")[0]["n"] == 1
    assert engine.prune() == {"completed": 0, "cancelled": 0, "discarded": 0, "fires": 0}


def test_retention_is_per_state_and_never_keeps(database_url, transport_options, sql, db):
    options = Options.from_mapping({**transport_options, "prune_completed_after": "never",
                                    "prune_discarded_after": 3600})
    engine = JobEngine(Database(database_url, options))
    seed(sql, "completed", 3, 86400, "completed_at")
    seed(sql, "discarded", 3, 120, "discarded_at")
    seed(sql, "cancelled", 3, 120, "cancelled_at")
    assert engine.prune()["cancelled"] == 3
    assert counts(sql) == {"completed": 3, "discarded": 3}
    engine.db.close()


def test_only_one_process_prunes_at_a_time(engine, sql, database_url, schema):
    seed(sql, "completed", 3, 120, "completed_at")
    with psycopg.connect(database_url) as other:  # another process inside its prune statement
        other.execute("SELECT pg_advisory_xact_lock(hashtext(%s || ':prune-jobs'))", (schema,))
        assert engine.prune() is None
    assert engine.prune()["completed"] == 3


@pytest.mark.parametrize("bad", [-1, "soon"])
def test_a_bad_retention_is_refused(bad):
    from pgbroker.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="prune_completed_after"):
        Options.from_mapping({"prune_completed_after": bad})
