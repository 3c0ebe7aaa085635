"""Validation: every problem in a workflow at once, as structured errors, before anything runs.

`validate()` returns the executable `Graph` (links resolved to output names, defaults filled in)
or the list of `Problem`s. Each problem has the node id, the input name where there is one, a
stable code (documented in the README) and a human message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from nodegraph.cache import canonical_json
from nodegraph.comfy_ui_format import is_comfy_ui, to_graph
from nodegraph.modes import lower_modes
from nodegraph.registry import Registry
from nodegraph.schema import (
    REQUIRED,
    Input,
    Node,
    Output,
    Upstream,
    check_literal,
    describe,
    link_compatible,
    not_a_choice,
    suggest,
)
from nodegraph.workflow import FORMAT, WorkflowError, is_link

MAX_SHOWN = 100  # problems reported per workflow; a 10,000-node mess need not print 10,000 lines


@dataclass(frozen=True)
class Problem:
    node_id: str | None
    input: str | None
    code: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"node {self.node_id}" if self.node_id is not None else "workflow"
        if self.input:
            where += f", input {self.input!r}"
        return f"{where}: {self.message} [{self.code}]"


@dataclass
class Step:
    """One node ready to run: its class, literal values and links `input -> (node_id, output)`."""

    id: str
    cls: type[Node]
    literals: dict[str, Any]
    links: dict[str, tuple[str, str]]

    @cached_property
    def literals_json(self) -> str:
        """The literals' canonical JSON, for the cache keys: made once, when the executor first keys the step
        (a job's graph is validated again when it runs, so the check at queueing time skips it)."""
        return canonical_json(self.literals)


@dataclass
class Graph:
    steps: dict[str, Step]
    outputs: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # a dependency order of every step
    plan: list[str] | None = None  # what the outputs need, in order; the executor fills it once
    keying: Any = None  # the executor's per-step cache-key parts, filled once (nodegraph/executor.py)
    workflow: dict[str, Any] = field(default_factory=dict, repr=False)  # as written, for SaveImage

    @cached_property
    def dag(self) -> Any:
        """The steps as a networkx.DiGraph, edges from producer to consumer, built on first use."""
        import networkx as nx  # only here: validation itself walks plain dicts (see `_order`)

        dag = nx.DiGraph()
        dag.add_nodes_from(self.steps)
        dag.add_edges_from((src, step.id) for step in self.steps.values() for src, _ in step.links.values()
                           if src in self.steps)
        return dag


def validate(workflow: Any, registry: Registry, settings: Any = None,
             models: Any = None) -> tuple[Graph | None, list[Problem]]:
    """The graph, or every problem; with a model manager, literal sizes too large for its budgets too."""
    problems: list[Problem] = []
    if is_comfy_ui(workflow):  # ComfyUI's editor format, not converted where it was read
        try:
            workflow = to_graph(workflow, registry.get)
        except WorkflowError as exc:
            return None, [Problem(exc.node_id, exc.input, exc.code, str(exc))]
    nodes = _check_shape(workflow, problems)
    if nodes is None:
        return None, problems
    lowered = lower_modes(nodes, registry)  # muted and bypassed nodes leave the graph here
    problems.extend(Problem(node_id, None, "invalid_mode", message) for node_id, message in lowered.bad)
    nodes = lowered.nodes
    choices: dict[int, list[str]] = {}
    steps: dict[str, Step] = {}
    for node_id, entry in nodes.items():
        step = _check_node(node_id, entry, nodes, registry, settings, models, choices, problems)
        if step is not None:
            steps[node_id] = step
    order, consumers = _order(steps)
    for cycle in _cycles(steps, order, consumers):
        problems.append(Problem(cycle[0], None, "cycle", "these nodes form a cycle: " + " → ".join(cycle)))
    outputs = [node_id for node_id, step in steps.items() if step.cls.output_node]
    if not outputs and not _declares_output(nodes, registry) and not any(
            p.code == "unknown_node_type" for p in problems):
        problems.append(Problem(None, None, "no_output_node",
                                "the workflow has no output node (Show, SaveImage, …), so nothing would run"))
    if problems:
        return None, [_why_missing(p, lowered.dropped) for p in problems[:MAX_SHOWN]]
    return Graph(steps, outputs, order=order, workflow=workflow), []


def _order(steps: dict[str, Step]) -> tuple[list[str], dict[str, dict[str, None]]]:
    """A dependency order of the steps (those on or after a cycle left out), and each step's consumers.

    The order is networkx's `topological_sort` of the same graph, generation by generation: the steps
    nothing feeds in the workflow's order, then those they complete in the order their links were written.
    """
    consumers: dict[str, dict[str, None]] = {node_id: {} for node_id in steps}
    waiting: dict[str, int] = {}  # step -> its distinct producers not yet ordered
    for node_id, step in steps.items():
        for source, _ in step.links.values():
            if source in consumers and node_id not in consumers[source]:
                consumers[source][node_id] = None
                waiting[node_id] = waiting.get(node_id, 0) + 1
    order = [node_id for node_id in steps if node_id not in waiting]
    for node_id in order:  # grows as it goes: the generations one after another
        for consumer in consumers[node_id]:
            left = waiting[consumer] - 1
            waiting[consumer] = left
            if not left:
                order.append(consumer)
    return order, consumers


def _cycles(steps: dict[str, Step], order: list[str], consumers: dict[str, dict[str, None]]) -> list[list[str]]:
    """The cycles, each as its sorted node ids, sorted. Only steps `_order` could not place can be on one."""
    if len(order) == len(steps):
        return []
    import networkx as nx  # a workflow with a cycle is rare: its strongly connected parts come from networkx

    placed = set(order)
    rest = nx.DiGraph()
    rest.add_nodes_from(node_id for node_id in steps if node_id not in placed)
    rest.add_edges_from((source, consumer) for source in rest for consumer in consumers[source]
                        if consumer not in placed)
    return sorted(sorted(c) for c in nx.strongly_connected_components(rest)
                  if len(c) > 1 or rest.has_edge(next(iter(c)), next(iter(c))))


def _why_missing(problem: Problem, dropped: dict[tuple[str, str], str]) -> Problem:
    """A required input whose link went with a muted or bypassed node says so."""
    why = dropped.get((problem.node_id or "", problem.input or ""))
    if why is None or problem.code != "missing_input":
        return problem
    return Problem(problem.node_id, problem.input, "missing_input", f"{problem.message}: its link came from {why}")


def _declares_output(nodes: dict[str, Any], registry: Registry) -> bool:
    return any(isinstance(e, dict) and getattr(registry.get(e.get("type")), "output_node", False)
               for e in nodes.values())


def _check_shape(workflow: Any, problems: list[Problem]) -> dict[str, Any] | None:
    def fail(code: str, message: str) -> None:
        problems.append(Problem(None, None, code, message))

    if not isinstance(workflow, dict):
        fail("invalid_shape", f"a workflow is a JSON object, got {describe(workflow)}")
        return None
    if workflow.get("format") != FORMAT:
        fail("unknown_format", f"'format' must be {FORMAT!r}, got {describe(workflow.get('format'))}")
    nodes = workflow.get("nodes")
    if not isinstance(nodes, dict):
        fail("invalid_shape", f"'nodes' must be an object of nodes keyed by id, got {describe(nodes)}")
        return None
    return nodes


def _check_node(node_id: str, entry: Any, nodes: dict[str, Any], registry: Registry, settings: Any,
                models: Any, choices: dict[int, list[str]], problems: list[Problem]) -> Step | None:
    if not node_id:
        _fail(problems, node_id, None, "invalid_node", "a node id must be a non-empty string")
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        _fail(problems, node_id, None, "invalid_node", "a node is an object with a string 'type'")
        return None
    cls = registry.get(entry["type"])
    if cls is None:
        _fail(problems, node_id, None, "unknown_node_type", f"unknown node type {describe(entry['type'])}"
              + suggest(entry["type"], registry.nodes))
        return None
    given = entry.get("inputs", {})
    if not isinstance(given, dict):
        _fail(problems, node_id, None, "invalid_node", f"'inputs' must be an object, got {describe(given)}")
        return None
    shape = _shape(cls)
    specs = shape.specs
    before = len(problems)
    for name in given:
        if name in specs:
            continue
        if name in cls.renamed_inputs:
            new, why = cls.renamed_inputs[name]
            _fail(problems, node_id, name, "unknown_input", f"{cls.type}'s input {name!r} is now {new!r} ({why}): "
                  f"rename {name!r} to {new!r} in the workflow")
        else:
            _fail(problems, node_id, name, "unknown_input",
                  f"{cls.type} has no input {describe(name)}" + suggest(name, specs))
    literals: dict[str, Any] = {}
    links: dict[str, tuple[str, str]] = {}
    for name, spec, required, accepts in shape.fields:
        if name not in given:
            if required:
                _fail(problems, node_id, name, "missing_input", f"{cls.type} needs {name!r} ({spec.type})")
            elif spec.default is not REQUIRED:
                literals[name] = spec.default
            continue
        value = given[name]
        constant = _constant(value, nodes, registry) if spec.type == "COMBO" and is_link(value) else value
        if spec.type == "COMBO" and id(spec) not in choices and not is_link(constant):
            choices[id(spec)] = spec.resolve_choices(settings)  # once per spec; not for a link it cannot see through
        if is_link(value):
            link = _check_link(spec, accepts, value, nodes, registry, node_id, problems)
            if link is not None:
                links[name] = link
                if isinstance(constant, str) and constant not in choices[id(spec)]:  # a primitive's value
                    code, message = _not_a_choice(spec, constant, choices[id(spec)], given, nodes, settings)
                    _fail(problems, node_id, name, code, f"from node {value[0]}: {message}")
        elif accepts == "link":
            _fail(problems, node_id, name, "link_required", f"{name!r} must be connected to a {spec.type} output, "
                  f"not written as {describe(value)}")
        else:
            wrong = check_literal(spec, value, choices.get(id(spec), ()))
            if wrong and wrong[0] == "not_a_choice":
                wrong = _not_a_choice(spec, value, choices[id(spec)], given, nodes, settings)
            if wrong:
                _fail(problems, node_id, name, *wrong)
            else:
                literals[name] = value
    # The node's own checks see the literals that passed, so every problem of a node shows at once.
    # (Those a class does not override return nothing: they are not called.)
    if shape.checks:
        reported = {p.input for p in problems[before:]}
        for input_name, message in cls.check(literals, settings):
            if input_name is None or input_name not in reported:
                _fail(problems, node_id, input_name, "invalid_value", message)
    if shape.checks_upstream:
        reported = {p.input for p in problems[before:]}
        for input_name, code, message in cls.check_upstream(literals, _upstream(given, nodes), settings):
            if input_name is None or input_name not in reported:
                _fail(problems, node_id, input_name, code, message)
    if shape.checks_resources and models is not None:
        reported = {p.input for p in problems[before:]}
        for input_name, message in cls.check_resources(literals, models):
            if input_name is None or input_name not in reported:
                _fail(problems, node_id, input_name, "too_large", message)
    return Step(node_id, cls, literals, links) if len(problems) == before else None


def _upstream(given: dict[str, Any], nodes: dict[str, Any], depth: int = 0) -> Callable[[str], Upstream | None]:
    """The nodes linked to `given`'s inputs, as Upstream views (their literals as written), followed lazily."""

    def view(input_name: str) -> Upstream | None:
        value: Any = given.get(input_name)
        if depth > 256 or not is_link(value) or not isinstance(nodes.get(value[0]), dict):
            return None
        entry = nodes[value[0]]
        inputs = entry.get("inputs") if isinstance(entry.get("inputs"), dict) else {}
        literals = {k: v for k, v in inputs.items() if not is_link(v)}
        return Upstream(str(entry.get("type")), literals, _upstream(inputs, nodes, depth + 1))

    return view


@dataclass(frozen=True)
class _Shape:
    """What validation reads of a node class, worked out once per class."""

    specs: dict[str, Input]  # inputs by name
    fields: tuple[tuple[str, Input, bool, str], ...]  # (name, spec, required, accepts) per input, in order
    outputs: dict[str, Output]  # by name (the first of a name)
    checks: bool  # whether the class has its own `check`, `check_upstream`, `check_resources`
    checks_upstream: bool
    checks_resources: bool


_SHAPES: dict[type[Node], _Shape] = {}


def _shape(cls: type[Node]) -> _Shape:
    shape = _SHAPES.get(cls)
    if shape is None:
        specs = {spec.name: spec for spec in cls.inputs}
        outputs: dict[str, Output] = {}
        for output in cls.outputs:
            outputs.setdefault(output.name, output)
        shape = _SHAPES[cls] = _Shape(
            specs, tuple((name, spec, spec.required, spec.accepts) for name, spec in specs.items()), outputs,
            *(_overrides(cls, method) for method in ("check", "check_upstream", "check_resources")))
    return shape


def _overrides(cls: type[Node], method: str) -> bool:
    return getattr(getattr(cls, method), "__func__", None) is not getattr(Node, method).__func__


def _fail(problems: list[Problem], node_id: str, input_name: str | None, code: str, message: str) -> None:
    problems.append(Problem(node_id, input_name, code, message))


def _check_link(spec: Input, accepts: str, value: list[Any], nodes: dict[str, Any], registry: Registry,
                node_id: str, problems: list[Problem]) -> tuple[str, str] | None:
    source_id, output = value
    name = spec.name
    if accepts == "literal":
        _fail(problems, node_id, name, "literal_required", f"{name!r} must be written as a value, not connected")
        return None
    if not isinstance(source_id, str) or isinstance(output, bool) or not isinstance(output, (str, int)):
        _fail(problems, node_id, name, "bad_link",
              "a link is [node_id, output] with a string node id and an output name or index")
        return None
    source = nodes.get(source_id)
    if source is None:
        _fail(problems, node_id, name, "missing_node", f"linked to node {describe(source_id)}, which does not exist")
        return None
    source_cls = registry.get(source.get("type")) if isinstance(source, dict) else None
    if source_cls is None:
        return None  # the source node's own problem is reported on it
    outputs = source_cls.outputs
    if isinstance(output, int):
        found = outputs[output] if 0 <= output < len(outputs) else None
    else:
        found = _shape(source_cls).outputs.get(output)
    if found is None:
        names = ", ".join(f"{i}: {o.name}" for i, o in enumerate(outputs)) or "none"
        _fail(problems, node_id, name, "missing_output", f"node {source_id} ({source_cls.type}) has no output "
              f"{describe(output)}; its outputs are {names}")
        return None
    if not link_compatible(found.type, spec.type):
        _fail(problems, node_id, name, "type_mismatch", f"{name!r} takes {spec.type}, but node {source_id} output "
              f"{found.name!r} is {found.type}")
        return None
    return source_id, found.name


def _constant(link: list[Any], nodes: dict[str, Any], registry: Registry) -> Any:
    """The value a link carries when validation can see it (a primitive's literal, `Node.constant_input`), else the
    link itself."""
    source = nodes.get(link[0]) if isinstance(link[0], str) else None  # a bad link is reported by _check_link
    cls = registry.get(source.get("type")) if isinstance(source, dict) else None
    inputs = source.get("inputs") if isinstance(source, dict) else None
    if cls is None or cls.constant_input is None or not isinstance(inputs, dict):
        return link
    value = inputs.get(cls.constant_input, link)
    return link if is_link(value) else value


def _not_a_choice(spec: Input, value: str, choices: Sequence[str], given: dict[str, Any], nodes: dict[str, Any],
                  settings: Any) -> tuple[str, str]:
    """(code, message) for a value not among a COMBO's choices, one way for every input.

    For model files (`ModelChoices`): a name no file can have is `bad_name`; otherwise the closest name, the
    choices that fit the connected model first (the choices' `hint`, from the node pack), and where the files
    were looked for.
    """
    name_problem = getattr(spec.choices, "name_problem", None)
    problem = name_problem(value) if name_problem is not None else None
    if problem is not None:
        return "bad_name", problem
    format_problem = getattr(spec.choices, "format_problem", None)
    problem = format_problem(value) if format_problem is not None else None
    if problem is not None:
        return "unsafe_format", problem
    hint = getattr(spec.choices, "hint", None)
    found = hint(settings, _upstream(given, nodes)) if hint is not None else None
    message = not_a_choice(value, choices, *found) if found is not None else not_a_choice(value, choices)
    where = getattr(spec.choices, "searched", None)
    return "not_a_choice", message + (f" (looked in {where(settings)})" if where is not None else "")
