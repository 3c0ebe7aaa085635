"""Node modes, as the editor's Bypass and Mute set them: lowered out of a workflow before validation.

    {"type": "LoadLoRA", "inputs": {...}, "mode": "bypass"}   # passes its input through
    {"type": "SaveImage", "inputs": {...}, "mode": "mute"}    # left out of the run

A muted node is removed, and so are the links into other nodes from it (a required input left
without its link is reported on that node, naming the muted node). A bypassed node is removed too,
and each link from one of its outputs goes instead to the node's first input of the same type
(followed through chains of bypassed nodes); without one, the link is dropped like a muted one.
The executor and the cache only ever see the lowered graph; the workflow as written is kept for
SaveImage's embedded copy.
"""

from __future__ import annotations

from typing import Any

from nodegraph.registry import Registry
from nodegraph.schema import describe
from nodegraph.workflow import is_link

MODES = ("bypass", "mute")
_DROP = object()


class Lowered:
    """The nodes without the muted and bypassed ones, what was dropped, and the modes that are wrong."""

    def __init__(self) -> None:
        self.nodes: dict[str, Any] = {}
        self.dropped: dict[tuple[str, str], str] = {}  # (node id, input) -> why its link went
        self.bad: list[tuple[str, str]] = []  # (node id, message) for a mode that is not one of MODES


def lower_modes(nodes: dict[str, Any], registry: Registry) -> Lowered:
    result = Lowered()
    modes: dict[str, str] = {}
    for node_id, entry in nodes.items():
        mode = entry.get("mode") if isinstance(entry, dict) else None
        if mode is None:
            continue
        if mode not in MODES:
            result.bad.append((node_id, f"'mode' must be one of {', '.join(MODES)} (or left out), "
                                        f"got {describe(mode)}"))
            continue
        modes[node_id] = mode
    if not modes:
        result.nodes = nodes
        return result
    for node_id, entry in nodes.items():
        if node_id in modes:
            continue
        inputs = entry.get("inputs") if isinstance(entry, dict) else None
        if not isinstance(inputs, dict) or not any(is_link(v) and v[0] in modes for v in inputs.values()):
            result.nodes[node_id] = entry
            continue
        rewritten: dict[str, Any] = {}
        for name, value in inputs.items():
            new = _resolve(value, nodes, modes, registry, set()) if is_link(value) else value
            if new is _DROP:
                result.dropped[(node_id, name)] = f"node {value[0]}, which is {_past(modes[value[0]])}"
            else:
                rewritten[name] = new
        result.nodes[node_id] = {**entry, "inputs": rewritten}
    return result


def _past(mode: str) -> str:
    return "muted" if mode == "mute" else "bypassed and has no input of that type"


def _resolve(link: list[Any], nodes: dict[str, Any], modes: dict[str, str], registry: Registry,
             seen: set[str]) -> Any:
    """What a link into an active node becomes: itself, the bypassed node's matching input, or _DROP."""
    source_id, output = link
    mode = modes.get(source_id) if isinstance(source_id, str) else None
    if mode is None:
        return link
    if mode == "mute" or source_id in seen:
        return _DROP
    entry = nodes[source_id]
    cls = registry.get(entry.get("type"))
    if cls is None:
        return _DROP
    outputs = cls.outputs
    if isinstance(output, int) and not isinstance(output, bool):
        found = outputs[output] if 0 <= output < len(outputs) else None
    else:
        found = next((o for o in outputs if o.name == output), None)
    if found is None:
        return _DROP
    inputs = entry.get("inputs") if isinstance(entry.get("inputs"), dict) else {}
    for spec in cls.inputs:
        if spec.type == found.type and spec.name in inputs:
            value = inputs[spec.name]
            return _resolve(value, nodes, modes, registry, seen | {source_id}) if is_link(value) else value
    return _DROP
