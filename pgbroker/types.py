"""Plain types shared by every layer: job states and the job row. Standard library only."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class JobState(str, enum.Enum):
    """The life of a job row (the same vocabulary as Oban's)."""

    #: Ready to be claimed by a consumer.
    AVAILABLE = "available"
    #: Waiting for its ``scheduled_at`` (ETA/countdown); not deliverable before it.
    SCHEDULED = "scheduled"
    #: Claimed by a consumer (prefetched or running); owned by ``attempted_by``.
    EXECUTING = "executing"
    #: Failed and will run again at ``scheduled_at`` (a Celery retry with a delay).
    RETRYABLE = "retryable"
    #: Ran to completion (or a plain kombu consumer acknowledged it).
    COMPLETED = "completed"
    #: Will not run again: retries exhausted, rejected, unknown task, undecodable, expired.
    DISCARDED = "discarded"
    #: Cancelled before it ran.
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


FINAL_STATES = frozenset({JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED})


@dataclass(frozen=True)
class Job:
    """One row of the jobs table, as :func:`pgbroker.engine.JobEngine.get_jobs` returns it."""

    id: int
    task_id: str | None
    queue: str
    task: str | None
    state: JobState
    priority: int
    attempt: int
    redelivered: bool
    acked: bool
    scheduled_at: datetime
    inserted_at: datetime
    attempted_at: datetime | None
    completed_at: datetime | None
    discarded_at: datetime | None
    cancelled_at: datetime | None
    expires_at: datetime | None
    attempted_by: str | None
    errors: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    #: Who or what cancelled the job (a remote-control revoke names its host and pid).
    cancelled_by: str | None = None
    #: How many times it may run in all (the ``max_attempts`` option, or the task's
    #: ``max_retries + 1``); None when unknown.
    max_attempts: int | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Job":
        names = cls.__dataclass_fields__
        values = {k: v for k, v in row.items() if k in names}
        values["state"] = JobState(values["state"])
        return cls(**values)
