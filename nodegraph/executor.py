"""Plan and run a workflow: validation, cache look-ups, events, cancellation.

The executor is one small state machine per job: validate → plan (the output nodes and their
ancestors, in dependency order) → for each node: cancelled? cached? run → finish. A node that
raises ends the job with an error event naming it; only nodes that finished are cached.
The cache lives as long as the executor, so a server keeps one executor across jobs.
"""

from __future__ import annotations

import math
import time
import traceback
import uuid
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

from nodegraph import events as ev
from nodegraph.cache import Entry, OutputCache, key_prefix, keyed
from nodegraph.context import CancelToken, Context, Interrupted, NodeFailure
from nodegraph.models import ModelManager
from nodegraph.registry import Registry
from nodegraph.schema import Node, not_a_choice
from nodegraph.settings import Settings
from nodegraph.validate import Graph, Problem, Step, validate


@dataclass
class NodeRecord:
    node_type: str
    status: str  # ran | cached | error | interrupted
    seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    files: tuple[str, ...] = ()


@dataclass
class RunResult:
    job_id: str
    status: str  # ok | error | interrupted | invalid
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    errors: list[Problem] = field(default_factory=list)
    output_nodes: list[str] = field(default_factory=list)
    traceback: str | None = None  # of an unexpected exception inside a node, for --debug

    @property
    def files(self) -> list[str]:
        return [f for record in self.nodes.values() for f in record.files]

    def to_json(self) -> dict[str, Any]:
        """The run as JSON (job records, `nodegraph run --json`): output nodes' outputs in full, as
        `json_summary` writes them; other nodes' outputs in brief (`brief_summary`), so a record stays small."""
        shown = set(self.output_nodes)
        return {
            "status": self.status,
            "nodes": {node_id: {"type": r.node_type, "status": r.status, "seconds": round(r.seconds, 6),
                                "outputs": {k: (json_summary if node_id in shown else brief_summary)(v)
                                            for k, v in r.outputs.items()}}
                      for node_id, r in self.nodes.items()},
            "files": self.files,
            "errors": [p.to_json() for p in self.errors],
        }


class Executor:
    def __init__(self, registry: Registry, settings: Settings | None = None,
                 cache: OutputCache | None = None, models: Any = None) -> None:
        self.registry = registry
        self.settings = settings or Settings()
        self.cache = cache if cache is not None else OutputCache()
        self.models = models if models is not None else ModelManager()

    def free_memory(self) -> None:
        """Release models not in use and every cached output (`POST /api/free`; out-of-memory retries)."""
        self.cache.clear()
        self.models.clear()

    def run(self, workflow: Any, emit: ev.EventSink = ev.ignore, cancel: CancelToken | None = None,
            job_id: str | None = None) -> RunResult:
        job_id = job_id or uuid.uuid4().hex
        graph, problems = validate(workflow, self.registry, self.settings, self.models)
        if graph is None:
            emit(ev.JobFinished(job_id, "invalid"))
            return RunResult(job_id, "invalid", errors=problems)
        return self.execute(graph, emit, cancel or CancelToken(), job_id)

    def execute(self, graph: Graph, emit: ev.EventSink, cancel: CancelToken, job_id: str) -> RunResult:
        started = time.perf_counter()
        order = plan(graph)
        emit(ev.JobStarted(job_id, order))
        result = RunResult(job_id, "ok", output_nodes=list(graph.outputs))
        values: dict[str, dict[str, Any]] = {}
        keys: dict[str, str] = {}
        keying = _keying(graph)
        get, records, cached_event = self.cache.get, result.nodes, ev.NodeCached
        for node_id in order:
            if cancel.cancelled:
                emit(ev.Interrupted(job_id, node_id))
                result.status = "interrupted"
                break
            step = graph.steps[node_id]
            prefix, links, reads_files = keying[node_id]
            linked = [f"{name}={keys[source]}/{output}" for name, source, output in links]
            if reads_files:
                try:
                    files = step.cls.files(_inputs(step, values), self.settings)
                    key = keys[node_id] = keyed(prefix, linked, files)
                except Exception as exc:  # a node's files() that failed (a model file gone missing)
                    self._fail(result, step, emit, exc, started)
                    break
            else:  # `keyed` inlined: the cached path's one hash per node
                text = prefix + "\x00" + "\x00".join(linked) if linked else prefix
                key = keys[node_id] = sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            entry = get(key)
            if entry is not None:
                emit(cached_event(job_id, node_id, step.cls.type))
                values[node_id] = entry.outputs
                records[node_id] = NodeRecord(step.cls.type, "cached", 0.0, entry.outputs, entry.files)
                continue
            inputs = _inputs(step, values)
            emit(ev.NodeStarted(job_id, node_id, step.cls.type))
            ctx = Context(job_id, node_id, self.settings, self.models, emit, cancel, workflow=graph.workflow,
                          free_memory=self.free_memory)
            t0 = time.perf_counter()
            try:
                _check_linked_choices(step, inputs, self.settings)
                outputs = _checked_outputs(step.cls, step.cls().run(ctx, **inputs))
            except Interrupted:
                emit(ev.Interrupted(job_id, node_id))
                result.nodes[node_id] = NodeRecord(step.cls.type, "interrupted", time.perf_counter() - t0)
                result.status = "interrupted"
                break
            except Exception as exc:
                self._fail(result, step, emit, exc, started, time.perf_counter() - t0)
                break
            seconds = time.perf_counter() - t0
            entry = Entry(outputs, tuple(ctx.files), tuple(ctx.needs))
            self.cache.put(key, entry)
            values[node_id] = outputs
            result.nodes[node_id] = NodeRecord(step.cls.type, "ran", seconds, outputs, entry.files)
            emit(ev.NodeFinished(job_id, node_id, step.cls.type, seconds, list(entry.files)))
        emit(ev.JobFinished(job_id, result.status, time.perf_counter() - started))
        return result

    @staticmethod
    def _fail(result: RunResult, step: Step, emit: ev.EventSink, exc: Exception, started: float,
              seconds: float = 0.0) -> None:
        if isinstance(exc, NodeFailure):
            problem = Problem(step.id, exc.input, exc.code, str(exc))
        else:
            problem = Problem(step.id, None, "exception", f"{type(exc).__name__}: {exc}")
            result.traceback = traceback.format_exc()
        emit(ev.NodeError(result.job_id, step.id, step.cls.type, problem.input, problem.code, problem.message))
        result.nodes[step.id] = NodeRecord(step.cls.type, "error", seconds)
        result.errors.append(problem)
        result.status = "error"


def plan(graph: Graph) -> list[str]:
    """The nodes the output nodes need, in dependency order (stable for a given workflow)."""
    if graph.plan is None:
        graph.plan = _needed_in_order(graph)
    return graph.plan


def _keying(graph: Graph) -> dict[str, tuple[str, list[tuple[str, str, str]], bool]]:
    """Per step, what its cache key needs that the step alone fixes, computed once per graph: the key's
    prefix (type, version, literals), its links sorted by input name, and whether it reads files."""
    if graph.keying is None:
        graph.keying = {node_id: (key_prefix(step.cls.type, step.cls.version, step.literals_json),
                                  [(name, *step.links[name]) for name in sorted(step.links)],
                                  _reads_files(step.cls))
                        for node_id, step in graph.steps.items()}
    keying: dict[str, tuple[str, list[tuple[str, str, str]], bool]] = graph.keying
    return keying


def _needed_in_order(graph: Graph) -> list[str]:
    needed = set(graph.outputs)
    stack = list(graph.outputs)
    while stack:
        for source, _ in graph.steps[stack.pop()].links.values():
            if source not in needed:
                needed.add(source)
                stack.append(source)
    return [node_id for node_id in graph.order if node_id in needed]


def _inputs(step: Step, values: dict[str, dict[str, Any]]) -> dict[str, Any]:
    inputs = dict(step.literals)
    for name, (source, output) in step.links.items():
        inputs[name] = values[source][output]
    return inputs


def _reads_files(cls: type[Node]) -> bool:
    return cls.files.__func__ is not Node.files.__func__  # type: ignore[attr-defined]


def _check_linked_choices(step: Step, inputs: dict[str, Any], settings: Settings) -> None:
    # A STRING output may feed a COMBO; its value can only be checked once it exists.
    for spec in step.cls.inputs:
        if spec.type == "COMBO" and spec.name in step.links:
            choices = spec.resolve_choices(settings)
            if inputs[spec.name] not in choices:
                raise NodeFailure(not_a_choice(inputs[spec.name], choices), spec.name, "not_a_choice")


def _checked_outputs(cls: type[Node], outputs: Any) -> dict[str, Any]:
    if not isinstance(outputs, dict):
        raise TypeError(f"{cls.type}.run() returned {type(outputs).__name__}, not a dict of outputs")
    missing = [o.name for o in cls.outputs if o.name not in outputs]
    if missing:
        raise TypeError(f"{cls.type}.run() did not return the outputs {missing}")
    return outputs


BRIEF_CHARS = 200  # the longest text a non-output node's output keeps in a record


def brief_summary(value: Any) -> Any:
    """`json_summary`, but texts and lists longer than a line are only described (what an intermediate
    node's record keeps: a 10,000-node chain of growing texts would otherwise record them all)."""
    if isinstance(value, str) and len(value) > BRIEF_CHARS:
        return {"$type": "str", "summary": f"{len(value):,} characters: {value[:40]}…"}
    if isinstance(value, (list, tuple)) and len(value) > 16:
        return {"$type": type(value).__name__, "summary": f"{len(value):,} items"}
    summary = json_summary(value)
    if isinstance(summary, dict) and len(str(summary.get("summary", ""))) > BRIEF_CHARS:
        summary["summary"] = str(summary["summary"])[:BRIEF_CHARS] + "…"
    return summary


def json_summary(value: Any) -> Any:
    """The value itself when JSON can represent it; otherwise a summary naming its type."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$type": "float", "repr": repr(value)}
    if isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (bool, int, float, str))
                                                for v in value):
        return [json_summary(v) for v in value]
    summary = getattr(value, "summary", None)
    return {"$type": type(value).__name__, **({"summary": summary()} if callable(summary) else {})}
