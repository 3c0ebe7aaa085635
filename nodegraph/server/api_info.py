"""What the editor reads about the system: nodes, models, validation, versions; and `/api/free`."""

from __future__ import annotations

import asyncio
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import aiohttp
from aiohttp import web

from nodegraph import model_listing
from nodegraph import workflow as wf
from nodegraph.server.errors import ApiError, json_object
from nodegraph.server.openapi import document
from nodegraph.server.state import EXECUTOR, STORE, WORKER
from nodegraph.validate import validate

routes = web.RouteTableDef()
MODEL_KINDS = ("checkpoints", "loras")


@routes.get("/api/nodes")
async def nodes(request: web.Request) -> web.Response:
    executor = request.app[EXECUTOR]
    # Choices are computed now (model folders listed), so new files show up without a restart.
    catalog = await asyncio.to_thread(executor.registry.catalog, executor.settings)
    return web.json_response(catalog)


@routes.get("/api/models/{kind}")
async def models(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    if kind not in MODEL_KINDS:
        raise ApiError(404, "unknown_model_kind", f"no model kind {kind[:100]!r}; kinds: {', '.join(MODEL_KINDS)}")
    settings = request.app[EXECUTOR].settings
    files = await asyncio.to_thread(settings.model_files, kind, folders=kind == "checkpoints")
    return web.json_response({"kind": kind, "files": files})


@routes.post("/api/validate")
async def validate_workflow(request: web.Request) -> web.Response:
    body = await json_object(request)
    if "workflow" not in body:
        raise ApiError(400, "invalid_body", 'expected {"workflow": {...}}')
    executor = request.app[EXECUTOR]
    _, found = await asyncio.to_thread(validate, wf.from_json(body["workflow"]), executor.registry,
                                       executor.settings, executor.models)
    return web.json_response({"ok": not found, "errors": [p.to_json() for p in found]})


@routes.post("/api/free")
async def free(request: web.Request) -> web.Response:
    now = await asyncio.to_thread(request.app[WORKER].free)
    # While a job runs, its models are in use: they are freed as soon as it ends.
    return web.json_response({"freed": now, "deferred": not now})


@routes.get("/api/system")
async def system(request: web.Request) -> web.Response:
    executor, store = request.app[EXECUTOR], request.app[STORE]
    models = await asyncio.to_thread(executor.models.status)  # may query devices (and import torch) the first time
    versions = {"python": platform.python_version(), "nodegraph": _version("nodegraph"),
                "aiohttp": aiohttp.__version__}
    torch = sys.modules.get("torch")  # reported when the models or a node pack loaded it; never imported here
    if torch is not None:
        versions["torch"] = str(getattr(torch, "__version__", "unknown"))
    answer = {"versions": versions, "models": models, "queue": store.counts(),
              "cache": {"entries": len(executor.cache), "bytes": executor.cache.bytes,
                        "max_bytes": executor.cache.max_bytes},
              "model_folders": {"truncated": model_listing.truncated()}}  # listings that stopped at a bound
    workers = await asyncio.to_thread(request.app[WORKER].workers)  # with --ray: each worker's own status
    if workers is not None:
        answer["workers"] = workers
    return web.json_response(answer)


@routes.get("/api/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
