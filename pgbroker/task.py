"""Per-call job options, and :class:`pgbroker.Task`, the Celery task base that honours them.

``apply_async`` takes Celery's own options (``queue``, ``priority``, ``countdown``/``eta``)
and these pgbroker ones, per call or as task options (``@app.task(max_attempts=5)``):

``unique``
    at most one live job per key (see :mod:`pgbroker.unique`).
``max_attempts``
    how many times the task may run in all (first run and retries): the job row's
    ``max_attempts``. A task on :class:`Task` stops retrying when it is spent, as
    ``max_retries = max_attempts - 1`` would; without an option it is the task's
    ``max_retries + 1``.
``meta``
    a JSON object stored as the job's ``meta`` (filter on it with :mod:`pgbroker.jobs`).
    As a task option it may also be a function of ``(args, kwargs)`` returning one,
    which then applies to every publish of the task (beat's too); a call's own
    ``meta`` is merged over it.
``retry_backoff``, ``retry_backoff_max``, ``retry_jitter``
    the delay of this call's retries, computed as Celery's ``autoretry_for`` does
    (exponential, capped, full jitter by default); with :class:`Task` it replaces
    the task's own delay for every retry of the call.

A bad value raises :class:`~pgbroker.errors.InvalidJobOption` (or ``InvalidUnique``)
from ``apply_async``. The options travel as ``pgbroker_*`` message headers, so they
work from any producer of the app; the hook that reads them is connected when the
pgbroker transport loads.
"""
from __future__ import annotations

import inspect
import json
import math
from typing import Any

from .errors import InvalidJobOption, InvalidUnique
from .unique import duplicate_of, unique_header

__all__ = ["install", "job_headers"]

OPTIONS = ("unique", "max_attempts", "meta", "retry_backoff", "retry_backoff_max", "retry_jitter")
_installed = False


def _max_attempts(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidJobOption(f"max_attempts must be an integer >= 1, got {value!r}")
    return value


def _meta(value: Any) -> dict:
    if not isinstance(value, dict):
        raise InvalidJobOption(f"meta must be a dict, got {value!r}")
    try:
        text = json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidJobOption(f"meta must be JSON-serialisable: {exc}") from None
    if "\\u0000" in text:
        raise InvalidJobOption("meta contains a NUL character")
    return value


def _backoff(factor: Any, maximum: Any, jitter: Any) -> dict:
    for name, value in (("retry_backoff", factor), ("retry_backoff_max", maximum)):
        if isinstance(value, bool) and name == "retry_backoff":
            continue  # Celery's retry_backoff=True means a factor of 1
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise InvalidJobOption(f"{name} must be a number of seconds >= 0, got {value!r}")
    if not isinstance(jitter, bool):
        raise InvalidJobOption(f"retry_jitter must be True or False, got {jitter!r}")
    return {"factor": float(factor), "max": float(maximum), "jitter": jitter}


def _task_meta(task, args: Any, kwargs: Any) -> dict:
    """The task option ``meta``: a JSON object, or a function of the call's arguments."""
    # Unbound: a function given as a task option is a class attribute of the task.
    meta = inspect.getattr_static(task, "meta", None) if task is not None else None
    if isinstance(meta, staticmethod):
        meta = meta.__func__
    if callable(meta):
        try:
            meta = meta(tuple(args or ()), dict(kwargs or {}))
        except Exception as exc:
            raise InvalidJobOption(f"the meta function of task {task.name!r} failed: {exc!r}") from exc
    return _meta(meta) if meta is not None else {}


def job_headers(task, sender: str, options: dict, routing_key: str | None, args: Any, kwargs: Any) -> dict:
    """The ``pgbroker_*`` headers of a first publish, from the call's options (popped
    from ``options``) and then the task's. Raises InvalidJobOption/InvalidUnique."""
    def option(name: str, default: Any = None) -> Any:
        value = options.pop(name, None)
        return getattr(task, name, default) if value is None else value

    headers: dict[str, Any] = {}
    spec = option("unique")
    if spec is not None and spec is not False:
        headers["pgbroker_unique"] = unique_header(spec, sender, routing_key, args, kwargs)
    attempts = option("max_attempts")
    if attempts is None and task is not None and getattr(task, "max_retries", None) is not None:
        attempts = task.max_retries + 1
    if attempts is not None:
        headers["pgbroker_max_attempts"] = _max_attempts(attempts)
    meta = {**_task_meta(task, args, kwargs), **_meta(options.pop("meta", None) or {})}
    if meta:
        headers["pgbroker_meta"] = meta
    explicit = {n: options.pop(n) for n in ("retry_backoff", "retry_backoff_max", "retry_jitter") if n in options}
    if explicit and explicit.get("retry_backoff") is not False:
        headers["pgbroker_backoff"] = _backoff(
            explicit.get("retry_backoff", getattr(task, "retry_backoff", 1) or 1),
            explicit.get("retry_backoff_max", getattr(task, "retry_backoff_max", 600)),
            explicit.get("retry_jitter", getattr(task, "retry_jitter", True)))
    return headers


def _before_publish(sender=None, body=None, headers=None, properties=None, routing_key=None, **_):
    """Celery's ``before_task_publish``: turn pgbroker's options into message headers."""
    if headers is None or properties is None:
        return
    if headers.get("retries"):  # a retry keeps its job's options (the row and pgbroker.Task carry them)
        for name in OPTIONS:
            properties.pop(name, None)
        return
    task = _task_named(sender)
    if isinstance(body, (tuple, list)) and len(body) == 3:
        args, kwargs = body[0], body[1]
    else:  # protocol 1
        args, kwargs = (body or {}).get("args"), (body or {}).get("kwargs")
    try:
        extra = job_headers(task, sender, properties, routing_key, args, kwargs)
    except (InvalidJobOption, InvalidUnique) as exc:
        # Celery logs and swallows a signal handler's error; the transport raises this
        # one at publish instead, so that the caller sees it.
        headers["pgbroker_invalid"] = {"error": type(exc).__name__, "message": str(exc)}
        return
    meta = extra.pop("pgbroker_meta", None)
    if meta is not None:
        headers["pgbroker_meta"] = {**(headers.get("pgbroker_meta") or {}), **meta}
    headers.update(extra)


def _task_named(name: str | None):
    """The task publishing under ``name``: the current app's, else another live app's (the
    signal does not say which app publishes; apps made with set_as_current=False are
    common in tests and libraries)."""
    if not name:
        return None
    from celery import current_app
    from celery._state import _get_active_apps

    for app in (current_app, *_get_active_apps()):
        task = app.tasks.get(name) if app.finalized or name in app._tasks else None
        if task is not None:
            return task
    return None


def install() -> None:
    """Connect the publish hook (idempotent; done when the transport loads)."""
    global _installed
    if _installed:
        return
    from celery import signals

    signals.before_task_publish.connect(_before_publish, weak=False)
    _installed = True


def _header(request, name: str) -> Any:
    """A pgbroker message header of a task's request: a worker's request carries the
    message headers as attributes, an eager one (``Task.apply``) in ``request.headers``."""
    value = getattr(request, name, None)
    return value if value is not None else (getattr(request, "headers", None) or {}).get(name)


def _task_base():
    from celery import Task as CeleryTask
    from celery.utils.time import get_exponential_backoff_interval

    class Task(CeleryTask):
        """A Celery task that honours pgbroker's per-call options.

        * ``apply_async`` of a unique job whose key is held returns the holder's
          ``AsyncResult`` (``result.duplicate`` is True; False otherwise).
        * ``retry()`` stops at the call's ``max_attempts`` and waits the call's
          ``retry_backoff`` delay, and the retry message carries both on;
          ``is_last_attempt()`` says whether it would.

        Use it per task (``@app.task(base=pgbroker.Task)``) or for the whole app
        (``Celery(..., task_cls="pgbroker:Task")``).
        """

        def apply_async(self, *args, **kwargs):
            result = super().apply_async(*args, **kwargs)
            holder = duplicate_of(result.id)
            if holder is None:
                result.duplicate = False
                return result
            existing = self.AsyncResult(holder)
            existing.duplicate = True
            return existing

        def is_last_attempt(self) -> bool:
            """Whether the running attempt is the last one its budget allows (the
            call's ``max_attempts``, else the task's ``max_retries``): a ``retry()``
            now would fail the task instead."""
            attempts = _header(self.request, "pgbroker_max_attempts")
            limit = int(attempts) - 1 if attempts is not None else self.max_retries
            return limit is not None and (self.request.retries or 0) >= limit

        def retry(self, args=None, kwargs=None, exc=None, throw=True, eta=None, countdown=None,
                  max_retries=None, **options):
            request = self.request
            attempts, backoff = _header(request, "pgbroker_max_attempts"), _header(request, "pgbroker_backoff")
            carried = {k: v for k, v in (("pgbroker_max_attempts", attempts), ("pgbroker_backoff", backoff))
                       if v is not None}
            if attempts is not None and max_retries is None:
                max_retries = int(attempts) - 1
            if backoff and eta is None:
                countdown = get_exponential_backoff_interval(
                    factor=int(max(1.0, backoff["factor"])), retries=request.retries,
                    maximum=int(backoff["max"]), full_jitter=backoff["jitter"])
            if carried:
                options["headers"] = {**(request.headers or {}), **(options.get("headers") or {}), **carried}
            return super().retry(args=args, kwargs=kwargs, exc=exc, throw=throw, eta=eta, countdown=countdown,
                                 max_retries=max_retries, **options)

    Task.__module__ = "pgbroker"
    return Task


def __getattr__(name: str):
    if name == "Task":  # built on first use, so importing this module does not import celery
        task = globals()["Task"] = _task_base()
        return task
    raise AttributeError(name)
