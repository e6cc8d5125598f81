"""The one place pgbroker's SQL lives: ``queries.sql``, parsed into named statements."""
from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

from ..schema import render

_BLOCK_RE = re.compile(r"^-- (name|fragment): (\w+)\s*$", re.M)


@cache
def _raw() -> dict[str, str]:
    text = files(__package__).joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _BLOCK_RE.split(text)
    queries, fragments = {}, {}
    for kind, name, body in zip(parts[1::3], parts[2::3], parts[3::3]):
        lines = [ln for ln in body.strip().splitlines() if not ln.lstrip().startswith("--")]
        (queries if kind == "name" else fragments)[name] = "\n".join(lines).strip().rstrip(";")
    def expand(sql: str) -> str:  # fragments may use fragments
        for fragment, text in fragments.items():
            if "{%s}" % fragment in sql:
                sql = sql.replace("{%s}" % fragment, expand(text))
        return sql

    return {name: expand(sql) for name, sql in queries.items()}


@cache
def queries(schema: str) -> dict[str, str]:
    """Every named statement with ``{schema}`` filled in (validated), cached per schema."""
    return {name: render(sql, schema) for name, sql in _raw().items()}
