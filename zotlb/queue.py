"""The durable replication queue: one sqlite row per (operation, peer).

Every job is mirrored in memory, so scheduling never scans the table; sqlite
is written on each change so a crash or restart loses nothing that was
acknowledged. Operations are tiny single-row statements in WAL mode, cheap
enough to run on the event loop.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    repo TEXT NOT NULL,
    reference TEXT NOT NULL,
    digest TEXT,
    media_type TEXT,
    body BLOB,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    created_at REAL NOT NULL,
    last_error TEXT
)
"""
# Bodies stay on disk until their job runs: a full queue of big manifests
# must not sit in memory.
_COLUMNS = (
    "id, op, repo, reference, digest, media_type, body IS NOT NULL, source, "
    "target, attempts, next_at, created_at, last_error"
)


_INSERT = (
    "INSERT INTO jobs (op, repo, reference, digest, media_type, body, source,"
    " target, attempts, next_at, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
)


class Op(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(slots=True)
class Job:
    op: Op
    repo: str
    reference: str
    digest: str | None
    media_type: str | None
    body: bytes | None
    source: str
    target: str
    attempts: int = 0
    next_at: float = 0.0
    # Wall-clock time the client's write was acknowledged: lag survives restarts.
    created_at: float = 0.0
    last_error: str | None = None
    id: int = 0
    has_body: bool = False

    @property
    def lane(self) -> tuple[str, str]:
        # Jobs of one repository on one peer run in order: a delete must not
        # overtake the push it undoes.
        return (self.target, self.repo)

    def __repr__(self) -> str:
        return (
            f"<Job {self.id} {self.op.value} {self.repo}:{self.reference} "
            f"{self.source}->{self.target} attempts={self.attempts}>"
        )


class QueueFull(Exception):
    pass


class QueueUnusable(OSError):
    """The state directory or its database cannot be opened."""


class JobQueue:
    """Pending replications, oldest first within each (peer, repository) lane."""

    def __init__(self, state_dir: str | None, limit: int) -> None:
        if state_dir is None:
            self.path = ":memory:"
        else:
            self.path = str(Path(state_dir) / "replication.sqlite")
        self.limit = limit
        self.jobs: dict[int, Job] = {}
        self._lanes: dict[tuple[str, str], deque[int]] = {}
        try:
            if state_dir is not None:
                Path(state_dir).mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process crash (the case we
            # promise); only a power loss can take the last commits.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY id")
            for row in rows:
                self._remember(_from_row(row))
        except (OSError, sqlite3.Error) as exc:
            raise QueueUnusable(f"replication queue {self.path}: {exc}") from None

    def __len__(self) -> int:
        return len(self.jobs)

    def __repr__(self) -> str:
        return f"<JobQueue {self.path} jobs={len(self.jobs)} lanes={len(self._lanes)}>"

    def close(self) -> None:
        self._db.close()

    def _remember(self, job: Job) -> None:
        self.jobs[job.id] = job
        self._lanes.setdefault(job.lane, deque()).append(job.id)

    def add(self, job: Job) -> Job:
        if len(self.jobs) >= self.limit:
            raise QueueFull(f"the replication queue holds {self.limit} jobs")
        job.created_at = job.created_at or time.time()
        job.next_at = job.next_at or job.created_at
        try:
            cursor = self._db.execute(
                _INSERT,
                (
                    job.op.value,
                    job.repo,
                    job.reference,
                    job.digest,
                    job.media_type,
                    job.body,
                    job.source,
                    job.target,
                    job.attempts,
                    job.next_at,
                    job.created_at,
                ),
            )
        except sqlite3.Error as exc:
            raise QueueUnusable(f"replication queue {self.path}: {exc}") from None
        assert cursor.lastrowid is not None
        job.id = cursor.lastrowid
        job.has_body, job.body = job.body is not None, None
        self._remember(job)
        return job

    def load_body(self, job: Job) -> bytes | None:
        """The manifest bytes a job was queued with, if any."""
        if not job.has_body:
            return None
        row = self._db.execute(
            "SELECT body FROM jobs WHERE id = ?", (job.id,)
        ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def done(self, job: Job) -> None:
        self._db.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
        self.jobs.pop(job.id, None)
        lane = self._lanes.get(job.lane)
        if lane is not None:
            try:
                lane.remove(job.id)
            except ValueError:
                pass
            if not lane:
                del self._lanes[job.lane]

    def retry_later(self, job: Job, delay: float, error: str) -> None:
        job.attempts += 1
        job.next_at = time.time() + delay
        job.last_error = error
        self._db.execute(
            "UPDATE jobs SET attempts = ?, next_at = ?, last_error = ? WHERE id = ?",
            (job.attempts, job.next_at, error, job.id),
        )

    def heads(self) -> Iterator[Job]:
        """The first job of every lane: the only ones that may run now."""
        for lane in self._lanes.values():
            yield self.jobs[lane[0]]

    def backlog(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self.jobs.values():
            counts[job.target] = counts.get(job.target, 0) + 1
        return counts


def _from_row(row: tuple[Any, ...]) -> Job:
    (
        id_,
        op,
        repo,
        ref,
        digest,
        media_type,
        has_body,
        source,
        target,
        attempts,
        next_at,
        created_at,
        last_error,
    ) = row
    return Job(
        op=Op(op),
        repo=str(repo),
        reference=str(ref),
        digest=None if digest is None else str(digest),
        media_type=None if media_type is None else str(media_type),
        body=None,
        source=str(source),
        target=str(target),
        attempts=int(attempts),
        next_at=float(next_at),
        created_at=float(created_at),
        last_error=None if last_error is None else str(last_error),
        id=int(id_),
        has_body=bool(has_body),
    )
