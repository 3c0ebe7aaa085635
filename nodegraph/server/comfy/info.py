"""What ComfyUI's clients read about the server: `/object_info`, `/embeddings`, `/models`, `/system_stats`,
`/features`, the model library's `/experiment/models`, and `POST /free`.

`/object_info` is our registry's schemas in ComfyUI's shape: per node type `input.required` / `input.optional`
as `[type or list of choices, {default, min, max, step, multiline, tooltip, forceInput}]`, `input_order`,
`output`, `output_is_list`, `output_name`, `output_node`, `name`, `display_name`, `description`, `category` and
`python_module`. Choices (model files) are listed afresh on every request, off the event loop.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from nodegraph.registry import Registry
from nodegraph.schema import LITERAL_TYPES, REQUIRED, Input, Node
from nodegraph.server.comfy.queue import optional_body
from nodegraph.server.errors import ApiError
from nodegraph.server.state import CONFIG, EXECUTOR, WORKER
from nodegraph.settings import Settings

routes = web.RouteTableDef()
EMBEDDING_SUFFIXES = (".safetensors",)


def input_spec(spec: Input, settings: Settings) -> list[Any]:
    options: dict[str, Any] = {}
    if spec.default is not REQUIRED and spec.default is not None:
        options["default"] = spec.default
    for key in ("min", "max", "step"):
        if getattr(spec, key) is not None:
            options[key] = getattr(spec, key)
    if spec.type == "STRING":
        options["multiline"] = spec.multiline
    if spec.description:
        options["tooltip"] = spec.description
    if spec.accepts == "link" and spec.type in LITERAL_TYPES:
        options["forceInput"] = True
    kind: Any = spec.resolve_choices(settings) if spec.type == "COMBO" else spec.type
    return [kind, options]


def node_info(cls: type[Node], settings: Settings) -> dict[str, Any]:
    sections: dict[str, dict[str, Any]] = {"required": {}, "optional": {}}
    for spec in cls.inputs:
        sections["optional" if spec.optional else "required"][spec.name] = input_spec(spec, settings)
    inputs = {k: v for k, v in sections.items() if v or k == "required"}
    module = cls.__module__  # the built-in pack is ComfyUI's "nodes"; a pack of ours is a custom node's module
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
            "output": [o.type for o in cls.outputs], "output_is_list": [False for _ in cls.outputs],
            "output_name": [o.name for o in cls.outputs], "output_tooltips": [o.description for o in cls.outputs],
            "name": cls.type, "display_name": getattr(cls, "display_name", None) or cls.type,
            "description": cls.description, "category": cls.category,
            "python_module": "nodes" if module.split(".")[0] == "nodes" else f"custom_nodes.{module}",
            "output_node": cls.output_node, "deprecated": False, "experimental": False}


@routes.get("/object_info")
async def object_info(request: web.Request) -> web.Response:
    executor = request.app[EXECUTOR]
    registry, settings = executor.registry, executor.settings
    answer = await asyncio.to_thread(lambda: {name: node_info(cls, settings)
                                              for name, cls in sorted(registry.nodes.items())})
    return web.json_response(answer)


@routes.get("/object_info/{node_class}")
async def object_info_of(request: web.Request) -> web.Response:
    executor = request.app[EXECUTOR]
    cls = executor.registry.get(request.match_info["node_class"])
    if cls is None:
        return web.json_response({})  # as ComfyUI: an unknown class has no info
    info = await asyncio.to_thread(node_info, cls, executor.settings)
    return web.json_response({cls.type: info})


def model_folders(registry: Registry) -> list[str]:
    """The model folders the node types read (the `kind` of their model-file choices), sorted."""
    kinds = {getattr(spec.choices, "kind", None) for cls in registry.nodes.values() for spec in cls.inputs}
    return sorted(kind for kind in kinds if isinstance(kind, str))


@routes.get("/models")
async def models(request: web.Request) -> web.Response:
    return web.json_response(model_folders(request.app[EXECUTOR].registry))


@routes.get("/models/{folder}")
async def models_in(request: web.Request) -> web.Response:
    executor, folder = request.app[EXECUTOR], request.match_info["folder"]
    known = model_folders(executor.registry)
    if folder not in known:
        raise ApiError(404, "unknown_model_folder", f"no model folder {folder[:100]!r}; folders: {', '.join(known)}")
    files = await asyncio.to_thread(executor.settings.model_files, folder, folders=folder == "checkpoints")
    return web.json_response(files)


@routes.get("/experiment/models")
async def experiment_models(request: web.Request) -> web.Response:
    """The frontend's model library: each folder by name (ComfyUI lists its paths; answers here show none)."""
    return web.json_response([{"name": folder, "folders": [folder]}
                              for folder in model_folders(request.app[EXECUTOR].registry)])


@routes.get("/experiment/models/{folder}")
async def experiment_models_in(request: web.Request) -> web.Response:
    executor, folder = request.app[EXECUTOR], request.match_info["folder"]
    if folder not in model_folders(executor.registry):
        raise ApiError(404, "unknown_model_folder", f"no model folder {folder[:100]!r}")
    files = await asyncio.to_thread(executor.settings.model_files, folder, folders=folder == "checkpoints")
    return web.json_response([{"name": name, "pathIndex": 0} for name in files])


@routes.get("/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    settings = request.app[EXECUTOR].settings
    files = await asyncio.to_thread(settings.model_files, "embeddings", EMBEDDING_SUFFIXES)
    return web.json_response([os.path.splitext(name)[0] for name in files])


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _memory() -> tuple[int, int]:
    """(total, available) bytes of RAM; zeros where the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            found = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in file if line.split()[1:]}
        return found.get("MemTotal", 0), found.get("MemAvailable", found.get("MemFree", 0))
    except (OSError, ValueError, IndexError):
        return 0, 0


@routes.get("/system_stats")
async def system_stats(request: web.Request) -> web.Response:
    status = await asyncio.to_thread(request.app[EXECUTOR].models.status)
    total, free = await asyncio.to_thread(_memory)
    devices = []
    for kind, budget in status.get("budgets", {}).items():
        limit, used = int(budget.get("limit") or 0), int(budget.get("used") or 0)
        device = str(budget.get("device", "cpu"))
        devices.append({"name": device, "type": device.split(":")[0], "index": 0 if ":" not in device
                        else int(device.split(":")[1]) if device.split(":")[1].isdigit() else 0,
                        "vram_total": limit if kind == "vram" else total,
                        "vram_free": max(limit - used, 0) if kind == "vram" else free,
                        "torch_vram_total": limit if kind == "vram" else 0,
                        "torch_vram_free": max(limit - used, 0) if kind == "vram" else 0})
    nodegraph = _version("nodegraph")
    return web.json_response({
        "system": {"os": os.name, "python_version": sys.version, "embedded_python": False,
                   "comfyui_version": f"nodegraph {nodegraph}", "nodegraph_version": nodegraph,
                   "pytorch_version": _version("torch"), "required_frontend_version": "",
                   "installed_templates_version": "", "ram_total": total, "ram_free": free,
                   "argv": sys.argv, "platform": platform.platform()},
        "devices": devices})


@routes.get("/features")
async def features(request: web.Request) -> web.Response:
    return web.json_response({"supports_preview_metadata": False, "max_upload_size": request.app[CONFIG].max_body})


@routes.post("/free")
async def free(request: web.Request) -> web.Response:
    body = await optional_body(request)
    if body.get("unload_models") or body.get("free_memory"):
        await asyncio.to_thread(request.app[WORKER].free)  # while a job runs: right after it
    return web.json_response({})
