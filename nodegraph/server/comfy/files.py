"""ComfyUI's file routes: `GET /view` and `POST /upload/image`, on our folders and their containment rules.

    GET /view?filename=ComfyUI_00001_.png&subfolder=&type=output      (type: output, input or temp)

The name (`subfolder/filename`) is confined to its folder as every file name here is (`security.confined`:
no `..`, no absolute names, no symlinks leading out), and only images are served, as `/api/outputs/` does.
`POST /upload/image` is our own upload (`api_uploads`), which already speaks ComfyUI's form and answer.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from nodegraph.server.api_files import IMAGE_TYPES
from nodegraph.server.api_uploads import upload_image
from nodegraph.server.errors import ApiError
from nodegraph.server.security import confined
from nodegraph.server.state import EXECUTOR

routes = web.RouteTableDef()
KINDS = ("output", "input", "temp")


@routes.get("/view")
async def view(request: web.Request) -> web.StreamResponse:
    filename, subfolder = request.query.get("filename", ""), request.query.get("subfolder", "").strip("/")
    kind = request.query.get("type") or "output"
    if kind not in KINDS:
        raise ApiError(400, "bad_type", f"type {kind[:50]!r}: one of {', '.join(KINDS)}")
    if not filename:
        raise ApiError(400, "bad_query", "'filename' is required")
    settings = request.app[EXECUTOR].settings
    folder = {"output": settings.output_dir, "input": settings.input_dir, "temp": settings.temp_dir}[kind]
    name = f"{subfolder}/{filename}" if subfolder else filename
    content_type = IMAGE_TYPES.get(Path(filename).suffix.lower())
    if content_type is None:
        raise ApiError(403, "not_an_image", "only images are served")
    path = confined(folder, name)
    if not path.is_file():
        raise ApiError(404, "no_such_file", f"no file {name[:200]!r} in the {kind} folder")
    return web.FileResponse(path, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})


routes.post("/upload/image")(upload_image)
