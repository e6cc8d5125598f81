"""An embedded PostgreSQL for demos and tests on machines without one (needs ``pgbroker[embedded]``).

pgserver ships PostgreSQL binaries in a wheel and starts a real server on a
Unix socket in a data directory of ours; we keep it running across calls and
processes (a second call reuses it) and stop it with :func:`stop`.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("PGBROKER_EMBEDDED_DIR", Path.cwd() / ".pgbroker-embedded"))


def start(datadir: str | os.PathLike | None = None, settings: dict[str, str] | None = None) -> str:
    """Start (or reuse) the embedded server; returns a ``postgresql://`` URL for it.

    ``settings``: server parameters it must run with (e.g. ``{"max_connections": "300"}``);
    a server running with other values is reconfigured and restarted.
    """
    try:
        import pgserver
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("the embedded database needs `pip install pgbroker[embedded]`") from exc
    path = Path(datadir or DEFAULT_DIR).resolve()
    path.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(path), cleanup_mode=None)
    url = server.get_uri()
    if settings:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            changed = False
            for name, value in settings.items():
                if conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0] != str(value):
                    conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")  # names are ours, not user input
                    changed = True
        if changed:
            _pg_ctl(path, "-w", "restart")  # with the options it was started with
    return url


def stop(datadir: str | os.PathLike | None = None) -> None:
    """Stop the embedded server if it runs (its data stays for the next start)."""
    path = Path(datadir or DEFAULT_DIR).resolve()
    if (path / "postmaster.pid").exists():
        _pg_ctl(path, "-w", "-m", "fast", "stop")


def _pg_ctl(path: Path, *args: str) -> None:
    from pgserver import pg_ctl

    user = "pgserver" if os.geteuid() == 0 else None  # pgserver runs it as this user under root
    pg_ctl(list(args), pgdata=path, user=user)
