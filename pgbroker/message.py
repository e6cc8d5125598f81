"""kombu message dict <-> job row columns.

kombu's virtual transports hand ``_put`` a dict (``body``, ``headers``,
``properties``, ``content-type``, ``content-encoding``). We keep it unchanged,
headers and properties as jsonb in kombu's JSON dialect, and lift the fields the
engine needs into columns: Celery's task id and name, priority, ``eta`` and
``expires``. Nothing here knows Celery beyond the names of those headers.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from kombu.utils.json import dumps, loads

from .config import validate_name
from .errors import InvalidJobOption, InvalidMessage, InvalidUnique, MessageTooLarge

logger = logging.getLogger(__name__)

MIN_PRIORITY, MAX_PRIORITY = 0, 9


def channel_name(schema: str, queue: str) -> str:
    """The LISTEN/NOTIFY channel of ``queue``; mirrors SQL ``notify_channel()``."""
    return "pgb_" + hashlib.md5(f"{schema}:{queue}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Row:
    """The columns one published message becomes."""

    task_id: str | None
    queue: str
    task: str | None
    priority: int
    scheduled_at: datetime | None
    expires_at: datetime | None
    retry: bool
    headers: str
    properties: str
    body: str
    content_type: str | None
    content_encoding: str | None
    #: the key of a unique job (``pgbroker_unique`` header), None for others
    unique_key: str | None = None


def _when(value: Any, name: str) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, (int, float)):
        when = datetime.fromtimestamp(value, timezone.utc)
    else:
        try:
            when = datetime.fromisoformat(str(value))
        except ValueError:
            raise InvalidMessage(f"header {name}={value!r} is not an ISO-8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def priority_of(properties: dict) -> int:
    """kombu priority 0..9 (RabbitMQ meaning: higher first); anything else becomes 0."""
    try:
        return max(MIN_PRIORITY, min(MAX_PRIORITY, int(properties.get("priority") or 0)))
    except (TypeError, ValueError):
        return MIN_PRIORITY


def _properties_json(properties: dict) -> str:
    """Message properties as JSON. kombu passes a publish call's extra keyword arguments
    through as properties; AMQP ignores the ones it does not know, and so do we when
    they cannot be encoded (with a warning naming them), instead of refusing the message."""
    try:
        return dumps(properties)
    except (TypeError, ValueError):
        pass
    kept, dropped = {}, []
    for key, value in properties.items():
        try:
            dumps(value)
            kept[key] = value
        except (TypeError, ValueError):
            dropped.append(key)
    logger.warning("pgbroker: message properties %s cannot be encoded and were not stored", sorted(dropped))
    return dumps(kept)


def to_row(queue: str, message: dict, max_size: int) -> Row:
    """Validate a kombu message for ``queue`` and return its columns."""
    validate_name("queue", queue)
    body = message.get("body")
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidMessage(
                "message body is raw bytes that are not UTF-8; use the transport's default "
                "body_encoding (base64)"
            ) from None
    body = "" if body is None else str(body)
    if len(body) > max_size:
        raise MessageTooLarge(len(body), max_size, queue)
    if "\x00" in body:
        raise InvalidMessage("message body contains a NUL character; use body_encoding=base64")
    headers = message.get("headers") or {}
    try:
        headers_json = dumps(headers)
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"message headers are not serialisable: {exc}") from None
    properties_json = _properties_json(message.get("properties") or {})
    if "\\u0000" in headers_json or "\\u0000" in properties_json:
        raise InvalidMessage("message headers/properties contain a NUL character")
    task_id = headers.get("id")
    task = headers.get("task")
    invalid = headers.get("pgbroker_invalid")
    if isinstance(invalid, dict):  # the publish hook refused a per-call option
        raise (InvalidUnique if invalid.get("error") == "InvalidUnique" else InvalidJobOption)(invalid.get("message"))
    unique = headers.get("pgbroker_unique")
    if unique is not None and not (isinstance(unique, dict) and isinstance(unique.get("key"), str)):
        raise InvalidMessage(f"header pgbroker_unique must be an object with a string key, got {unique!r}")
    return Row(
        task_id=str(task_id) if task_id is not None and task else None,
        queue=queue,
        task=str(task) if task else None,
        priority=priority_of(message.get("properties") or {}),
        scheduled_at=_when(headers.get("eta"), "eta"),
        expires_at=_when(headers.get("expires"), "expires"),
        retry=bool(headers.get("retries")),
        headers=headers_json,
        properties=properties_json,
        body=body,
        content_type=message.get("content-type"),
        content_encoding=message.get("content-encoding"),
        unique_key=unique["key"] if unique else None,
    )


def from_row(row: dict) -> dict:
    """The kombu message dict of a claimed row, with this delivery's identity added.

    ``delivery_tag`` is unique per delivery (``<job id>.<attempt>``); the job id and
    attempt also travel in ``delivery_info`` for acks, and in the
    ``pgbroker_job`` header so that Celery's pool processes can report the outcome (and
    ``pgbroker_queue`` names the queue it was claimed from).
    """
    headers = loads(row["headers"])
    properties = loads(row["properties"])
    job = [row["id"], row["attempt"]]
    headers["pgbroker_job"] = job
    headers["pgbroker_queue"] = row["queue"]
    properties["delivery_tag"] = f"{row['id']}.{row['attempt']}"
    delivery_info = properties.setdefault("delivery_info", {})
    delivery_info.update(redelivered=bool(row["redelivered"]), pgbroker_job=job)
    return {
        "body": row["body"],
        "headers": headers,
        "properties": properties,
        "content-type": row["content_type"],
        "content-encoding": row["content_encoding"],
    }
