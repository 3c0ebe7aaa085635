"""The persistent job queue and history: one SQLite table, safe across crashes and restarts.

    store = Store(Path("data"))          # data/nodegraph.sqlite3, created when missing
    job = store.add(workflow, client_id="editor-1")
    running = store.claim()              # the oldest pending job, now running (atomically)
    store.finish(running.id, "ok", {"nodes": {...}, "files": [...], "errors": []})

Every job, pending or finished, is one row. `seq` (monotonic, never reused) is the run order;
`done_seq` (also monotonic) is the order jobs finished in, which is the history's order.
A job still `running` when the store is opened again was cut off by a crash or a kill: `recover()`
marks it `error` with the code `interrupted_by_shutdown`; it can be queued again from history.

A workflow is kept as the JSON text it was stored as, and `Job.to_json_text()` splices that text
into an answer: reading a job back never parses or re-encodes its workflow, which for a graph of
100 000 nodes takes a second during which Python can run nothing else. `workflow` parses on use.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_NAME = "nodegraph.sqlite3"
LOCK_NAME = "nodegraph.lock"
PENDING, RUNNING = "pending", "running"
FINISHED = ("ok", "error", "interrupted", "cancelled")
SHUTDOWN_CODE = "interrupted_by_shutdown"
SHUTDOWN_MESSAGE = "interrupted by shutdown; queue it again from history"
SQLITE_FULL = 13  # "database or disk is full" (sqlite3.SQLITE_FULL from Python 3.11)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    id        TEXT NOT NULL UNIQUE,
    status    TEXT NOT NULL,
    client_id TEXT,
    created   REAL NOT NULL,
    started   REAL,
    finished  REAL,
    done_seq  INTEGER UNIQUE,
    workflow  TEXT NOT NULL,
    result    TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
"""


@dataclass
class Job:
    id: str
    status: str
    client_id: str | None
    created: float
    workflow_json: str  # the workflow as stored: JSON text (as an API client sent it, or encoded here)
    started: float | None = None
    finished: float | None = None
    seq: int = 0
    done_seq: int | None = None
    position: int | None = None  # pending jobs only: 0 runs next
    result: dict[str, Any] = field(default_factory=dict)  # nodes, files, errors once finished
    _workflow: Any = field(default=None, repr=False, compare=False)

    @property
    def workflow(self) -> Any:
        """The workflow, parsed on first use."""
        if self._workflow is None:
            self._workflow = json.loads(self.workflow_json)
        return self._workflow

    def to_json(self, with_workflow: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "job_id": self.id, "status": self.status, "client_id": self.client_id,
            "created": self.created, "started": self.started, "finished": self.finished,
        }
        if self.status == PENDING:
            data["position"] = self.position
        data["nodes"] = self.result.get("nodes", {})
        data["files"] = self.result.get("files", [])
        data["errors"] = self.result.get("errors", [])
        if with_workflow:
            data["workflow"] = self.workflow
        return data

    def to_json_text(self) -> str:
        """`json.dumps(self.to_json())`, with the stored workflow text spliced in rather than re-encoded."""
        head = json.dumps(self.to_json(with_workflow=False))
        return f'{head[:-1]}, "workflow": {self.workflow_json}}}'


class JobExists(Exception):
    """`Store.add` with a `job_id` that a job already has."""


class StoreBusy(Exception):
    """Another process has the data folder open."""


class StorageFull(Exception):
    """A write failed for want of space (ENOSPC, EDQUOT, SQLite's "database or disk is full").

    Names the folder (`folder`: its name, never its absolute path, which answers must not show). Nothing
    was written: the transaction is rolled back, and the same call succeeds once there is space again.
    """

    def __init__(self, folder: str, what: str = "data folder") -> None:
        super().__init__(f"no space left for the {what} {folder!r}: free some disk space (or raise the quota); "
                         "nothing was lost, and it works again by itself once there is room")
        self.folder, self.what = folder, what


def storage_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk (or the user's quota) is full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
        return code == SQLITE_FULL if code is not None else "database or disk is full" in str(exc)
    return False


class Store:
    """SQLite in WAL mode; one connection shared by the server's threads behind a lock.

    synchronous=FULL: a commit is on disk before `add()` returns, so a job the API answered
    201 for survives even a power cut. The store writes a few rows per job, never per step,
    so the extra fsync costs nothing that matters.
    """

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / FILE_NAME
        # One process per data folder: a second server would mark the first one's running job
        # as cut off (recover) while it still runs.
        self._owner = _lock_folder(data_dir / LOCK_NAME)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), nothing implicit.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._queued: dict[str, Any] = {}  # parsed workflows of jobs added by this process, until claimed
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        os.close(self._owner)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes SQLite's write lock at once, so a read-then-update (claim, finish)
        # cannot interleave with another writer, even one in another process.
        # A failed write (the disk full, most often) rolls back, so the next one starts afresh: a transaction left
        # open would refuse every later BEGIN.
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL can)
                        with suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
            except (OSError, sqlite3.Error) as exc:
                if storage_full(exc):
                    raise StorageFull(self.path.parent.name or self.path.parent.as_posix()) from exc
                raise

    def recover(self) -> list[str]:
        """Mark the jobs left `running` by a process that died as errors; their ids."""
        problem = {"node_id": None, "input": None, "code": SHUTDOWN_CODE, "message": SHUTDOWN_MESSAGE}
        with self._write() as db:
            ids = [row["id"] for row in db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq", (RUNNING,))]
            for job_id in ids:
                self._finish(db, job_id, "error", json.dumps({"nodes": {}, "files": [], "errors": [problem]}))
        return ids

    def add(self, workflow: Any, client_id: str | None = None, text: str | None = None,
            job_id: str | None = None) -> Job:
        """Queue `workflow`; `text`: its JSON text when the caller has it (as an API client sent it); `job_id`: the
        id to keep (ComfyUI's `prompt_id`), a fresh one when None. A `job_id` already taken is a `JobExists`."""
        # Encoded before taking the lock, so other threads' reads do not wait on it. A workflow parsed from JSON
        # cannot hold a cycle: skipping the check and the spaces makes a 10,000-node one 1.5× faster to encode.
        if text is None:
            text = json.dumps(workflow, separators=(",", ":"), check_circular=False)
        job = Job(job_id or uuid.uuid4().hex, PENDING, client_id, time.time(), text, _workflow=workflow)
        try:
            with self._write() as db:
                cursor = db.execute("INSERT INTO jobs (id, status, client_id, created, workflow) "
                                    "VALUES (?, ?, ?, ?, ?)", (job.id, PENDING, client_id, job.created,
                                                               job.workflow_json))
                job.seq = cursor.lastrowid or 0
                # In the same transaction: the worker may claim the job as soon as it is committed.
                (job.position,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status = ? AND seq < ?",
                                             (PENDING, job.seq)).fetchone()
                self._queued[job.id] = workflow  # the worker runs it without parsing it again
        except sqlite3.IntegrityError:
            raise JobExists(job.id) from None  # only a given `job_id` can collide; nothing was written
        except BaseException:
            self._queued.pop(job.id, None)  # not committed (a full disk): no such job
            raise
        return job

    def claim(self, job_id: str | None = None) -> Job | None:
        """The oldest pending job (or `job_id` if pending), switched to running in the same transaction.

        None when none waits (or `job_id` is not pending).
        """
        with self._write() as db:
            if job_id is None:
                row = db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq LIMIT 1", (PENDING,)).fetchone()
            else:
                row = db.execute("SELECT id FROM jobs WHERE status = ? AND id = ?", (PENDING, job_id)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = ?, started = ? WHERE id = ?", (RUNNING, time.time(), row["id"]))
            workflow = self._queued.pop(row["id"], None)
        job = self.get(row["id"])
        if job is not None and workflow is not None:
            job._workflow = workflow
        return job

    def requeue(self, job_id: str) -> bool:
        """Put a running job back in the queue, in its old place (its worker died); False if not running."""
        with self._write() as db:
            cursor = db.execute("UPDATE jobs SET status = ?, started = NULL WHERE id = ? AND status = ?",
                                (PENDING, job_id, RUNNING))
        return cursor.rowcount > 0

    def pending(self, limit: int) -> list[Job]:
        """The first `limit` pending jobs in run order (what a router looks ahead at)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq LIMIT ?",
                                    (PENDING, limit)).fetchall()
        jobs = [_job(r) for r in rows]
        for position, job in enumerate(jobs):
            job.position = position
            job._workflow = self._queued.get(job.id)  # parsed already when this process added it
        return jobs

    def finish(self, job_id: str, status: str, result: dict[str, Any]) -> None:
        """Record a running job's end: status ok, error or interrupted, and its result."""
        text = json.dumps(result)
        with self._write() as db:
            self._finish(db, job_id, status, text)

    def cancel(self, job_id: str) -> bool:
        """Cancel a pending job (kept in history); False when it is not pending."""
        with self._write() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != PENDING:
                return False
            self._finish(db, job_id, "cancelled", "{}")
            self._queued.pop(job_id, None)
        return True

    @staticmethod
    def _finish(db: sqlite3.Connection, job_id: str, status: str, result: str) -> None:
        assert status in FINISHED, status
        (done,) = db.execute("SELECT COALESCE(MAX(done_seq), 0) + 1 FROM jobs").fetchone()
        db.execute("UPDATE jobs SET status = ?, finished = ?, done_seq = ?, result = ? WHERE id = ?",
                   (status, time.time(), done, result, job_id))

    def delete(self, job_id: str) -> bool:
        """Remove a finished job from history; False when there is no such finished job."""
        with self._write() as db:
            marks = ",".join("?" * len(FINISHED))
            gone = db.execute(f"DELETE FROM jobs WHERE id = ? AND status IN ({marks})", (job_id, *FINISHED))
        return gone.rowcount > 0

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            position = None
            if row["status"] == PENDING:
                (position,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ? AND seq < ?",
                                               (PENDING, row["seq"])).fetchone()
        job = _job(row)  # results are decoded outside the lock: other threads need not wait
        job.position = position
        return job

    def queue(self) -> tuple[list[Job], list[Job]]:
        """(running, pending): the pending jobs in run order, with their positions."""
        with self._lock:
            rows = [self._db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (status,)).fetchall()
                    for status in (RUNNING, PENDING)]
        running, pending = ([_job(r) for r in found] for found in rows)
        for position, job in enumerate(pending):
            job.position = position
        return running, pending

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs WHERE status IN (?, ?) GROUP BY status",
                                    (PENDING, RUNNING)).fetchall()
        found = {status: count for status, count in rows}
        return {PENDING: found.get(PENDING, 0), RUNNING: found.get(RUNNING, 0)}

    def history(self, limit: int = 50, before: int | None = None) -> tuple[list[Job], int | None]:
        """Finished jobs, most recently finished first, and the cursor for the next page (or None)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE done_seq IS NOT NULL AND done_seq < ? ORDER BY done_seq DESC LIMIT ?",
                (before if before is not None else 2**63 - 1, limit + 1)).fetchall()
        jobs = [_job(r) for r in rows[:limit]]
        more = len(rows) > limit
        return jobs, (jobs[-1].done_seq if more and jobs else None)


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], status=row["status"], client_id=row["client_id"], created=row["created"],
               workflow_json=row["workflow"], started=row["started"], finished=row["finished"],
               seq=row["seq"], done_seq=row["done_seq"], result=json.loads(row["result"] or "{}"))


def _lock_folder(path: Path) -> int:
    """An exclusive advisory lock held while the store is open; the OS drops it if the process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one server per folder is up to the user there
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreBusy(f"{path.parent} is in use by another nodegraph process") from None
    return fd
