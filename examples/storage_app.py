"""storage_tasks, as a small command-line app: resources created and changed by different
actors, processed, versioned and cleaned up by a Celery worker, with their job status.

    export DATABASE_URL=postgresql://user:pass@host/db
    celery -A storage_app worker -Q storage_processing,storage_cleanup,storage_versioning,default
    python storage_app.py run        # the scenario below, then the status of every job
    python storage_app.py status     # resources, versions and jobs

Ann (a user) creates a git-backed document and versions it; a CI API key of Ann's
creates a CSV on disk; the nightly system actor stores a report in Postgres; Bob, a
stranger, is refused; Ann's document gets a version by Bob once he is granted access;
a cleanup is scheduled for later, then cancelled.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
from celery import Celery
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

import storage_tasks
from pgbroker.config import broker_url
from storage_tasks import ApiKey, AuditEntry, Forbidden, Grant, StorageResource, StorageVersion, SystemActor, User

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://localhost/shop")
app = Celery("storage_app", broker=broker_url(DATABASE_URL))
app.conf.update(broker_transport_options={"schema": os.environ.get("PGBROKER_SCHEMA", "pgbroker")},
                task_ignore_result=True)
engine = create_engine(DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1)).execution_options(
    schema_translate_map={"storage": os.environ.get("STORAGE_SCHEMA", "storage")})
storage = storage_tasks.setup(app, engine, os.environ.get("STORAGE_ROOT", Path(__file__).parent / ".storage"))
console = Console(width=None if sys.stdout.isatty() else 140)


@click.group()
def cli():
    """storage_tasks example."""


@cli.command()
def run():
    """Create resources as different actors, schedule the three jobs, wait, show the status."""
    storage.migrate()
    with Session(engine, expire_on_commit=False) as session, session.begin():
        ann, bob = User(email="ann@example.com", name="Ann"), User(email="bob@example.com", name="Bob")
        session.add_all([ann, bob])
        session.flush()
        key = ApiKey(user_id=ann.id, name="ci")
        session.add(key)
        session.flush()
        notes = storage.create_resource(session, "notes.md", "git", "# Notes\n", actor=ann)
        data = storage.create_resource(session, "data.csv", "disk", "a,b\n1,2\n", actor=key)
        report = storage.create_resource(session, "report.txt", "postgres", "nightly: ok\n", actor=ann)
    wait_until_done([notes, data, report])  # the first contents are stored
    storage.process_storage_async(report, "nightly: all green\n", actor=SystemActor("nightly"))
    storage.create_version_async(notes, "# Notes\n\nv2\n", version_name="v2", commit_message="Second draft",
                                 actor=ann)
    try:
        storage.create_version_async(notes, "# Bob was here\n", actor=bob)
    except Forbidden as exc:
        console.print(f"[yellow]refused at once[/]: {exc}")
    with Session(engine) as session, session.begin():
        session.add(Grant(resource_id=notes.id, user_id=bob.id))
    storage.create_version_async(notes, "# Notes\n\nv3 by Bob\n", version_name="v3", commit_message="Bob's edits",
                                 actor=bob)
    storage.cleanup_content_async(data, actor=key, delay=3600)
    console.print(f"cancelled {storage.cancel_jobs(data)} waiting job(s) of data.csv (the cleanup)")
    resources = [notes, data, report]
    wait_until_done(resources)
    show(resources)
    log = storage.backends["git"].log(notes.id)
    console.print("git log of notes.md: " + "; ".join(f"{c['subject']} by {c['author']}" for c in log))
    with Session(engine) as session:
        audited = session.scalar(select(func.count()).select_from(AuditEntry))
    console.print(f"audit log: {audited} background actions, each with its original actor")


def wait_until_done(resources, timeout: float = 60.0) -> None:
    """Until no job of ``resources`` waits or runs."""
    deadline = time.monotonic() + timeout
    while any(s.state in ("available", "scheduled", "executing", "retryable")
              for r in resources for s in storage.get_job_status(r)):
        if time.monotonic() > deadline:
            raise SystemExit("the jobs did not finish in time: is a worker running on the storage queues?")
        time.sleep(0.2)


@cli.command()
def status():
    """Every resource with its versions and jobs."""
    with Session(engine) as session:
        show(session.scalars(select(StorageResource).order_by(StorageResource.created_at)).all())


def show(resources) -> None:
    t = Table(title="storage jobs")
    for column in ("resource", "backend", "status", "versions", "job", "as", "queue", "state", "attempt", "error"):
        t.add_column(column)
    with Session(engine) as session:
        for r in resources:
            row = session.get(StorageResource, r.id)
            versions = session.scalars(select(StorageVersion.name).where(StorageVersion.resource_id == r.id)).all()
            for s in reversed(storage.get_job_status(r)):
                actor = s.actor or {}
                who = actor.get("name") or f"{actor.get('type')} {actor.get('id', '')}".strip()
                t.add_row(row.file_name, row.backend, row.status, ",".join(versions), s.action, who, s.queue, s.state,
                          f"{s.attempt}/{s.max_attempts}", (s.errors[-1]["error"] if s.errors else "")[:50])
    console.print(t)


if __name__ == "__main__":
    cli()
