"""ComfyUI's HTTP API and websocket, as a layer over our one store, worker, executor and event stream.

    python basic_api_example.py          # ComfyUI's own example, against `nodegraph serve --port 8188`

Every route answers at its bare path (`/prompt`) and under `/api/` (`/api/prompt`, as ComfyUI's frontend
calls it), except where nodegraph has a route of that path already: there nodegraph's own stays (`COLLISIONS`).
`/models` is bare only (`/api/models/{kind}` is ours). `/api/ws` is ours, and ComfyUI's when the query says
`clientId` rather than `client_id` (`nodegraph.server.ws`).
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from nodegraph.server.comfy import files, info, jobs, prompt, queue, userdata
from nodegraph.server.comfy.ws import websocket

# ComfyUI paths whose /api/ twin is a nodegraph route already (any method): nodegraph's stays there.
COLLISIONS = frozenset({"/history", "/history/{prompt_id}", "/upload/image", "/free", "/ws", "/jobs",
                        "/jobs/{job_id}"})
BARE_ONLY = frozenset({"/models", "/models/{folder}"})
# With `--front-end comfyui` these take their /api/ twins from ours (ours: the same thing already, or a router).
OURS_STAY = frozenset({"/upload/image", "/ws"})
SUMMARIES = {
    ("post", "/prompt"): "queue a prompt in ComfyUI's API format (ComfyUI's answer and refusals)",
    ("get", "/prompt"): "exec_info.queue_remaining", ("get", "/queue"): "the running and pending prompts",
    ("post", "/queue"): "delete pending prompts ({delete: [ids]} or {clear: true})",
    ("post", "/interrupt"): "interrupt the running prompt (or only {prompt_id})",
    ("get", "/history"): "finished prompts, oldest first (max_items)", ("get", "/history/{prompt_id}"): "one",
    ("post", "/history"): "delete finished prompts ({delete: [ids]} or {clear: true})",
    ("get", "/view"): "an image: filename, subfolder, type (output, input, temp)",
    ("post", "/upload/image"): "store an image in the input folder",
    ("post", "/upload/mask"): "store an input image with a mask's alpha (original_ref)",
    ("get", "/object_info"): "every node type in ComfyUI's shape", ("get", "/object_info/{node_class}"): "one",
    ("get", "/embeddings"): "embedding names", ("get", "/models"): "model folders",
    ("get", "/models/{folder}"): "the models in a folder", ("get", "/system_stats"): "system and devices",
    ("get", "/features"): "server features", ("post", "/free"): "unload models and free memory",
    ("get", "/ws"): "ComfyUI's websocket (?clientId=)",
    ("get", "/users"): "single-user mode: {storage: server, migrated}", ("post", "/users"): "refused: one user",
    ("get", "/settings"): "the frontend's settings", ("post", "/settings"): "merge settings",
    ("get", "/settings/{id}"): "one setting (null when unset)", ("post", "/settings/{id}"): "set one setting",
    ("get", "/userdata"): "the user's files in a folder (dir, recurse, split, full_info)",
    ("get", "/v2/userdata"): "files and folders under path", ("get", "/userdata/{file}"): "one user file",
    ("post", "/userdata/{file}"): "store a user file (overwrite, full_info)",
    ("delete", "/userdata/{file}"): "delete a user file",
    ("post", "/userdata/{file}/move/{dest}"): "move a user file (overwrite, full_info)",
    ("get", "/extensions"): "web extension files (none)", ("get", "/i18n"): "translations (none)",
    ("get", "/workflow_templates"): "the node packs' example workflows (none)",
    ("get", "/experiment/models"): "the model library's folders",
    ("get", "/experiment/models/{folder}"): "the model library: a folder's files",
    ("get", "/global_subgraphs"): "subgraph blueprints (none)",
    ("get", "/jobs"): "jobs in ComfyUI's shape (status, limit, offset)", ("get", "/jobs/{job_id}"): "one job",
}


def _routes() -> list[web.RouteDef]:
    tables = (prompt.routes, queue.routes, files.routes, info.routes, userdata.routes, jobs.routes)
    found = [r for table in tables for r in table if isinstance(r, web.RouteDef)]
    return [*found, web.get("/ws", websocket)]


def _twinned(path: str, comfy_front: bool) -> bool:
    """Whether ComfyUI's route also answers under /api/."""
    if comfy_front:
        return path not in OURS_STAY
    return path not in COLLISIONS | BARE_ONLY


def pattern(path: str) -> str:
    """A route's path with its variables' names left out: `/api/models/{kind}` is `/api/models/{}`."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def taken_over() -> frozenset[tuple[str, str]]:
    """(method, path pattern) of our routes that ComfyUI's take over when its frontend is served."""
    return frozenset((route.method, pattern("/api" + route.path)) for route in _routes()
                     if route.path in (COLLISIONS | BARE_ONLY) - OURS_STAY)


def add_routes(app: web.Application, comfy_front: bool = False) -> None:
    """ComfyUI's routes at their bare paths and, where `_twinned`, under /api/ (`comfy_front`: its frontend is
    served, so its shapes win where our paths collide)."""
    for route in _routes():
        app.router.add_route(route.method, route.path, route.handler)
        if _twinned(route.path, comfy_front):
            app.router.add_route(route.method, "/api" + route.path, route.handler)


def paths() -> dict[str, Any]:
    """The routes for the OpenAPI document (`nodegraph.server.openapi`)."""
    found: dict[str, Any] = {}
    for route in _routes():
        method = route.method.lower()
        names = re.findall(r"\{(\w+)", route.path)
        op: dict[str, Any] = {"summary": "ComfyUI: " + SUMMARIES[(method, route.path)],
                              "responses": {"200": {"description": "OK (ComfyUI's shape)"}}}
        if names:
            op["parameters"] = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                                for n in names]
        variants = [route.path] if route.path in COLLISIONS | BARE_ONLY else [route.path, "/api" + route.path]
        for path in variants:
            found.setdefault(path, {})[method] = op
    return found
