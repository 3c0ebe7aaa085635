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
PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]*")  # a folder's or a file's name: nothing hidden
WORKFLOW_NAME = re.compile(rf"(?:{PART.pattern}/)*{PART.pattern}\.json")


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


def resolve_workflow(folder: Path, name: str) -> Path:
    """The file a workflow name (`lora.json`, `comfyui/txt2img.json`) stands for, inside `folder` only."""
    if not WORKFLOW_NAME.fullmatch(name) or ".." in name:
        raise ApiError(400, "bad_name", f"{name[:200]!r} is not a workflow name (folders and a file name of "
                                        "letters, digits, ' _.-', joined by '/', ending in .json)")
    return confined(folder, name)


def _workflow_path(request: web.Request) -> tuple[str, Path]:
    name = request.match_info["name"]
    return name, resolve_workflow(request.app[CONFIG].workflows_dir, name)


def workflow_names(folder: Path) -> list[str]:
    """Every name GET would serve, subfolders included: a folder's files first, then its subfolders'."""
    names = []
    # Symlinked folders are not walked into; a symlinked file is listed when it resolves inside.
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if PART.fullmatch(d)]  # hidden folders (.git) hold no workflows
        for file in files:
            name = Path(top, file).relative_to(folder).as_posix()
            try:
                if resolve_workflow(folder, name).is_file():
                    names.append(name)
            except ApiError:
                continue
    return sorted(names, key=lambda name: (name.split("/")[:-1], name.rsplit("/", 1)[-1]))


@routes.get("/api/workflows")
async def list_workflows(request: web.Request) -> web.Response:
    names = await asyncio.to_thread(workflow_names, request.app[CONFIG].workflows_dir)
    return web.json_response({"workflows": names})


@routes.get("/api/workflows/{name:.+}")
async def get_workflow(request: web.Request) -> web.StreamResponse:
    name, path = _workflow_path(request)
    if not path.is_file():
        raise ApiError(404, "no_such_workflow", f"no workflow {name!r}")
    return web.FileResponse(path, headers={"Content-Type": "application/json", "Cache-Control": "no-cache"})


@routes.put("/api/workflows/{name:.+}")
async def put_workflow(request: web.Request) -> web.Response:
    name, path = _workflow_path(request)
    workflow = await json_body(request)
    if not (isinstance(workflow, dict) and workflow.get("format") == wf.FORMAT and isinstance(workflow.get("nodes"),
                                                                                              dict)):
        raise ApiError(400, "invalid_shape", f'a workflow is {{"format": "{wf.FORMAT}", "nodes": {{...}}}}')
    # Encoding is slow on a big graph; "created" comes from the file system, so one PUT of many says 201.
    try:
        created = await asyncio.to_thread(lambda: write_atomically(path, wf.dumps(workflow)))
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise ApiError(409, "not_a_file", f"{name!r} is, or is inside, something that is not a workflow file") from None
    return web.json_response({"name": name}, status=201 if created else 200)


@routes.delete("/api/workflows/{name:.+}")
async def delete_workflow(request: web.Request) -> web.Response:
    name, path = _workflow_path(request)
    if not path.is_file():
        raise ApiError(404, "no_such_workflow", f"no workflow {name!r}")
    path.unlink()
    return web.json_response({"deleted": name})


def write_atomically(path: Path, text: str) -> bool:
    """Write to a temporary file beside `path`, then move it in: readers see old or new, never half.

    Returns whether this call created `path`. A new file is linked in (`os.link` fails when the
    name exists, atomically), so of concurrent writers of one new name exactly one creates it and
    the others replace it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            os.replace(temp, path)
            return False
        except OSError:  # a file system without hard links (FAT, some shares): no atomic create there
            existed = path.exists()
            os.replace(temp, path)
            return not existed
        os.unlink(temp)
        return True
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@routes.post("/api/import")
async def import_workflow(request: web.Request) -> web.Response:
    raw = await request.read()
    executor = request.app[EXECUTOR]
    try:
        workflow: Any = await asyncio.to_thread(wf.loads, raw, "the upload", executor.registry)
    except wf.WorkflowError as exc:
        raise ApiError(400, exc.code, str(exc), [exc.to_json()]) from None
    # Only the shape matters here: the editor shows a graph with unknown nodes or bad values as is.
    _, found = await asyncio.to_thread(validate, workflow, executor.registry, executor.settings)
    shape = [p for p in found if p.code in ("invalid_shape", "unknown_format")]
    if shape:
        raise ApiError(400, shape[0].code, shape[0].message, [p.to_json() for p in shape])
    return web.json_response({"workflow": workflow})
