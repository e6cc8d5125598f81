"""Unique jobs: at most one live job per key, enforced by a unique index.

Per call, ``task.apply_async(args, unique={...})``; per task, ``@app.task(unique={...})``
(``unique=True`` means the defaults). The spec:

``fields``
    what the key is made of, among ``"task"``, ``"queue"``, ``"args"``, ``"kwargs"``
    (default: task, args and kwargs).
``keys``
    with ``"kwargs"``: only these keyword arguments count (e.g. ``["user_id"]``).
``period``
    seconds the key is held after the job is stored, or None (default) for as long
    as the job is in ``states``.
``states``
    the job states that hold the key (default: ``available``, ``scheduled``,
    ``executing``, ``retryable``; ``["scheduled"]`` debounces countdown tasks).

A publish whose key is held stores nothing. Its ``AsyncResult`` id names no job:
:func:`duplicate_of` gives the task id of the job holding the key, and tasks with
``base=pgbroker.Task`` return that job's ``AsyncResult`` from ``apply_async``
directly (``result.duplicate`` is True). A Celery retry keeps its job's key.
The publish hook is :mod:`pgbroker.task`'s.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

from .errors import InvalidUnique

__all__ = ["InvalidUnique", "DEFAULT_STATES", "unique_header", "duplicate_of"]

FIELDS = ("task", "queue", "args", "kwargs")
DEFAULT_FIELDS = ("task", "args", "kwargs")
STATES = ("available", "scheduled", "executing", "retryable", "completed", "discarded", "cancelled")
DEFAULT_STATES = ("available", "scheduled", "executing", "retryable")
_REMEMBERED = 10_000

_duplicates: "OrderedDict[str, str]" = OrderedDict()
_lock = threading.Lock()


def _spec(spec: Any) -> dict:
    if spec is True:
        spec = {}
    if not isinstance(spec, dict):
        raise InvalidUnique(f"unique must be a dict (or True), got {spec!r}")
    unknown = set(spec) - {"fields", "keys", "period", "states"}
    if unknown:
        raise InvalidUnique(f"unknown unique option(s) {sorted(unknown)}; use fields, keys, period, states")
    fields = tuple(spec.get("fields") or DEFAULT_FIELDS)
    bad = [f for f in fields if f not in FIELDS]
    if bad:
        raise InvalidUnique(f"unique fields {bad} are not among {FIELDS}")
    keys = spec.get("keys")
    if keys is not None and (not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) for k in keys)):
        raise InvalidUnique(f"unique keys must be a list of keyword-argument names, got {keys!r}")
    period = spec.get("period")
    if period is not None and (isinstance(period, bool) or not isinstance(period, (int, float)) or period <= 0):
        raise InvalidUnique(f"unique period must be a positive number of seconds or None, got {period!r}")
    states = tuple(spec.get("states") or DEFAULT_STATES)
    bad = [s for s in states if s not in STATES]
    if bad:
        raise InvalidUnique(f"unique states {bad} are not job states {STATES}")
    return {"fields": fields, "keys": keys, "period": period, "states": states}


def unique_header(spec: Any, task: str, queue: str | None, args: Any, kwargs: dict | None) -> dict:
    """The ``pgbroker_unique`` header of a publish: its key, states and period.
    Raises :class:`InvalidUnique` for a bad spec."""
    spec = _spec(spec)
    kwargs = dict(kwargs or {})
    if spec["keys"] is not None:
        kwargs = {k: kwargs.get(k) for k in spec["keys"]}
    parts = {"task": task, "queue": queue, "args": list(args or ()), "kwargs": kwargs}
    material = json.dumps([[f, parts[f]] for f in spec["fields"]], sort_keys=True, default=repr)
    key = f"{task}:{hashlib.sha256(material.encode()).hexdigest()[:40]}"
    return {"key": key, "states": list(spec["states"]), "period": spec["period"]}


def record_duplicate(task_id: str | None, holder_task_id: str | None) -> None:
    """Remember that the publish of ``task_id`` found its key held by ``holder_task_id``."""
    if task_id is None or holder_task_id is None:
        return
    with _lock:
        _duplicates[task_id] = holder_task_id
        while len(_duplicates) > _REMEMBERED:
            _duplicates.popitem(last=False)


def duplicate_of(task_id: str) -> str | None:
    """The task id of the job that held the key when ``task_id`` was published in this
    process (the last 10,000 are remembered), or None if ``task_id`` was stored."""
    with _lock:
        return _duplicates.get(task_id)


def __getattr__(name: str):
    if name == "Task":  # pgbroker.Task (built on first use, so that importing this module does not import celery)
        from . import task

        return task.Task
    raise AttributeError(name)
