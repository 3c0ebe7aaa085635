"""Which idle worker runs which pending job: affinity routing by the model files a job reads.

A job's *affinity* is the set of model files its workflow names (every COMBO input whose choices
are model files: checkpoints, LoRAs, ControlNets ...), read from the registry's schemas, so the
runtime needs to know nothing about diffusion. A model other than a LoRA is qualified by the fixed
choices beside it on its node (LoadCheckpoint's dtype: `tiny-sd15 [fp16]`), since the same file
in another dtype is another resident. Each worker is *warm* for the files of the jobs it
ran lately. A job costs, on a worker, the load weight of the files it names that the worker is not
warm for (a checkpoint weighs far more than a LoRA switch); it prefers the workers where it costs
least. For each idle worker, the router scans the first `lookahead` pending jobs in queue order:

1. the first job that prefers this worker goes to it (sticky sessions: a client's job on the same
   recipe as its last one prefers that worker among equally cheap ones);
2. else the oldest job goes to it if it has waited `max_wait` seconds or more, or if its preferred
   workers are all busy with `max_backlog` jobs or more waiting for them: it loads its models here
   rather than wait behind a long queue;
3. else the worker stays idle: the job waits a moment for the worker that holds its models.

`RoundRobin` is the baseline the benchmark compares against: oldest job first, to the next idle
worker in turn, models ignored.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from nodegraph.registry import Registry
from nodegraph.settings import ModelChoices

ModelFile = tuple[str, str]  # (kind, name): ("checkpoints", "tiny-sd15")
WEIGHTS = {"checkpoints": 10, "loras": 1}  # relative cost of a miss; other model kinds weigh DEFAULT_WEIGHT
DEFAULT_WEIGHT = 5
WARM_LORAS = 8  # LoRA files a worker is taken to hold (its LoRA cache) after using them


def affinity(workflow: Any, registry: Registry) -> frozenset[ModelFile]:
    """The model files a (valid, stored) workflow names in its literal inputs."""
    found: set[ModelFile] = set()
    nodes = workflow.get("nodes", {}) if isinstance(workflow, dict) else {}
    for node in nodes.values():
        cls = registry.get(node.get("type", "")) if isinstance(node, dict) else None
        if cls is None:
            continue
        inputs = node.get("inputs", {})
        qualifiers = [str(inputs[s.name]) for s in cls.inputs
                      if s.type == "COMBO" and isinstance(s.choices, (list, tuple)) and s.name in inputs]
        for spec in cls.inputs:
            value = inputs.get(spec.name)
            if isinstance(spec.choices, ModelChoices) and isinstance(value, str):
                kind = spec.choices.kind
                found.add((kind, value if kind == "loras" or not qualifiers else f"{value} [{', '.join(qualifiers)}]"))
    return frozenset(found)


@dataclass(frozen=True)
class Candidate:
    """A pending job as the router sees it."""

    job_id: str
    models: frozenset[ModelFile]
    waited: float  # seconds since it was queued
    client_id: str | None = None


@dataclass
class WorkerView:
    """A worker as the router sees it: busy or not, and the model files it is warm for (oldest first)."""

    index: int
    busy: bool = False
    warm: OrderedDict[ModelFile, None] = field(default_factory=OrderedDict)

    def touch(self, models: frozenset[ModelFile], keep_models: int | None = None) -> None:
        """This worker is about to use `models`; keep the latest `keep_models` non-LoRA files."""
        for model in sorted(models):
            self.warm.pop(model, None)
            self.warm[model] = None
        self.trim(keep_models)

    def trim(self, keep_models: int | None) -> None:
        """Forget all but the latest WARM_LORAS LoRAs and (when given) the latest `keep_models` other files."""
        loras = [m for m in self.warm if m[0] == "loras"]
        others = [m for m in self.warm if m[0] != "loras"]
        drop = loras[: max(len(loras) - WARM_LORAS, 0)]
        if keep_models is not None:
            drop += others[: max(len(others) - keep_models, 0)]
        for model in drop:
            del self.warm[model]

    def cost(self, models: frozenset[ModelFile]) -> int:
        return sum(WEIGHTS.get(kind, DEFAULT_WEIGHT) for kind, name in models if (kind, name) not in self.warm)


class Router(Protocol):
    def assign(self, pending: Sequence[Candidate], workers: Sequence[WorkerView]) -> list[tuple[str, int]]:
        """(job id, worker index) for jobs to start now; each idle worker gets at most one."""


class AffinityRouter:
    def __init__(self, lookahead: int = 8, max_wait: float = 30.0, max_backlog: int = 3) -> None:
        self.lookahead, self.max_wait, self.max_backlog = lookahead, max_wait, max_backlog
        self.sticky: dict[tuple[str, frozenset[ModelFile]], int] = {}  # (client, recipe) -> last worker

    def assign(self, pending: Sequence[Candidate], workers: Sequence[WorkerView]) -> list[tuple[str, int]]:
        window = list(pending[: self.lookahead])
        busy = {w.index for w in workers if w.busy}
        chosen: list[tuple[str, int]] = []
        for worker in workers:
            if worker.busy or not window:
                continue
            job = next((j for j in window if worker.index in self.preferred(j, workers)), None)
            if job is None and self._spill(window, workers, busy):
                job = window[0]
            if job is None:
                continue
            window.remove(job)
            busy.add(worker.index)
            chosen.append((job.job_id, worker.index))
            if job.client_id is not None:
                self.sticky[(job.client_id, job.models)] = worker.index
            worker.touch(job.models)  # later jobs of this round see it warm (and busy, below)
            worker.busy = True
        return chosen

    def preferred(self, job: Candidate, workers: Sequence[WorkerView]) -> set[int]:
        """The workers where the job costs least; just the sticky one when it is among them."""
        costs = {w.index: w.cost(job.models) for w in workers}
        best = min(costs.values(), default=0)
        cheapest = {i for i, c in costs.items() if c == best}
        last = self.sticky.get((job.client_id, job.models)) if job.client_id is not None else None
        return {last} if last in cheapest else cheapest

    def _spill(self, window: list[Candidate], workers: Sequence[WorkerView], busy: set[int]) -> bool:
        oldest = window[0]
        if oldest.waited >= self.max_wait:
            return True
        targets = self.preferred(oldest, workers)
        if not targets <= busy:
            return False  # an idle worker it prefers will take it
        waiting = sum(1 for j in window if self.preferred(j, workers) & targets) + len(targets)
        return waiting >= self.max_backlog


class RoundRobin:
    """Oldest job first, to the next idle worker in turn; what the job needs is ignored."""

    def __init__(self) -> None:
        self.next = 0

    def assign(self, pending: Sequence[Candidate], workers: Sequence[WorkerView]) -> list[tuple[str, int]]:
        chosen: list[tuple[str, int]] = []
        jobs = list(pending)
        start = self.next
        for step in range(len(workers)):
            worker = workers[(start + step) % len(workers)]
            if worker.busy or not jobs:
                continue
            job = jobs.pop(0)
            chosen.append((job.job_id, worker.index))
            worker.touch(job.models)
            worker.busy = True
            self.next = (start + step + 1) % len(workers)
        return chosen
