"""ComfyUI's editor (UI) format, both ways: its `nodes`/`links` files to our graph, and our graph to it.

    graph = to_graph(json.load(open("comfy_default.json")), registry.get)   # run or edit it here
    ui, prompt = to_ui(graph, registry.get), to_api(graph, registry.get)    # what SaveImage embeds

A UI file holds nodes (`id`, `type`, `pos`, `size`, `mode`, `inputs` with a link id each, `outputs`,
`widgets_values`) and `links` (`[id, origin_id, origin_slot, target_id, target_slot, type]`, or objects
with those names in version 1). `widgets_values` lists the node's widget inputs in the order its schema
declares them (ComfyUI's order), with one extra value, the seed's "control after generate", after an INT
input named `seed` or `noise_seed`. A widget turned into an input that has a link takes the link.
Virtual nodes become what they stand for: a `Reroute` is followed to what feeds it, a `PrimitiveNode`'s
value (and that of ComfyUI's `PrimitiveInt`, `PrimitiveFloat`, … nodes) is written into each input it feeds,
`Note`/`MarkdownNote` are dropped. Modes: 4 (bypass) and
2 (mute) become our `mode`; a node whose required input comes from a muted node is muted too (ComfyUI
leaves out the outputs that need a muted node). Subgraphs (`definitions.subgraphs`, nested too) are
inlined: an instance's nodes join the graph as `<instance id>:<inner id>`, its links through the
subgraph's inputs (origin -10) and outputs (`outputs[i].linkIds`) joined up. A type the catalog lacks
keeps its links and is left for validation to report (`unknown_node_type`, naming the node).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nodegraph.schema import LITERAL_TYPES, Input, Node
from nodegraph.workflow import FORMAT, WorkflowError, is_link

Lookup = Callable[[object], "type[Node] | None"]
SEED_NAMES = ("seed", "noise_seed")
CONTROL = "control_after_generate"
NOTES = frozenset({"Note", "MarkdownNote"})
# ComfyUI's primitive nodes (a value, its widget): written into what they feed unless a pack here has the type.
PRIMITIVES = ("PrimitiveInt", "PrimitiveFloat", "PrimitiveString", "PrimitiveStringMultiline", "PrimitiveBoolean")
MODES = {2: "mute", 4: "bypass"}
UI_MODES = {"mute": 2, "bypass": 4}
_NODE_WIDTH, _SLOT_HEIGHT = 315, 26


def is_comfy_ui(value: Any) -> bool:
    """ComfyUI's editor format: a `nodes` list beside `links`."""
    return isinstance(value, dict) and isinstance(value.get("nodes"), list) and "links" in value


def widgets(cls: type[Node]) -> list[Input]:
    """The inputs ComfyUI shows as widgets, in order: those of the literal types that take a literal."""
    return [spec for spec in cls.inputs if spec.type in LITERAL_TYPES and spec.accepts != "link"]


def has_control(spec: Input) -> bool:
    return spec.type == "INT" and spec.name in SEED_NAMES


# --- UI format → our graph ---------------------------------------------------------------------------

SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = "-10", "-20"  # the ids a subgraph's links use for its own inputs and outputs
MAX_NESTING = 16


class _Scope:
    """One graph's nodes and links: the file's top level, or a subgraph's inside one instance of it."""

    def __init__(self, graph: dict[str, Any], definitions: dict[str, dict[str, Any]], constants: frozenset[str],
                 prefix: str = "", parent: _Scope | None = None, instance: dict[str, Any] | None = None) -> None:
        self.prefix, self.parent, self.instance, self.definitions = prefix, parent, instance, definitions
        self.constants = constants  # the types whose first widget value is written into what they feed
        self.depth: int = parent.depth + 1 if parent is not None else 0
        if self.depth > MAX_NESTING:
            raise WorkflowError(f"subgraphs nested deeper than {MAX_NESTING} levels (one inside itself?)",
                                "invalid_shape", prefix.rstrip(":"))
        nodes = graph.get("nodes")
        if not isinstance(nodes, list):
            raise WorkflowError(f"{self.where}'nodes' must be a list", "invalid_shape")
        self.by_id: dict[str, dict[str, Any]] = {}
        for index, node in enumerate(nodes):
            if not isinstance(node, dict) or not isinstance(node.get("id"), (int, str)) or isinstance(node["id"], bool):
                raise WorkflowError(f"{self.where}nodes/{index}: a UI-format node is an object with an 'id'",
                                    "invalid_node")
            node_id = str(node["id"])
            if not isinstance(node.get("type"), str):
                raise WorkflowError(f"node {prefix + node_id!r} has no string 'type'", "invalid_node", prefix + node_id)
            self.by_id[node_id] = node
        self.links = _links(graph.get("links"), self.where)
        self.graph = graph

    @property
    def where(self) -> str:
        return f"subgraph of node {self.prefix.rstrip(':')!r}: " if self.prefix else ""

    def inner(self, node_id: str, node: dict[str, Any]) -> _Scope:
        return _Scope(self.definitions[node["type"]], self.definitions, self.constants, f"{self.prefix}{node_id}:",
                      self, node)


def to_graph(ui: dict[str, Any], lookup: Lookup) -> dict[str, Any]:
    """Our nodegraph/1 workflow from a ComfyUI UI-format file; a WorkflowError for a malformed one.

    Subgraphs are inlined: the nodes inside an instance `5` get ids `5:1`, `5:2`, … (as ComfyUI runs them).
    """
    definitions: dict[str, dict[str, Any]] = {}
    found = ui.get("definitions")
    for sub in _list(found.get("subgraphs") if isinstance(found, dict) else None):
        if isinstance(sub, dict) and isinstance(sub.get("id"), str):
            definitions[sub["id"]] = sub
    nodes: dict[str, Any] = {}
    constants = frozenset({"PrimitiveNode", *(t for t in PRIMITIVES if lookup(t) is None)})
    _add_nodes(_Scope(ui, definitions, constants), nodes, lookup, None)
    _mute_dependents(nodes, lookup)
    groups = [{key: g[key] for key in ("title", "color", "bounding") if key in g}
              for g in _list(ui.get("groups")) if isinstance(g, dict)]
    return {"format": FORMAT, "nodes": nodes, "ui": {"groups": groups} if groups else {}}


def _add_nodes(scope: _Scope, nodes: dict[str, Any], lookup: Lookup, mode: str | None) -> None:
    for node_id, node in scope.by_id.items():
        if node["type"] in NOTES or node["type"] == "Reroute" or node["type"] in scope.constants:
            continue
        own = _mode(node)
        if node["type"] in scope.definitions:  # an instance: its nodes take its mode
            _add_nodes(scope.inner(node_id, node), nodes, lookup, mode or own)
            continue
        entry = _node(node_id, node, scope, lookup)
        if mode is not None:
            entry["mode"] = mode
        nodes[scope.prefix + node_id] = entry


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _mode(node: dict[str, Any]) -> str | None:
    mode = node.get("mode")
    return MODES.get(mode) if isinstance(mode, int) else None


def _links(raw: Any, where: str = "") -> dict[Any, tuple[str, int]]:
    """Link id → (origin node id, origin slot); both the list form and version 1's objects."""
    if not isinstance(raw, list):
        raise WorkflowError(f"{where}'links' must be a list", "invalid_shape")
    found: dict[Any, tuple[str, int]] = {}
    for index, link in enumerate(raw):
        if isinstance(link, list) and len(link) >= 5:
            link_id, origin, slot = link[0], link[1], link[2]
        elif isinstance(link, dict):
            link_id, origin, slot = link.get("id"), link.get("origin_id"), link.get("origin_slot")
        else:
            raise WorkflowError(f"{where}links/{index}: a link is [id, origin, slot, target, slot, type]", "bad_link")
        if not isinstance(slot, int) or isinstance(slot, bool) or origin is None \
                or not isinstance(link_id, (int, str)) or isinstance(link_id, bool):
            raise WorkflowError(f"{where}links/{index}: its id, origin node or slot is missing", "bad_link")
        found[link_id] = (str(origin), slot)
    return found


_NONE = object()


def _source(link_id: Any, scope: _Scope, seen: frozenset[str] = frozenset()) -> Any:
    """What an input linked by `link_id` gets: a link `[id, slot]`, a Primitive's value, or _NONE.

    Followed through Reroutes, into a subgraph instance to what feeds its output, and out of a subgraph
    to what feeds the instance's input.
    """
    if not isinstance(link_id, (int, str)) or link_id not in scope.links:
        return _NONE
    origin, slot = scope.links[link_id]
    if origin == SUBGRAPH_INPUT and scope.parent is not None and scope.instance is not None:
        return _source(_instance_input_link(scope, slot), scope.parent, seen)
    node = scope.by_id.get(origin)
    key = scope.prefix + origin
    if node is None or key in seen:
        return [key, slot]  # a link to a node that is not there: validation names it
    if node["type"] in scope.definitions:
        inner = scope.inner(origin, node)
        outputs = inner.graph.get("outputs")
        output = outputs[slot] if isinstance(outputs, list) and 0 <= slot < len(outputs) else None
        link_ids = output.get("linkIds") if isinstance(output, dict) else None
        return _source(link_ids[0], inner, seen | {key}) if isinstance(link_ids, list) and link_ids else _NONE
    if node["type"] == "Reroute":
        inputs = node.get("inputs") or [{}]
        first = inputs[0] if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict) else {}
        return _source(first.get("link"), scope, seen | {key})
    if node["type"] in scope.constants:
        values = node.get("widgets_values")
        return values[0] if isinstance(values, list) and values else _NONE
    if node["type"] in NOTES:
        return _NONE
    return [key, slot]


def _instance_input_link(scope: _Scope, index: int) -> Any:
    """The link into the instance's input that is the subgraph's input `index` (matched by name, else place)."""
    assert scope.instance is not None
    declared = scope.graph.get("inputs")
    name = declared[index].get("name") if isinstance(declared, list) and 0 <= index < len(declared) \
        and isinstance(declared[index], dict) else None
    slots = [s for s in _list(scope.instance.get("inputs")) if isinstance(s, dict)]
    named = [s for s in slots if s.get("name") == name]
    chosen = named[0] if named else slots[index] if 0 <= index < len(slots) else {}
    return chosen.get("link")


def _node(node_id: str, node: dict[str, Any], scope: _Scope, lookup: Lookup) -> dict[str, Any]:
    cls = lookup(node["type"])
    inputs: dict[str, Any] = {}
    ui: dict[str, Any] = {}
    values = node.get("widgets_values")
    if cls is not None and isinstance(values, dict):  # some nodes save their widgets by name
        inputs.update({spec.name: values[spec.name] for spec in widgets(cls) if spec.name in values})
    elif cls is not None and isinstance(values, list):
        at = 0
        for spec in widgets(cls):
            if at >= len(values):
                break
            inputs[spec.name] = values[at]
            at += 1
            if has_control(spec) and at < len(values) and isinstance(values[at], str):
                if values[at] != "fixed":
                    ui[CONTROL] = values[at]
                at += 1
    elif values not in (None, []):
        ui["widgets_values"] = values  # an unknown type's: kept, since their names are not known
    for slot in _list(node.get("inputs")):
        if not isinstance(slot, dict):
            continue
        widget = slot.get("widget")
        name = widget.get("name") if isinstance(widget, dict) else slot.get("name")
        value = _source(slot.get("link"), scope)
        if isinstance(name, str) and value is not _NONE:
            inputs[name] = value
    entry: dict[str, Any] = {"type": node["type"], "inputs": inputs}
    if isinstance(node.get("title"), str):
        entry["title"] = node["title"]
    if _mode(node) is not None:
        entry["mode"] = _mode(node)
    for key in ("pos", "size"):
        shape = node.get(key)
        if isinstance(shape, dict):  # an older file's {"0": x, "1": y}
            shape = [shape.get("0"), shape.get("1")]
        if isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, (int, float)) for v in shape):
            ui[key] = list(shape)
    if ui:
        entry["ui"] = ui
    return entry


def _mute_dependents(nodes: dict[str, Any], lookup: Lookup) -> None:
    """Mute each node a required input of which comes from a muted node, until none is left."""
    changed = True
    while changed:
        changed = False
        for entry in nodes.values():
            cls = lookup(entry["type"])
            if cls is None or entry.get("mode") == "mute":
                continue
            required = {spec.name for spec in cls.inputs if spec.required}
            if any(is_link(value) and name in required and nodes.get(str(value[0]), {}).get("mode") == "mute"
                   for name, value in entry["inputs"].items()):
                entry["mode"], changed = "mute", True


# --- our graph → ComfyUI's formats -------------------------------------------------------------------

def to_api(graph: dict[str, Any], lookup: Lookup) -> dict[str, Any]:
    """ComfyUI's API format (its `prompt`): each node's type as `class_type`, its inputs, links by output index.

    As ComfyUI's own prompts, it has no muted or bypassed nodes: a link from a bypassed node goes to what
    that node's first input of the same type is fed (the UI-format copy beside it keeps the modes).
    """
    nodes = _nodes(graph)
    prompt: dict[str, Any] = {}
    for node_id, entry in nodes.items():
        if entry.get("mode") in UI_MODES:
            continue
        inputs: dict[str, Any] = {}
        for name, value in (entry.get("inputs") or {}).items():
            value = _through(value, nodes, lookup, set()) if is_link(value) else value
            if value is not _NONE:
                inputs[name] = value
        node: dict[str, Any] = {"class_type": entry.get("type"), "inputs": inputs}
        if isinstance(entry.get("title"), str):
            node["_meta"] = {"title": entry["title"]}
        prompt[node_id] = node
    return prompt


def _through(link: list[Any], nodes: dict[str, Any], lookup: Lookup, seen: set[str]) -> Any:
    """A link as ComfyUI's API format has it: `[id, index]`, past bypassed nodes; _NONE past a muted one."""
    source = str(link[0])
    entry = nodes.get(source)
    cls = lookup(entry.get("type")) if entry is not None else None
    index = _output_index(cls, link[1])
    if entry is None or entry.get("mode") not in UI_MODES:
        return [source, index]
    if entry.get("mode") == "mute" or cls is None or source in seen or not 0 <= index < len(cls.outputs):
        return _NONE
    seen.add(source)
    wanted = cls.outputs[index].type
    inputs = entry.get("inputs") or {}
    for spec in cls.inputs:
        if spec.type == wanted and spec.name in inputs:
            value = inputs[spec.name]
            return _through(value, nodes, lookup, seen) if is_link(value) else value
    return _NONE


def to_ui(graph: dict[str, Any], lookup: Lookup) -> dict[str, Any]:
    """A minimal ComfyUI UI-format file of our graph, which ComfyUI's editor opens with its nodes.

    Node ids become integers (ComfyUI's editor wants numbers; ids that are not get the next free ones).
    """
    nodes = _nodes(graph)
    numbers = _numbers(list(nodes))
    links: list[list[Any]] = []
    out_links: dict[tuple[str, int], list[int]] = {}
    ui_nodes: list[dict[str, Any]] = []
    for order, (node_id, entry) in enumerate(nodes.items()):
        cls = lookup(entry.get("type"))
        inputs = entry.get("inputs") if isinstance(entry.get("inputs"), dict) else {}
        if cls is not None:
            specs, widget_specs = list(cls.inputs), widgets(cls)
        else:  # a type this catalog lacks: its inputs in the order written, literals as widgets
            specs = [Input(name, "*", mode="link" if is_link(v) else "literal") for name, v in inputs.items()]
            widget_specs = [spec for spec in specs if spec.accepts == "literal"]
        slots: list[dict[str, Any]] = []
        for spec in specs:
            value = inputs.get(spec.name)
            if spec in widget_specs and not is_link(value):
                continue
            slot: dict[str, Any] = {"name": spec.name, "type": spec.type, "link": None}
            if spec in widget_specs:
                slot["widget"] = {"name": spec.name}
            if isinstance(value, list) and is_link(value) and str(value[0]) in nodes:
                link_id = len(links) + 1
                source = str(value[0])
                slot_index = _output_index(lookup(nodes[source].get("type")), value[1])
                links.append([link_id, numbers[source], slot_index, numbers[node_id], len(slots), spec.type])
                out_links.setdefault((source, slot_index), []).append(link_id)
                slot["link"] = link_id
            slots.append(slot)
        values: list[Any] = []
        for spec in widget_specs:
            value = inputs.get(spec.name, None if spec.required else spec.default)
            values.append(None if is_link(value) else value)
            if has_control(spec):
                ui = entry.get("ui") if isinstance(entry.get("ui"), dict) else {}
                values.append(ui.get(CONTROL, "fixed"))
        ui_data = entry.get("ui") if isinstance(entry.get("ui"), dict) else {}
        node: dict[str, Any] = {
            "id": numbers[node_id], "type": entry.get("type"),
            "pos": ui_data.get("pos", [40 + 340 * order, 40]),
            "size": ui_data.get("size", [_NODE_WIDTH, 60 + _SLOT_HEIGHT * (len(slots) + len(values))]),
            "flags": {}, "order": order, "mode": UI_MODES.get(str(entry.get("mode")), 0),
            "inputs": slots, "outputs": [], "properties": {"Node name for S&R": entry.get("type")},
            "widgets_values": values,
        }
        if isinstance(entry.get("title"), str):
            node["title"] = entry["title"]
        ui_nodes.append(node)
    link_types = {(str(link[1]), link[2]): link[5] for link in links}
    for node, node_id in zip(ui_nodes, nodes, strict=True):
        cls = lookup(nodes[node_id].get("type"))
        if cls is not None:
            outputs = [(o.name, o.type) for o in cls.outputs]
        else:  # an unknown type's outputs, as far as links show them
            used = [slot for source, slot in out_links if source == node_id]
            kinds = (link_types.get((str(node["id"]), i), "*") for i in range(max(used, default=-1) + 1))
            outputs = [(kind, kind) for kind in kinds]
        node["outputs"] = [{"name": name, "type": kind, "links": out_links.get((node_id, i), []), "slot_index": i}
                           for i, (name, kind) in enumerate(outputs)]
    top: dict[str, Any] = graph["ui"] if isinstance(graph.get("ui"), dict) else {}
    groups = top.get("groups") if isinstance(top.get("groups"), list) else []
    return {"last_node_id": max(numbers.values(), default=0), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": groups, "config": {}, "extra": {}, "version": 0.4}


def _nodes(graph: dict[str, Any]) -> dict[str, Any]:
    nodes = graph.get("nodes") if isinstance(graph, dict) else None
    return {str(k): v for k, v in nodes.items() if isinstance(v, dict)} if isinstance(nodes, dict) else {}


def _numbers(ids: list[str]) -> dict[str, int]:
    taken = {int(i) for i in ids if i.isdigit() and len(i) < 10}
    numbers: dict[str, int] = {}
    spare = max(taken, default=0)
    for node_id in ids:
        if node_id.isdigit() and len(node_id) < 10:
            numbers[node_id] = int(node_id)
        else:
            spare += 1
            numbers[node_id] = spare
    return numbers


def _output_index(cls: type[Node] | None, output: Any) -> int:
    if isinstance(output, int) and not isinstance(output, bool):
        return output
    names = [o.name for o in cls.outputs] if cls is not None else []
    return names.index(output) if output in names else 0
