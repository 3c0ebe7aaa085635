"""ComfyUI's own frontend, served by `nodegraph serve --front-end comfyui` from the installed
`comfyui-frontend-package` (`pip install -e ".[comfyui]"`).

    nodegraph serve --front-end comfyui      # then open http://127.0.0.1:8188/

`/` is its `index.html`, every other path that no route takes is a file in its `static` folder, confined there
as every file name here. Its page runs inline scripts and styles, so its policy allows those (ours does not).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from aiohttp import web

from nodegraph.server.errors import ApiError
from nodegraph.server.security import confined
from nodegraph.server.state import CONFIG
from nodegraph.server.static import CONTENT_TYPES

PACKAGE = "comfyui_frontend_package"
INSTALL = 'pip install -e ".[comfyui]"'
TYPES = {**CONTENT_TYPES, ".webp": "image/webp", ".webm": "video/webm", ".eot": "application/vnd.ms-fontobject",
         ".wasm": "application/wasm", ".mp3": "audio/mpeg", ".jpg": "image/jpeg", ".gif": "image/gif"}


class FrontEndMissing(RuntimeError):
    """`--front-end comfyui` without the package that holds ComfyUI's frontend."""


def static_dir() -> Path:
    """The installed frontend's `static` folder; FrontEndMissing (naming the install command) when absent."""
    spec = importlib.util.find_spec(PACKAGE)
    folder = Path(spec.origin).parent / "static" if spec and spec.origin else None
    if folder is None or not (folder / "index.html").is_file():
        raise FrontEndMissing(f"--front-end comfyui needs ComfyUI's frontend (the comfyui-frontend-package "
                              f"wheel): {INSTALL}")
    return folder


def policy(host: str) -> str:
    websocket = f" ws://{host} wss://{host}"
    return ("default-src 'self'; script-src 'self' 'unsafe-inline' 'wasm-unsafe-eval'; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
            f"media-src 'self' data: blob:; worker-src 'self' blob:; connect-src 'self' data: blob:{websocket}; "
            "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'")


def _serve(request: web.Request, name: str) -> web.StreamResponse:
    folder = request.app[CONFIG].front_end_dir
    assert folder is not None, "create_app sets front_end_dir for --front-end comfyui"
    path = confined(folder, name)
    if not path.is_file():
        raise ApiError(404, "not_found", f"no {name[:200]!r} here (no such route or frontend file)")
    content_type = TYPES.get(path.suffix.lower())
    if content_type is None:
        raise ApiError(403, "unsupported_file_type", f"{path.suffix or 'this'} files are not served")
    headers = {"Content-Type": content_type, "Cache-Control": "no-cache"}
    if path.suffix.lower() == ".html":
        headers["Content-Security-Policy"] = policy(request.host)
    return web.FileResponse(path, headers=headers)


async def index(request: web.Request) -> web.StreamResponse:
    return _serve(request, "index.html")


async def static_file(request: web.Request) -> web.StreamResponse:
    return _serve(request, request.match_info["name"])


# ComfyUI serves these from the comfyui-workflow-templates package; without it, no templates (not an error).
NO_TEMPLATES: dict[str, list[object] | dict[str, object]] = {"index.json": [], "index_logo.json": {}}


async def templates(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in NO_TEMPLATES:
        raise ApiError(404, "not_found", f"no template {name[:200]!r} (no workflow templates are installed)")
    return web.json_response(NO_TEMPLATES[name])


def add_routes(app: web.Application) -> None:
    """Last of all routes: a path that an API route takes is never a file."""
    app.router.add_get("/templates/{name}", templates)
    app.router.add_get("/", index)
    app.router.add_get("/{name:.+}", static_file)
