"""Files: generated images (`/api/outputs/`), saved workflows (`/api/workflows/`), imports (`/api/import`)."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from nodegraph import workflow as wf
from nodegraph.server.errors import ApiError, json_body
from nodegraph.server.security import confined
from nodegraph.server.state import CONFIG, EXECUTOR
from nodegraph.validate import validate

routes = web.RouteTableDef()
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif"}
WORKFLOW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]*\.json")


@routes.get("/api/outputs/{name:.+}")
async def output_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    content_type = IMAGE_TYPES.get(Path(name).suffix.lower())
    if content_type is None:
        raise ApiError(403, "not_an_image", "only images are served from the output folder")
    path = confined(request.app[EXECUTOR].settings.output_dir, name)
    if not path.is_file():
        raise ApiError(404, "no_such_file", f"no file {name[:200]!r} in the output folder")
    return web.FileResponse(path, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})


def _workflow_path(request: web.Request) -> Path:
    name = request.match_info["name"]
    if not WORKFLOW_NAME.fullmatch(name) or ".." in name:
        raise ApiError(400, "bad_name", f"{name[:200]!r} is not a workflow name (letters, digits, ' _.-', ending "
                                        "in .json)")
    return confined(request.app[CONFIG].workflows_dir, name)


@routes.get("/api/workflows")
async def list_workflows(request: web.Request) -> web.Response:
    folder = request.app[CONFIG].workflows_dir
    root = os.path.realpath(folder)
    # Only the names GET would serve: symlinks out of the folder are left out.
    names = sorted(p.name for p in folder.glob("*.json") if p.is_file() and WORKFLOW_NAME.fullmatch(p.name)
                   and os.path.dirname(os.path.realpath(p)) == root) if folder.is_dir() else []
    return web.json_response({"workflows": names})


@routes.get("/api/workflows/{name}")
async def get_workflow(request: web.Request) -> web.StreamResponse:
    path = _workflow_path(request)
    if not path.is_file():
        raise ApiError(404, "no_such_workflow", f"no workflow {path.name!r}")
    return web.FileResponse(path, headers={"Content-Type": "application/json", "Cache-Control": "no-cache"})


@routes.put("/api/workflows/{name}")
async def put_workflow(request: web.Request) -> web.Response:
    path = _workflow_path(request)
    workflow = await json_body(request)
    if not (isinstance(workflow, dict) and workflow.get("format") == wf.FORMAT and isinstance(workflow.get("nodes"),
                                                                                              dict)):
        raise ApiError(400, "invalid_shape", f'a workflow is {{"format": "{wf.FORMAT}", "nodes": {{...}}}}')
    existed = path.exists()
    await asyncio.to_thread(lambda: write_atomically(path, wf.dumps(workflow)))  # encoding is slow on a big graph
    return web.json_response({"name": path.name}, status=200 if existed else 201)


@routes.delete("/api/workflows/{name}")
async def delete_workflow(request: web.Request) -> web.Response:
    path = _workflow_path(request)
    if not path.is_file():
        raise ApiError(404, "no_such_workflow", f"no workflow {path.name!r}")
    path.unlink()
    return web.json_response({"deleted": path.name})


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it over: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@routes.post("/api/import")
async def import_workflow(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        workflow: Any = await asyncio.to_thread(wf.loads, raw, "the upload")
    except wf.WorkflowError as exc:
        raise ApiError(400, exc.code, str(exc), [exc.to_json()]) from None
    executor = request.app[EXECUTOR]
    # Only the shape matters here: the editor shows a graph with unknown nodes or bad values as is.
    _, found = await asyncio.to_thread(validate, workflow, executor.registry, executor.settings)
    shape = [p for p in found if p.code in ("invalid_shape", "unknown_format")]
    if shape:
        raise ApiError(400, shape[0].code, shape[0].message, [p.to_json() for p in shape])
    return web.json_response({"workflow": workflow})
