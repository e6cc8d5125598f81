"""The one place pgbroker's SQL lives: ``queries.sql``, parsed into named statements."""
from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

from ..schema import render

_NAME_RE = re.compile(r"^-- name: (\w+)\s*$", re.M)


@cache
def _raw() -> dict[str, str]:
    text = files(__package__).joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME_RE.split(text)
    queries = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        lines = [ln for ln in body.strip().splitlines() if not ln.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


@cache
def queries(schema: str) -> dict[str, str]:
    """Every named statement with ``{schema}`` filled in (validated), cached per schema."""
    return {name: render(sql, schema) for name, sql in _raw().items()}
