"""The server's side of a Ray pool: it routes the store's jobs to worker actors and records what they did.

`RayPool` stands in for the one-process `Worker` (same methods: start, stop, wake, cancel, free,
workers), so the API, the store and the websocket events are those of one process. The store stays
the single source of truth: a dispatcher thread claims pending jobs for idle workers as the router
says (`router.AffinityRouter`), one thread per worker streams its job's events from the actor to
the websockets and records the result, then publishes `job_finished`.

Faults: a worker whose process dies mid-job (Ray raises `RayActorError`) has its job put back in
the queue, in its old place, once (a `job_requeued` message says so); a second death marks the job
`error` (`worker_died`). A job running past `job_timeout` seconds gets its worker killed, and is
marked `error` (`job_timeout`). Ray restarts the actor; its worker takes jobs again once it is up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from nodegraph.registry import Registry
from nodegraph.scale.router import AffinityRouter, Candidate, ModelFile, Router, WorkerView, affinity
from nodegraph.server.worker import Publish
from nodegraph.store import SHUTDOWN_CODE, SHUTDOWN_MESSAGE, Job, Store

log = logging.getLogger("nodegraph.server")
TICK = 0.25  # seconds between checks for jobs past their time limit
RESTART_WAIT = 600.0  # how long a restarting worker may take to come back before it counts as dead
STATUS_WAIT = 5.0
STOP_GRACE = 10.0  # seconds a running job has to stop at shutdown before its worker is killed


@dataclass
class Slot:
    """One worker actor as the pool sees it."""

    index: int
    actor: Any
    view: WorkerView
    state: str = "idle"  # idle | running | restarting | dead
    job: Job | None = None
    started: float = 0.0
    timed_out: bool = False
    cancelled: bool = False
    restarts: int = 0
    waiting: int = 0  # pending jobs (within the router's look-ahead) that prefer this worker
    inbox: queue.Queue[Job | None] = field(default_factory=queue.Queue)


class RayPool:
    def __init__(self, store: Store, publish: Publish, actors: list[Any], registry: Registry,
                 router: Router | None = None, job_timeout: float | None = None, owns_actors: bool = False,
                 lookahead: int = 8) -> None:
        self.store, self.publish, self.registry = store, publish, registry
        self.router = router or AffinityRouter(lookahead=lookahead)
        self.job_timeout, self.owns_actors, self.lookahead = job_timeout, owns_actors, lookahead
        self.slots = [Slot(i, actor, WorkerView(i)) for i, actor in enumerate(actors)]
        self._lock = threading.Lock()  # claiming vs cancelling, and the slots' state
        self._wake = threading.Event()
        self._stopping = False
        self._deaths: Counter[str] = Counter()  # job id -> worker deaths while running it
        self._affinity: dict[str, frozenset[ModelFile]] = {}  # pending job id -> the model files it names
        self._threads = [threading.Thread(target=self._dispatch, name="nodegraph-dispatch", daemon=True)]
        self._threads += [threading.Thread(target=self._serve, args=(slot,), name=f"nodegraph-worker-{slot.index}",
                                           daemon=True) for slot in self.slots]

    # The Worker interface (nodegraph.server.worker)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Interrupt the running jobs (recorded as cut off by the shutdown) and wait for the threads."""
        self._stopping = True
        with self._lock:
            for slot in self.slots:
                if slot.job is not None:
                    slot.actor.cancel.remote(slot.job.id)
        self._wake.set()
        for slot in self.slots:
            slot.inbox.put(None)
        for thread in self._threads:
            thread.join(STOP_GRACE)
        for slot, thread in zip(self.slots, self._threads[1:], strict=True):
            if thread.is_alive():  # a job that does not stop (a hung node): its worker goes, it is recorded
                ray.kill(slot.actor, no_restart=self.owns_actors)
                thread.join()
        if self.owns_actors:
            for slot in self.slots:
                ray.kill(slot.actor, no_restart=True)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> str | None:
        """'cancelled' (it was pending), 'interrupting' (it is running), or None (neither)."""
        with self._lock:
            if self.store.cancel(job_id):
                return "cancelled"
            for slot in self.slots:
                if slot.job is not None and slot.job.id == job_id:
                    slot.cancelled = True
                    slot.actor.cancel.remote(job_id)
                    return "interrupting"
        return None

    def free(self) -> bool:
        """Every worker frees its models and cache now if idle (True when all did), else after its job."""
        live = [slot for slot in self.slots if slot.state != "dead"]
        refs = [slot.actor.free.remote() for slot in live]
        freed = []
        for ref in refs:
            try:
                freed.append(ray.get(ref, timeout=STATUS_WAIT))
            except RayActorError:
                freed.append(True)  # restarting: it comes back with nothing loaded
            except RayError:
                freed.append(False)  # it did not answer in time: its flag may still be set
        with self._lock:
            for slot in live:
                slot.view.warm.clear()
        return all(freed)

    def workers(self) -> list[dict[str, Any]]:
        """Each worker's state, job, what the router takes it to hold, and the actor's own status."""
        refs = [slot.actor.status.remote() if slot.state in ("idle", "running") else None for slot in self.slots]
        listed = []
        for slot, ref in zip(self.slots, refs, strict=True):
            with self._lock:
                entry: dict[str, Any] = {
                    "index": slot.index, "state": slot.state, "job_id": slot.job.id if slot.job else None,
                    "waiting": slot.waiting, "restarts": slot.restarts, "warm": [list(m) for m in slot.view.warm]}
            try:
                entry.update(ray.get(ref, timeout=STATUS_WAIT) if ref is not None else {})
            except RayError as exc:  # restarting, busy past the wait, or a failure in the actor
                entry["unavailable"] = type(exc).__name__
            listed.append(entry)
        return listed

    # The dispatcher: pending jobs to idle workers

    def _dispatch(self) -> None:
        while not self._stopping:
            self._wake.wait(TICK)
            self._wake.clear()  # before reading the queue: a job queued after that sets it again
            try:
                self._check_time_limits()
                with self._lock:
                    if self._stopping:
                        return
                    if any(slot.state == "idle" for slot in self.slots):
                        self._assign()
            except Exception:  # the dispatcher must outlive a failed round (a store or Ray error)
                log.exception("dispatching jobs failed; trying again")

    def _assign(self) -> None:
        now = time.time()
        jobs = self.store.pending(self.lookahead)
        known, self._affinity = self._affinity, {}
        for pending in jobs:  # computed once per job, forgotten once it leaves the look-ahead
            self._affinity[pending.id] = known.get(pending.id) or affinity(pending.workflow, self.registry)
        candidates = [Candidate(j.id, self._affinity[j.id], now - j.created, j.client_id) for j in jobs]
        live = [slot.view for slot in self.slots if slot.state != "dead"]
        for slot in self.slots:
            slot.view.busy = slot.state != "idle"
        for job_id, index in self.router.assign(candidates, live):
            job = self.store.claim(job_id)
            if job is None:
                continue
            slot = self.slots[index]
            slot.state, slot.job, slot.started = "running", job, time.monotonic()
            slot.timed_out = slot.cancelled = False
            del self._affinity[job_id]
            log.info("job %s started on worker %d", job.id, index)
            slot.inbox.put(job)
        for slot in self.slots:
            slot.view.busy = slot.state != "idle"
            slot.waiting = 0
        preferred = getattr(self.router, "preferred", None)
        if preferred is not None:
            for candidate in candidates:
                if candidate.job_id in self._affinity:  # still pending
                    for index in preferred(candidate, live):
                        self.slots[index].waiting += 1

    def _check_time_limits(self) -> None:
        if self.job_timeout is None:
            return
        with self._lock:
            for slot in self.slots:
                if (slot.state == "running" and not slot.timed_out
                        and time.monotonic() - slot.started > self.job_timeout):
                    slot.timed_out = True
                    log.warning("worker %d: job %s ran past %.0f s; restarting the worker", slot.index,
                                slot.job.id if slot.job else "-", self.job_timeout)
                    ray.kill(slot.actor, no_restart=False)

    # One thread per worker: run its job, stream the events, record the end

    def _serve(self, slot: Slot) -> None:
        while (job := slot.inbox.get()) is not None:
            started = time.monotonic()
            try:
                outcome = self._run(slot, job)
                if outcome is not None:
                    status, record = outcome
                    self.store.finish(job.id, status, record)
                    self._deaths.pop(job.id, None)
                    log.info("job %s finished on worker %d: %s in %.2f s", job.id, slot.index, status,
                             time.monotonic() - started)
                    self.publish(job.client_id, {"type": "job_finished", "job_id": job.id, "status": status,
                                                 "files": record["files"], "errors": record["errors"]})
            except Exception:  # a bug here must not stop this worker from taking jobs
                log.exception("worker %d: recording job %s failed", slot.index, job.id)
            with self._lock:
                slot.job = None
                if slot.state == "running":
                    slot.state = "idle"
            self._wake.set()

    def _run(self, slot: Slot, job: Job) -> tuple[str, dict[str, Any]] | None:
        """The job's status and record; None when it went back to the queue."""
        result: dict[str, Any] = {}
        try:
            for ref in slot.actor.run.remote(job.id, job.workflow):
                message = ray.get(ref)
                if message["type"] == "result":
                    result = message
                else:
                    self.publish(job.client_id, message)
            self._trim(slot)
        except RayActorError as exc:
            return self._died(slot, job, exc)
        except RayError as exc:  # a failure in the actor outside the executor: the job fails, the worker stays
            log.exception("job %s failed on worker %d", job.id, slot.index)
            return _failed("internal_error", f"{type(exc).__name__}: {str(exc)[:500]}")
        status, record = result["status"], result["record"]
        if status == "interrupted" and self._stopping:
            status = "error"
            record["errors"].append(_problem(SHUTDOWN_CODE, SHUTDOWN_MESSAGE))
        return status, record

    def _died(self, slot: Slot, job: Job, exc: RayActorError) -> tuple[str, dict[str, Any]] | None:
        with self._lock:
            slot.state, slot.restarts, slot.job = "restarting", slot.restarts + 1, None
            slot.view.warm.clear()
        self._deaths[job.id] += 1
        deaths = self._deaths[job.id]
        log.warning("worker %d died running job %s (%s)", slot.index, job.id, type(exc).__name__)
        outcome: tuple[str, dict[str, Any]] | None
        if slot.timed_out:
            outcome = _failed("job_timeout", f"the job ran past the time limit of {self.job_timeout:g} s; "
                                             f"worker {slot.index} was restarted")
        elif self._stopping:
            outcome = _failed(SHUTDOWN_CODE, SHUTDOWN_MESSAGE)
        elif deaths >= 2:
            outcome = _failed("worker_died", f"the worker running this job died {deaths} times (the last was "
                                             f"worker {slot.index}); it is not run again")
        elif slot.cancelled:
            outcome = ("interrupted", {"nodes": {}, "files": [], "errors": []})
        else:
            outcome = None
            self.store.requeue(job.id)
            self.publish(job.client_id, {"type": "job_requeued", "job_id": job.id,
                                         "reason": f"worker {slot.index} died; the job runs again"})
        self._await_restart(slot)
        return outcome

    def _await_restart(self, slot: Slot) -> None:
        deadline = time.monotonic() + RESTART_WAIT
        while not self._stopping and time.monotonic() < deadline:
            try:
                ray.get(slot.actor.ready.remote(), timeout=5)
            except (RayActorError, GetTimeoutError):
                time.sleep(0.2)
                continue
            with self._lock:
                slot.state = "running"  # set idle by the caller, once the job is recorded
            return
        with self._lock:
            slot.state = "dead" if not self._stopping else slot.state

    def _trim(self, slot: Slot) -> None:
        """After a job: the router keeps as many warm models as the worker has residents."""
        try:
            status = ray.get(slot.actor.status.remote(), timeout=STATUS_WAIT)
        except RayError:
            return
        with self._lock:
            slot.view.trim(len(status["models"]["residents"]))


def _problem(code: str, message: str) -> dict[str, Any]:
    return {"node_id": None, "input": None, "code": code, "message": message}


def _failed(code: str, message: str) -> tuple[str, dict[str, Any]]:
    return "error", {"nodes": {}, "files": [], "errors": [_problem(code, message)]}
