"""Where content lives: local disk, a git repository per resource, or Postgres.

Every write is idempotent, keyed by the job that makes it, so a retried or redelivered
job finds its earlier work instead of repeating it:

* ``store(resource_id, content, key=, author=, file_name=)`` replaces the current content
  (atomically: a reader sees the old or the new content, never half of it);
* ``write_version(resource_id, content, key=, name=, message=, author=, file_name=)``
  keeps a version and returns where (a git commit id, a file path, a blob key); the
  same ``key`` returns the same place;
* ``delete(resource)`` removes everything of the resource; deleting twice is fine.

These run in the worker only, never inside a database transaction.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert

from .actors import StorageError
from .models import Blob

_AUTHOR_RE = re.compile(r"^(?P<name>[^<>]*?)\s*<(?P<email>[^<>]*)>$")


class StorageUnavailable(StorageError):
    """The backend could not be reached or written (retried by the job)."""


def _atomic_write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class DiskBackend:
    """Files under ``root/<resource id>/``: ``current`` and ``versions/<key>``."""

    #: ``storage_options`` this backend's ``store`` takes (anything else is refused when scheduling).
    options: frozenset[str] = frozenset()

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _dir(self, resource_id: uuid.UUID) -> Path:
        return self.root / str(resource_id)

    def store(self, resource_id: uuid.UUID, content: bytes, **_: str) -> str:
        path = self._dir(resource_id) / "current"
        _atomic_write(path, content)
        return str(path)

    def write_version(self, resource_id: uuid.UUID, content: bytes, *, key: str, **_: str) -> str:
        path = self._dir(resource_id) / "versions" / _safe(key)
        if not path.exists():
            _atomic_write(path, content)
        return str(path)

    def read(self, resource_id: uuid.UUID) -> bytes:
        return (self._dir(resource_id) / "current").read_bytes()

    def delete(self, resource_id: uuid.UUID) -> bool:
        """Remove the resource's files; False when there was nothing (already cleaned up)."""
        path = self._dir(resource_id)
        if not path.exists():
            return False
        shutil.rmtree(path)
        return True


class GitBackend:
    """A git repository per resource under ``root/<resource id>.git`` (bare), branch ``main``,
    the content in one file named like the resource. Each version is a real commit whose
    message is the commit message and whose author is the acting user; the commit carries
    a ``Storage-Job: <key>`` trailer, so a redelivered job finds the commit it made.

    Commits are built with git's plumbing (hash-object, a private index, commit-tree) and
    published with ``update-ref`` compare-and-swap: no shared index, no working tree, and
    a process killed half-way leaves only unreferenced objects.
    """

    branch = "refs/heads/main"
    #: ``message``: the commit message of the stored content (default "Store content").
    options = frozenset({"message"})

    def __init__(self, root: str | os.PathLike, git: str = "git"):
        self.root = Path(root)
        self.git_bin = git

    def repo(self, resource_id: uuid.UUID) -> Path:
        return self.root / f"{resource_id}.git"

    def _git(self, repo: Path, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
        try:
            out = subprocess.run([self.git_bin, "--git-dir", str(repo), *args], input=input, capture_output=True,
                                 env={**os.environ, "GIT_TERMINAL_PROMPT": "0", **(env or {})}, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StorageUnavailable(f"git {args[0]} failed: {exc}") from exc
        if out.returncode != 0:
            raise StorageUnavailable(f"git {' '.join(args[:2])} failed: {out.stderr.decode(errors='replace').strip()}")
        return out.stdout.decode().strip()

    @contextlib.contextmanager
    def _locked(self, resource_id: uuid.UUID) -> Iterator[Path]:
        """The resource's repository (created if needed), locked against other writers on
        this host (the lock goes with the process if it dies)."""
        repo = self.repo(resource_id)
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{resource_id}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (repo / "HEAD").exists():
                try:
                    subprocess.run([self.git_bin, "init", "--quiet", "--bare", "--initial-branch=main", str(repo)],
                                   check=True, capture_output=True, timeout=60)
                except (OSError, subprocess.SubprocessError) as exc:
                    raise StorageUnavailable(f"git init {repo} failed: {exc}") from exc
            yield repo

    def _head(self, repo: Path) -> str | None:
        try:
            return self._git(repo, "rev-parse", "--verify", "--quiet", self.branch)
        except StorageUnavailable:
            return None

    def commit_for(self, resource_id: uuid.UUID, key: str) -> str | None:
        """The commit a job made (by its ``Storage-Job`` trailer), if any."""
        repo = self.repo(resource_id)
        if not (repo / "HEAD").exists() or self._head(repo) is None:
            return None
        found = self._git(repo, "log", "--format=%H", "--fixed-strings", f"--grep=Storage-Job: {key}", self.branch)
        return found.splitlines()[0] if found else None

    def _commit(self, resource_id: uuid.UUID, path: str, content: bytes, key: str, message: str,
                author: str) -> str:
        with self._locked(resource_id) as repo:
            existing = self.commit_for(resource_id, key)
            if existing:
                return existing
            blob = self._git(repo, "hash-object", "-w", "--stdin", input=content)
            parent = self._head(repo)
            with tempfile.TemporaryDirectory() as tmp:
                index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
                if parent:
                    self._git(repo, "read-tree", parent, env=index)
                self._git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=index)
                tree = self._git(repo, "write-tree", env=index)
            match = _AUTHOR_RE.match(author) or _AUTHOR_RE.match("unknown <unknown@storage.invalid>")
            who = {"GIT_AUTHOR_NAME": match["name"] or "unknown", "GIT_AUTHOR_EMAIL": match["email"],
                   "GIT_COMMITTER_NAME": "storage_tasks", "GIT_COMMITTER_EMAIL": "storage-tasks@storage.invalid"}
            body = f"{message.rstrip()}\n\nStorage-Job: {key}\n"
            commit = self._git(repo, "commit-tree", tree, *(["-p", parent] if parent else []), input=body.encode(),
                               env=who)
            # Compare-and-swap: the branch moves only from the parent this commit was built on.
            self._git(repo, "update-ref", self.branch, commit, parent or "0" * 40)
            return commit

    def store(self, resource_id: uuid.UUID, content: bytes, *, key: str, author: str, file_name: str = "content",
              message: str = "Store content", **_: str) -> str:
        return self._commit(resource_id, _safe(file_name), content, key, message, author)

    def write_version(self, resource_id: uuid.UUID, content: bytes, *, key: str, name: str, message: str,
                      author: str, file_name: str = "content") -> str:
        return self._commit(resource_id, _safe(file_name), content, key, message or f"Version {name}", author)

    def read(self, resource_id: uuid.UUID, file_name: str = "content") -> bytes:
        repo = self.repo(resource_id)
        out = subprocess.run([self.git_bin, "--git-dir", str(repo), "show", f"{self.branch}:{_safe(file_name)}"],
                             capture_output=True, check=True)
        return out.stdout

    def log(self, resource_id: uuid.UUID) -> list[dict]:
        """The branch's commits, newest first: sha, author, subject, and the job key."""
        repo = self.repo(resource_id)
        if not (repo / "HEAD").exists() or self._head(repo) is None:
            return []
        out = self._git(repo, "log", "--format=%H%x1f%an <%ae>%x1f%s%x1f%(trailers:key=Storage-Job,valueonly)%x1e",
                        self.branch)
        entries = []
        for record in filter(None, (r.strip() for r in out.split("\x1e"))):
            sha, author, subject, job = (record.split("\x1f") + [""] * 4)[:4]
            entries.append({"sha": sha, "author": author, "subject": subject, "job": job.strip()})
        return entries

    def delete(self, resource_id: uuid.UUID) -> bool:
        repo = self.repo(resource_id)
        if not repo.exists():
            return False
        with self._locked(resource_id):  # (the lock file stays: removing it would let two writers hold "the lock")
            shutil.rmtree(repo, ignore_errors=True)
        return True


class PostgresBackend:
    """Content in the ``blobs`` table (key ``current`` or ``version:<job key>``), each
    write its own short transaction through ``engine``."""

    options: frozenset[str] = frozenset()

    def __init__(self, engine):
        self.engine = engine

    def _put(self, resource_id: uuid.UUID, key: str, content: bytes, replace: bool) -> str:
        stmt = insert(Blob).values(resource_id=resource_id, key=key, content=content)
        stmt = (stmt.on_conflict_do_update(index_elements=[Blob.resource_id, Blob.key], set_={"content": content})
                if replace else stmt.on_conflict_do_nothing())
        with self.engine.begin() as conn:
            conn.execute(stmt)
        return f"blob:{resource_id}/{key}"

    def store(self, resource_id: uuid.UUID, content: bytes, **_: str) -> str:
        return self._put(resource_id, "current", content, replace=True)

    def write_version(self, resource_id: uuid.UUID, content: bytes, *, key: str, **_: str) -> str:
        return self._put(resource_id, f"version:{key}", content, replace=False)

    def read(self, resource_id: uuid.UUID) -> bytes:
        with self.engine.connect() as conn:
            return conn.execute(select(Blob.content).where(Blob.resource_id == resource_id,
                                                           Blob.key == "current")).scalar_one()

    def delete(self, resource_id: uuid.UUID) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(delete(Blob).where(Blob.resource_id == resource_id).returning(Blob.key)).first() \
                is not None


def _safe(name: str) -> str:
    """A file name safe in one directory: no separators, no leading dots."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".")
    return cleaned[:200] or "content"
