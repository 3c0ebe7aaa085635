"""ComfyUI's file routes: `GET /view` and `POST /upload/image`, on our folders and their containment rules.

    GET /view?filename=ComfyUI_00001_.png&subfolder=&type=output      (type: output, input or temp)

The name (`subfolder/filename`) is confined to its folder as every file name here is (`security.confined`:
no `..`, no absolute names, no symlinks leading out), and only images are served, as `/api/outputs/` does.
`POST /upload/image` is our own upload (`api_uploads`), which already speaks ComfyUI's form and answer.
`POST /upload/mask` (the mask editor's) takes the same form plus `original_ref` (JSON `{filename, subfolder,
type}` of an input image): the original with the mask's alpha as its alpha is stored under the upload's name.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from nodegraph.server.api_files import IMAGE_TYPES
from nodegraph.server.api_uploads import check_image, store, upload_image
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


def _masked(original: Path, mask: bytes) -> bytes:
    """The original image as RGBA PNG bytes, its alpha the mask's."""
    from PIL import Image

    with Image.open(original) as image, Image.open(io.BytesIO(mask)) as alpha:
        rgba = image.convert("RGBA")
        channel = alpha.convert("RGBA").getchannel("A").resize(rgba.size)
        rgba.putalpha(channel)
        buffer = io.BytesIO()
        rgba.save(buffer, "PNG")
        return buffer.getvalue()


@routes.post("/upload/mask")
async def upload_mask(request: web.Request) -> web.Response:
    form = await request.post()
    image, ref_text = form.get("image"), form.get("original_ref")
    if not isinstance(image, web.FileField) or not isinstance(ref_text, str):
        raise ApiError(400, "missing_image", "send a multipart form with the mask in 'image' and 'original_ref'")
    try:
        ref: Any = json.loads(ref_text)
    except ValueError:
        ref = None
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str) or \
            not isinstance(ref.get("subfolder", ""), str) or ref.get("type", "input") != "input":
        raise ApiError(400, "bad_field", "'original_ref' must be JSON {filename, subfolder, type: 'input'}")
    subfolder = form.get("subfolder", "")
    filename = image.filename or ""
    if not isinstance(subfolder, str) or not filename or "/" in filename or "\\" in filename \
            or filename.startswith(".") or Path(filename).suffix.lower() != ".png" \
            or any(part.startswith(".") for part in subfolder.split("/") if part):
        raise ApiError(400, "bad_name", f"{filename[:200]!r}: a mask is a PNG file name (no folders, not hidden)")
    folder = request.app[EXECUTOR].settings.input_dir
    original_name = f"{ref['subfolder'].strip('/')}/{ref['filename']}" if ref.get("subfolder") else ref["filename"]
    original = confined(folder, original_name)
    if not original.is_file():
        raise ApiError(404, "no_such_file", f"no file {original_name[:200]!r} in the input folder")
    target = confined(folder, f"{subfolder.strip('/')}/{filename}" if subfolder.strip("/") else filename)
    data = image.file.read()
    await asyncio.to_thread(check_image, data, filename)
    await asyncio.to_thread(check_image, original.read_bytes(), original.name)
    masked = await asyncio.to_thread(_masked, original, data)
    overwrite = form.get("overwrite", "") in ("true", "1")
    stored = await asyncio.to_thread(store, target, masked, overwrite)
    return web.json_response({"name": stored.name, "subfolder": subfolder.strip("/"), "type": "input"})
