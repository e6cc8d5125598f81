"""Test helpers: bounded waiting (never bare sleeps) and real worker processes."""
from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def run_pgbroker(database_url: str, schema: str, *args: str) -> subprocess.CompletedProcess:
    """The ``pgbroker`` command (``--url``, then ``args`` and ``--schema``), run to its end."""
    return subprocess.run([str(Path(sys.executable).parent / "pgbroker"), "--url", database_url, *args,
                           "--schema", schema], cwd=ROOT, capture_output=True, text=True, timeout=60)


def wait_for(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


class CeleryProcess:
    """A real ``celery`` subprocess in its own process group, cleaned up by pid."""

    ready_line = " ready."

    def __init__(self, env: dict, cmd: list[str], name: str, overrides: dict | None = None, cwd: Path | None = None):
        self.ready_file = Path(env["TEST_READY_DIR"]) / f"{name}.ready"
        self.ready_file.unlink(missing_ok=True)
        self.log_path = Path(env["TEST_READY_DIR"]) / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.env = {**os.environ, **env, **(overrides or {}), "TEST_WORKER_NAME": name,
                    "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> "CeleryProcess":
        """Until the test app touches its ready file, or the process logs its ready line."""
        wait_for(lambda: self.ready_file.exists() or self.proc.poll() is not None or self.ready_line in self.output(),
                 timeout, what=f"{type(self).__name__.lower()} ready")
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.proc.args[3:5]} exited with {self.proc.returncode}:\n{self.output()}")
        return self

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the process and its children (a crash: no shutdown code runs)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM to the main process), then SIGKILL the group if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self.log.close()


class Worker(CeleryProcess):
    """A real ``celery worker``."""

    def __init__(self, env: dict, app: str = "tests.apps.celeryapp", pool: str = "prefork",
                 concurrency: int = 2, queues: str | None = None, name: str = "w1", extra=(),
                 overrides: dict | None = None, cwd: Path | None = None, monitoring: bool = False):
        """``monitoring``: run with Celery's defaults (mingle, gossip, heartbeats) and task
        events (``-E``); otherwise those are off, which keeps start-up fast."""
        cmd = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool, "-c", str(concurrency),
               "-n", f"{name}@%h", "-l", "info", *extra]
        cmd += ["-E"] if monitoring else ["--without-mingle", "--without-gossip", "--without-heartbeat"]
        if queues:
            cmd += ["-Q", queues]
        super().__init__(env, cmd, name, overrides, cwd)


class Beat(CeleryProcess):
    """A real ``celery beat`` with pgbroker's scheduler."""

    ready_line = "configured entries synced"

    def __init__(self, env: dict, app: str = "tests.apps.celeryapp", name: str = "b1",
                 overrides: dict | None = None, cwd: Path | None = None):
        pidfile = Path(env["TEST_READY_DIR"]) / f"{name}.pid"
        cmd = [sys.executable, "-m", "celery", "-A", app, "beat", "-S", "pgbroker", "-l", "info",
               "--pidfile", str(pidfile)]
        super().__init__(env, cmd, name, overrides, cwd)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list]:
    """Start ``fn`` in a daemon thread; the list receives its return value or exception."""
    outcome: list = []

    def run():
        try:
            outcome.append(fn())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


class TcpProxy:
    """A TCP forwarder to a real server that a test can cut and restore.

    While cut, every forwarded connection is closed and new ones are closed on
    accept: to its clients the server looks dead, without stopping it. While hung,
    new connections are accepted and never answered (a server that has stopped
    responding, or a proxy in front of one).
    """

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._cut = threading.Event()
        self._hung = threading.Event()
        self._held: list[socket.socket] = []
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def in_front_of(cls, url: str) -> "TcpProxy":
        """A proxy to the server of ``url``."""
        u = urlsplit(url)
        return cls(u.hostname, u.port or 5432)

    def route(self, url: str) -> str:
        """``url`` through this proxy (its host and port replaced)."""
        u = urlsplit(url)
        userinfo = u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else ""
        return urlunsplit(u._replace(netloc=f"{userinfo}127.0.0.1:{self.port}"))

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def hang(self) -> None:
        """Cut, then accept new connections and never answer them."""
        self.cut()
        self._hung.set()
        self._cut.clear()

    def restore(self) -> None:
        self._cut.clear()
        self._hung.clear()
        with self._lock:
            held, self._held = self._held, []
        for s in held:
            s.close()

    def close(self) -> None:
        self.cut()
        self.restore()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            if self._hung.is_set():
                with self._lock:
                    self._held.append(client)
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select():
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            sel.close()
            a.close()
            b.close()
