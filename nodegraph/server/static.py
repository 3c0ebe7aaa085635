"""The editor's files: `/` is `web/index.html`, `/web/...` is everything else in `web/`.

Only known file types are served, each with an explicit content type; HTML gets a strict
Content-Security-Policy. Names are confined to `web/` like every other file name (no `..`, no
symlinks that lead out). Until the editor exists, `/` answers 404.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from nodegraph.server.errors import ApiError
from nodegraph.server.security import confined, content_security_policy
from nodegraph.server.state import CONFIG

routes = web.RouteTableDef()
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".map": "application/json", ".svg": "image/svg+xml", ".png": "image/png",
    ".ico": "image/x-icon", ".woff2": "font/woff2", ".woff": "font/woff", ".ttf": "font/ttf",
    ".txt": "text/plain; charset=utf-8",
}


def _serve(request: web.Request, path: Path) -> web.StreamResponse:
    content_type = CONTENT_TYPES.get(path.suffix.lower())
    if content_type is None:
        raise ApiError(403, "unsupported_file_type", f"{path.suffix or 'this'} files are not served")
    if not path.is_file():
        raise ApiError(404, "not_found", "no such file in the editor")
    headers = {"Content-Type": content_type, "Cache-Control": "no-cache"}
    if path.suffix.lower() == ".html":
        headers["Content-Security-Policy"] = content_security_policy(request.host)
    return web.FileResponse(path, headers=headers)


@routes.get("/")
async def index(request: web.Request) -> web.StreamResponse:
    return _serve(request, confined(request.app[CONFIG].web_dir, "index.html"))


@routes.get("/web/{name:.+}")
async def web_file(request: web.Request) -> web.StreamResponse:
    return _serve(request, confined(request.app[CONFIG].web_dir, request.match_info["name"]))
