"""Node registration and discovery.

A node pack is a Python module (or package) with a `NODES` list of `Node` subclasses, and optionally a
`WARM_UP` function that `nodegraph serve` runs once on its worker thread as it starts, while the server
already answers (the imports its first job would otherwise wait for). Packs come
from the `nodegraph.nodes` entry-point group (the built-in `nodes/` package registers itself there)
and from extra folders (`--nodes-dir`), where every `*.py` file and every package is a pack.
Each declaration is checked once, here, and a bad one fails loudly with the class and the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from nodegraph.schema import ANY, LITERAL_TYPES, REQUIRED, Input, Node, check_literal

ENTRY_POINT_GROUP = "nodegraph.nodes"
_TYPE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_SOCKET_TYPE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
log = logging.getLogger("nodegraph.registry")


class DeclarationError(Exception):
    """A node class or node pack that cannot be registered."""


class Registry:
    def __init__(self, nodes: Iterable[type[Node]] = ()) -> None:
        self.nodes: dict[str, type[Node]] = {}
        self.origin: dict[str, str] = {}
        self.warm_ups: list[tuple[str, Callable[[], object]]] = []
        for node in nodes:
            self.register(node)

    def register(self, node: type[Node], origin: str = "") -> type[Node]:
        problems = declaration_problems(node)
        name = getattr(node, "type", None)
        if not problems and name in self.nodes and self.nodes[name] is not node:
            problems.append(f"type name {name!r} is already registered by {self.origin[name]}")
        if problems:
            where = f"{getattr(node, '__module__', '?')}.{getattr(node, '__qualname__', node)!s}"
            raise DeclarationError(f"node class {where}: " + "; ".join(problems))
        self.nodes[node.type] = node
        self.origin[node.type] = origin or node.__module__
        return node

    def register_pack(self, module: ModuleType, origin: str) -> None:
        nodes = getattr(module, "NODES", None)
        if not isinstance(nodes, (list, tuple)):
            raise DeclarationError(f"node pack {origin}: it must define NODES, a list of Node classes")
        warm_up = getattr(module, "WARM_UP", None)
        if warm_up is not None and not callable(warm_up):
            raise DeclarationError(f"node pack {origin}: WARM_UP must be a function taking no arguments")
        for node in nodes:
            self.register(node, origin)
        if warm_up is not None:
            self.warm_ups.append((origin, warm_up))

    def warm_up(self) -> None:
        """Run every pack's WARM_UP in turn. One that fails is logged and skipped: the job that needs what it
        prepares meets the same error, reported as that job's."""
        for origin, hook in self.warm_ups:
            try:
                hook()
            except Exception:
                log.warning("warm-up of node pack %s failed", origin, exc_info=True)

    def get(self, type_name: object) -> type[Node] | None:
        return self.nodes.get(type_name) if isinstance(type_name, str) else None

    def catalog(self, settings: Any = None) -> dict[str, Any]:
        """The schema the editor reads: every node with its inputs, outputs and current choices."""
        return {"nodes": {name: node.schema(settings) for name, node in sorted(self.nodes.items())}}


def declaration_problems(node: Any) -> list[str]:
    """Everything wrong with a node declaration; empty when it can be registered."""
    if not (isinstance(node, type) and issubclass(node, Node)):
        return [f"{node!r} is not a subclass of nodegraph.schema.Node"]
    problems = []
    name, version = getattr(node, "type", None), getattr(node, "version", None)
    if not isinstance(name, str) or not _TYPE_NAME.match(name):
        problems.append(f"type must be a name like 'LoadLoRA', got {name!r}")
    if not isinstance(version, str) or not _SEMVER.match(version):
        problems.append(f"version must be semver like '1.0.0', got {version!r}")
    if not isinstance(node.category, str) or not isinstance(node.description, str):
        problems.append("category and description must be strings")
    if node.run is Node.run:
        problems.append("it does not implement run()")
    if not node.output_node and not node.outputs:
        problems.append("a node with no outputs must be an output node")
    for kind, specs in (("input", node.inputs), ("output", node.outputs)):
        names = [getattr(s, "name", None) for s in specs]
        for spec_name in {n for n in names if names.count(n) > 1}:
            problems.append(f"{kind} {spec_name!r} is declared twice")
        for spec in specs:
            if not isinstance(getattr(spec, "name", None), str) or not spec.name.isidentifier():
                problems.append(f"{kind} name must be an identifier, got {getattr(spec, 'name', spec)!r}")
            elif spec.type != ANY and not _SOCKET_TYPE.match(spec.type):
                problems.append(f"{kind} {spec.name!r}: type must be upper case like 'MODEL', got {spec.type!r}")
    for spec in node.inputs:
        if isinstance(spec, Input) and isinstance(spec.name, str):
            problems.extend(f"input {spec.name!r}: {p}" for p in input_problems(spec))
    return problems


def input_problems(spec: Input) -> list[str]:
    problems = []
    literal_type = spec.type in LITERAL_TYPES or spec.type == ANY
    if spec.mode not in (None, "literal", "link", "either"):
        problems.append(f"mode must be literal, link or either, got {spec.mode!r}")
    if not literal_type and spec.mode in ("literal", "either"):
        problems.append(f"{spec.type} values cannot be written as literals")
    if not literal_type and spec.default is not REQUIRED:
        problems.append(f"{spec.type} inputs cannot have a default")
    if spec.type == "COMBO" and spec.choices is None:
        problems.append("a COMBO needs choices")
    if spec.type != "COMBO" and spec.choices is not None:
        problems.append("only a COMBO has choices")
    if spec.min is not None and spec.max is not None and spec.min > spec.max:
        problems.append(f"min {spec.min} is above max {spec.max}")
    if spec.default is not REQUIRED and literal_type and not callable(spec.choices):
        wrong = check_literal(spec, spec.default, list(spec.choices or ()))
        if wrong:
            problems.append(f"default {spec.default!r}: {wrong[1]}")
    return problems


def load_registry(nodes_dirs: Sequence[Path] = (), entry_point_group: str = ENTRY_POINT_GROUP) -> Registry:
    """The built-in pack and installed packs (entry points), then the packs in `nodes_dirs`."""
    registry = Registry()
    for ep in sorted(entry_points(group=entry_point_group), key=lambda ep: ep.name != "builtin"):
        try:
            module = ep.load()
        except Exception as exc:
            raise DeclarationError(f"node pack {ep.name} ({ep.value}) failed to import: {exc}") from exc
        registry.register_pack(module, f"entry point {ep.name}")
    for folder in nodes_dirs:
        for module, origin in _folder_packs(Path(folder)):
            registry.register_pack(module, origin)
    return registry


def _folder_packs(folder: Path) -> Iterable[tuple[ModuleType, str]]:
    if not folder.is_dir():
        raise DeclarationError(f"nodes folder {folder} does not exist")
    for path in sorted(folder.iterdir()):
        if path.name.startswith((".", "_")):
            continue
        if path.is_dir() and (path / "__init__.py").is_file():
            path = path / "__init__.py"
        elif path.suffix != ".py":
            continue
        yield _import_file(path), str(path)


def _import_file(path: Path) -> ModuleType:
    # A stable, unique module name per file, so two folders may both hold a `nodes.py`.
    name = "nodegraph_pack_" + re.sub(r"\W", "_", str(path.resolve().parent if path.name == "__init__.py"
                                                       else path.resolve().with_suffix("")))
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(path.parent)] if path.name == "__init__.py" else None)
    if spec is None or spec.loader is None:
        raise DeclarationError(f"node pack {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise DeclarationError(f"node pack {path} failed to import: {type(exc).__name__}: {exc}") from exc
    return module
