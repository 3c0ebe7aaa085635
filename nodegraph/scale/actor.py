"""One worker of a Ray pool: a process with its own executor, output cache and model manager.

`cluster.spawn` wraps `WorkerActor` in `ray.remote` (one GPU each, or `--worker-cpus` CPUs) and
the server's pool (`pool.RayPool`) calls it. `run` is a streaming generator: it yields each event
of the job as a websocket message, as the executor emits it, then one `{"type": "result"}` message
with the job's status and the record the store keeps. The actor is threaded, so `cancel`, `free`
and `status` answer while a job runs. Files are written straight into the server's output folder
(the same path on every machine: one machine, or a shared mount).
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nodegraph import events as ev
from nodegraph.context import CancelToken
from nodegraph.executor import Executor
from nodegraph.models import ModelManager
from nodegraph.registry import load_registry
from nodegraph.server.worker import _record, output_name
from nodegraph.settings import Settings

DONE = object()


class WorkerActor:
    def __init__(self, settings: Settings, nodes_dirs: list[Path], models: dict[str, Any]) -> None:
        self.executor = Executor(load_registry(nodes_dirs), settings, models=ModelManager(**models))
        self._busy = threading.Lock()  # held while a job runs; `free` frees between jobs
        self._free_requested = False
        self._current: tuple[str, CancelToken] | None = None
        self._cancelled: set[str] = set()  # cancels that arrived before their job (calls are not ordered)
        self.jobs = 0
        self.loads = 0  # models loaded from disk (`load` infos), over this process's life
        self.load_seconds = 0.0
        self.switches = 0  # LoRA switches and strength changes on a resident model (`reconcile` infos)
        self.reconcile_seconds = 0.0
        self.executor.models.status()  # resolves the device (imports torch) now, not in the first status call

    def ready(self) -> int:
        """The process id, once constructed (a restarted actor answers when it is up again)."""
        return os.getpid()

    def run(self, job_id: str, workflow: Any) -> Iterator[dict[str, Any]]:
        messages: queue.Queue[Any] = queue.Queue()
        output_dir = self.executor.settings.output_dir

        def emit(event: ev.Event) -> None:
            if isinstance(event, ev.NodeInfo):
                self._count(event)
            if isinstance(event, ev.JobFinished):
                return  # the server sends it once the job is recorded
            message = event.to_json()
            if isinstance(event, ev.NodeFinished):
                message["files"] = [output_name(f, output_dir) for f in event.files]
            messages.put(message)

        def work() -> None:
            try:
                with self._busy:
                    if self._free_requested:
                        self._free()
                    try:
                        result = self.executor.run(workflow, emit, token, job_id=job_id)
                        status, record = _record(result, output_dir)
                    except Exception as exc:  # a bug in the executor must not lose the job's record
                        status, record = "error", {"nodes": {}, "files": [], "errors": [
                            {"node_id": None, "input": None, "code": "internal_error",
                             "message": f"{type(exc).__name__}: {exc}"}]}
                    self.jobs += 1
                    if self._free_requested:
                        self._free()
                messages.put({"type": "result", "status": status, "record": record})
            finally:
                self._current = None
                messages.put(DONE)

        token = CancelToken()
        if job_id in self._cancelled:
            token.cancel()
        self._cancelled.clear()
        self._current = (job_id, token)
        threading.Thread(target=work, name=f"job-{job_id}", daemon=True).start()
        while (message := messages.get()) is not DONE:
            yield message

    def cancel(self, job_id: str) -> bool:
        current = self._current
        if current is not None and current[0] == job_id:
            current[1].cancel()
            return True
        self._cancelled.add(job_id)
        return False

    def free(self) -> bool:
        """Unload models and clear the output cache now if idle (True), else right after the running job."""
        if self._busy.acquire(blocking=False):
            try:
                self._free()
            finally:
                self._busy.release()
            return True
        self._free_requested = True
        return False

    def status(self) -> dict[str, Any]:
        cache = self.executor.cache
        return {"pid": os.getpid(), "host": socket.gethostname(), "jobs": self.jobs, "loads": self.loads,
                "load_seconds": round(self.load_seconds, 3), "switches": self.switches,
                "reconcile_seconds": round(self.reconcile_seconds, 3),
                "models": self.executor.models.status(),
                "cache": {"entries": len(cache), "bytes": cache.bytes, "max_bytes": cache.max_bytes}}

    def _free(self) -> None:
        self._free_requested = False
        self.executor.free_memory()

    def _count(self, info: ev.NodeInfo) -> None:
        if info.kind == "load":
            self.loads += 1
            self.load_seconds += info.seconds or 0.0
        elif info.kind == "reconcile":
            self.switches += 1
            self.reconcile_seconds += info.seconds or 0.0
