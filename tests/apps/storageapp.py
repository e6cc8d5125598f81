"""The storage_tasks app the acceptance tests run under real ``celery worker`` processes.

Configured from the environment: ``BROKER_URL``, ``PGBROKER_SCHEMA``, ``TEST_DB_URL``,
``STORAGE_SCHEMA`` (where the storage tables go) and ``STORAGE_ROOT`` (files and git
repositories). With ``PAUSE_AFTER_COMMIT=<path>``, a version job stops right after its
git commit (before it records the version) until ``<path>`` exists, having written
``<path>.committed``: the moment a test kills the worker.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from celery import Celery
from sqlalchemy import create_engine

import storage_tasks
from storage_tasks import GitBackend

app = Celery("storage-tests", broker=os.environ.get("BROKER_URL"))
app.conf.update(
    broker_transport_options={"schema": os.environ.get("PGBROKER_SCHEMA", "pgbroker"), "polling_interval": 0.5,
                              "heartbeat_interval": 0.5, "rescue_after": 2.0, "prune_completed_after": "never",
                              "prune_discarded_after": "never", "prune_cancelled_after": "never"},
    task_ignore_result=True, worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
)
engine = create_engine(os.environ["TEST_DB_URL"].replace("postgresql://", "postgresql+psycopg://", 1)).execution_options(
    schema_translate_map={"storage": os.environ["STORAGE_SCHEMA"]})
ROOT = Path(os.environ["STORAGE_ROOT"])


class PausingGit(GitBackend):
    def write_version(self, resource_id, content, **kwargs):
        ref = super().write_version(resource_id, content, **kwargs)
        gate = os.environ.get("PAUSE_AFTER_COMMIT")
        if gate:
            Path(gate + ".committed").write_text(ref)
            deadline = time.monotonic() + 120
            while not Path(gate).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return ref


storage = storage_tasks.setup(app, engine, ROOT, backends={"git": PausingGit(ROOT / "git")})
QUEUES = ",".join(storage_tasks.QUEUES)
