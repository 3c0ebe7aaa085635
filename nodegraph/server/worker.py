"""The worker: one thread that takes jobs off the store's queue and runs them on the executor.

Jobs run off the event loop, so the API answers while a job samples. There is one executor for
the life of the server, so its output cache and resident models carry over between jobs.
A job is claimed atomically (`Store.claim`), re-validated by `Executor.run` (model files may
have changed since it was queued) and recorded before `job_finished` is published, so a client
that sees `job_finished` finds the final job in the API. Before its first job the thread runs the node
packs' warm-up (`nodegraph serve`: the imports a first diffusion job would otherwise wait for).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodegraph import events as ev
from nodegraph.context import CancelToken
from nodegraph.executor import Executor, RunResult
from nodegraph.store import SHUTDOWN_CODE, SHUTDOWN_MESSAGE, Job, StorageFull, Store

log = logging.getLogger("nodegraph.server")
Publish = Callable[[str | None, dict[str, Any]], None]


def output_name(path: str, output_dir: Path) -> str:
    """A file the executor recorded, named relative to the output folder (as `/api/outputs/` serves it).

    Nodes record paths under the output folder as given (maybe relative to the working directory).
    """
    relative = os.path.relpath(os.path.realpath(path), os.path.realpath(output_dir))
    return path if relative == ".." or relative.startswith("../") else Path(relative).as_posix()


class Worker:
    storage_retry = 5.0  # seconds between tries while the disk is full (a new job tries at once)

    def __init__(self, store: Store, executor: Executor, publish: Publish,
                 warm_up: Callable[[], None] | None = None) -> None:
        self.store, self.executor, self.publish = store, executor, publish
        self._warm_up = warm_up
        self._wake = threading.Event()
        self._lock = threading.Lock()  # claiming vs cancelling: a job is never both
        self._busy = threading.Lock()  # held while a job runs; /api/free frees between jobs
        self._current: tuple[str, CancelToken] | None = None
        self._stopping = False
        self._free_requested = False
        self._halt = threading.Event()  # set by stop()
        self._storage_error: str | None = None  # while the data folder's disk is full
        self._thread = threading.Thread(target=self._loop, name="nodegraph-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Interrupt the running job (recorded as cut off by the shutdown) and wait for the thread."""
        self._stopping = True
        self._halt.set()
        with self._lock:
            if self._current is not None:
                self._current[1].cancel()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def wake(self) -> None:
        """A job was queued."""
        self._wake.set()

    def cancel(self, job_id: str) -> str | None:
        """'cancelled' (it was pending), 'interrupting' (it is running), or None (neither)."""
        with self._lock:
            if self.store.cancel(job_id):
                return "cancelled"
            if self._current is not None and self._current[0] == job_id:
                self._current[1].cancel()
                return "interrupting"
        return None

    def free(self) -> bool:
        """Unload models and clear the output cache now if idle (True), else right after the running job."""
        if self._busy.acquire(blocking=False):
            try:
                self._free()
            finally:
                self._busy.release()
            return True
        self._free_requested = True
        self._wake.set()
        return False

    def workers(self) -> None:
        """One process: no separate workers (its models are the app's)."""
        return None

    def _free(self) -> None:
        self._free_requested = False
        self.executor.free_memory()

    def _loop(self) -> None:
        if self._warm_up is not None:
            # On this thread, before any job: imports racing with a job's own (two threads importing diffusers
            # and peft at once) can meet half-initialised modules. A job queued meanwhile waits for it. It starts
            # at the first wake (the server listening, or a job queued): it would slow the start if it ran sooner.
            self._wake.wait()
            started = time.monotonic()
            self._warm_up()
            log.info("warmed up in %.2f s", time.monotonic() - started)
        while not self._stopping:
            self._wake.clear()  # before claiming: a job queued after the claim sets it again
            with self._busy:
                if self._free_requested:
                    self._free()
                with self._lock:
                    job = None if self._stopping else self._claim()
                    token = CancelToken()
                    self._current = (job.id, token) if job else None
                if job is not None:
                    log.info("job %s started", job.id)
                    started = time.monotonic()
                    try:
                        status, record = self._run(job, token)
                    finally:
                        with self._lock:
                            self._current = None
            if job is None:
                self._wake.wait(self.storage_retry if self._storage_error else None)
                continue
            # Recorded once the worker is idle, so a client that sees the job finished can free at once.
            if not self._finish(job, status, record):
                return  # stopping with the disk still full: the job is marked cut off at the next start
            log.info("job %s finished: %s in %.2f s", job.id, status, time.monotonic() - started)
            self.publish(job.client_id, {"type": "job_finished", "job_id": job.id, "status": status,
                                         "files": record["files"], "errors": record["errors"]})

    def _claim(self) -> Job | None:
        """The next job; None while the disk is full (the job stays queued, tried again every `storage_retry`)."""
        try:
            job = self.store.claim()
        except StorageFull as exc:
            self._storage_failed(exc)
            return None
        self._storage_back()
        return job

    def _finish(self, job: Job, status: str, record: dict[str, Any]) -> bool:
        """Record the job's end, trying again while the disk is full; False if the server stops first."""
        while True:
            try:
                self.store.finish(job.id, status, record)
            except StorageFull as exc:
                self._storage_failed(exc)
                if self._halt.wait(self.storage_retry):
                    return False
                continue
            self._storage_back()
            return True

    def _storage_failed(self, exc: StorageFull) -> None:
        if self._storage_error is None:  # once per outage, not once per retry
            log.error("%s (jobs wait until it is back)", exc)
        self._storage_error = str(exc)

    def _storage_back(self) -> None:
        if self._storage_error is not None:
            log.info("storage is back: jobs run again")
        self._storage_error = None

    def _run(self, job: Job, token: CancelToken) -> tuple[str, dict[str, Any]]:
        output_dir = self.executor.settings.output_dir

        def emit(event: ev.Event) -> None:
            if isinstance(event, ev.JobFinished):
                return  # sent below, once the job is recorded, with its final status
            message = event.to_json()
            if isinstance(event, ev.NodeFinished):
                message["files"] = [output_name(f, output_dir) for f in event.files]
            self.publish(job.client_id, message)

        try:
            result = self.executor.run(job.workflow, emit, token, job_id=job.id)
            status, record = _record(result, output_dir)
        except Exception as exc:  # a bug in the executor must not kill the worker or lose the job
            log.exception("job %s failed unexpectedly", job.id)
            status, record = "error", {"nodes": {}, "files": [], "errors": [
                {"node_id": None, "input": None, "code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}]}
        if status == "interrupted" and self._stopping:
            status = "error"
            record["errors"].append({"node_id": None, "input": None, "code": SHUTDOWN_CODE,
                                     "message": SHUTDOWN_MESSAGE})
        return status, record


def _record(result: RunResult, output_dir: Path) -> tuple[str, dict[str, Any]]:
    """What the store keeps of a run: per-node results with their files, all files, errors."""
    data = result.to_json()
    for node_id, node in data["nodes"].items():
        node["files"] = [output_name(f, output_dir) for f in result.nodes[node_id].files]
    data["files"] = [output_name(f, output_dir) for f in result.files]
    status = "error" if result.status == "invalid" else data.pop("status")
    data.pop("status", None)
    return status, data
