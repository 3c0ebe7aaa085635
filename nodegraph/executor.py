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
from nodegraph.schema import Input, Node, not_a_choice
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
        steps, settings, models, workflow = graph.steps, self.settings, self.models, graph.workflow
        get, put, records, cached_event = self.cache.get, self.cache.put, result.nodes, ev.NodeCached
        started_event, finished_event, clock = ev.NodeStarted, ev.NodeFinished, time.perf_counter
        for node_id in order:
            if cancel.cancelled:
                emit(ev.Interrupted(job_id, node_id))
                result.status = "interrupted"
                break
            step = steps[node_id]
            cls = step.cls
            prefix, links, reads_files, combos = keying[node_id]
            linked = [f"{name}={keys[source]}/{output}" for name, source, output in links]
            if reads_files:
                try:
                    files = cls.files(_inputs(step, values), settings)
                    key = keys[node_id] = keyed(prefix, linked, files)
                except Exception as exc:  # a node's files() that failed (a model file gone missing)
                    self._fail(result, step, emit, exc, started)
                    break
            else:  # `keyed` inlined: one hash per node
                text = prefix + "\x00" + "\x00".join(linked) if linked else prefix
                key = keys[node_id] = sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            entry = get(key)
            if entry is not None:
                emit(cached_event(job_id, node_id, cls.type))
                values[node_id] = entry.outputs
                records[node_id] = NodeRecord(cls.type, "cached", 0.0, entry.outputs, entry.files)
                continue
            inputs = dict(step.literals)
            for name, source, output in links:
                inputs[name] = values[source][output]
            emit(started_event(job_id, node_id, cls.type))
            ctx = Context(job_id, node_id, settings, models, emit, cancel, workflow=workflow,
                          free_memory=self.free_memory)
            t0 = clock()
            try:
                if combos:
                    _check_linked_choices(combos, inputs, settings)
                outputs = _checked_outputs(cls, cls().run(ctx, **inputs))
            except Interrupted:
                emit(ev.Interrupted(job_id, node_id))
                records[node_id] = NodeRecord(cls.type, "interrupted", clock() - t0)
                result.status = "interrupted"
                break
            except Exception as exc:
                self._fail(result, step, emit, exc, started, clock() - t0)
                break
            seconds = clock() - t0
            entry = Entry(outputs, tuple(ctx.files), tuple(ctx.needs))
            put(key, entry)
            values[node_id] = outputs
            records[node_id] = NodeRecord(cls.type, "ran", seconds, outputs, entry.files)
            emit(finished_event(job_id, node_id, cls.type, seconds, list(entry.files)))
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


Keying = tuple[str, list[tuple[str, str, str]], bool, tuple[Input, ...]]


def _keying(graph: Graph) -> dict[str, Keying]:
    """Per step, what running it needs that the step alone fixes, computed once per graph: its cache key's prefix
    (type, version, literals), its links sorted by input name as (input, source, output), whether it reads files,
    and its linked COMBO inputs (checked once their values exist)."""
    if graph.keying is None:
        shared: dict[tuple[Any, ...], str] = {}
        classes: dict[type[Node], tuple[bool, tuple[Input, ...], frozenset[str]]] = {}
        keying: dict[str, Keying] = {}
        for node_id, step in graph.steps.items():
            cls, links = step.cls, step.links
            known = classes.get(cls)
            if known is None:
                combos = tuple(s for s in cls.inputs if s.type == "COMBO")
                known = classes[cls] = (_reads_files(cls), combos, frozenset(s.name for s in combos))
            reads_files, combos, combo_names = known
            # A STRING output may feed a COMBO; its value can only be checked once it exists.
            linked_combos = () if combo_names.isdisjoint(links) else tuple(s for s in combos if s.name in links)
            keying[node_id] = (_prefix(step, shared), [(name, *links[name]) for name in sorted(links)], reads_files,
                               linked_combos)
        graph.keying = keying
    return graph.keying  # type: ignore[no-any-return]


_PLAIN = frozenset((str, int, float, bool, type(None)))


def _prefix(step: Step, shared: dict[tuple[Any, ...], str]) -> str:
    """The step's key prefix (`key_prefix`: type, version and the literals' canonical JSON), made once per distinct
    class and plain literals in a graph (a chain of 10,000 Math nodes has one): steps of one class whose literals
    have the same names, types and values share it. Float zeros are left out (0.0 == -0.0, but their JSON
    differs), as is anything but str, int, float, bool and None."""
    cls, literals = step.cls, step.literals
    if not literals:
        return key_prefix(cls.type, cls.version, "{}")
    values = literals.values()
    types = tuple(map(type, values))
    if not _PLAIN.issuperset(types) or (float in types and 0.0 in values):
        return key_prefix(cls.type, cls.version, step.literals_json)
    signature = (cls, *literals, *types, *values)
    prefix = shared.get(signature)
    if prefix is None:
        prefix = shared[signature] = key_prefix(cls.type, cls.version, step.literals_json)
    return prefix


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


def _check_linked_choices(combos: tuple[Input, ...], inputs: dict[str, Any], settings: Settings) -> None:
    for spec in combos:
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
