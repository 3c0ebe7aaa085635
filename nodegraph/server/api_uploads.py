"""Uploads into the input folder: `POST /api/upload/image`, as ComfyUI's (LoadImage reads the result).

    curl -F image=@photo.png -F subfolder=masks http://127.0.0.1:8188/api/upload/image
    -> {"name": "photo.png", "subfolder": "masks", "type": "input"}

A multipart form: `image` (the file), optional `subfolder` and `overwrite` ("true"/"1"), optional
`type` (only "input"). Names are checked and confined like every file name here; the file must be
an image Pillow reads, with an image suffix, within LoadImage's size limits. Without `overwrite` an
existing file is kept: the same bytes reuse its name, other bytes get `name (1).png`, `name (2).png`…
Files are written to a temporary name and then linked into place, so readers never see half a file
and two uploads of one name never overwrite each other.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from nodegraph.server.errors import ApiError
from nodegraph.server.security import confined
from nodegraph.server.state import EXECUTOR
from nodegraph.settings import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE
from nodegraph.store import StorageFull, storage_full

routes = web.RouteTableDef()
FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"})


def _field(form: Any, name: str) -> str:
    value = form.get(name, "")
    if not isinstance(value, str):
        raise ApiError(400, "bad_field", f"the form field {name!r} must be text, not a file")
    return value


def check_image(data: bytes, filename: str) -> None:
    """A 400 unless `data` is an image file that LoadImage can read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, width, height = image.format, image.width, image.height
            image.verify()  # reads the whole file: a truncated or corrupt one fails here
    except Image.DecompressionBombError:
        # Pillow refuses a header claiming over twice its MAX_IMAGE_PIXELS (≈179 megapixels) before we see the
        # size: far past our own limit, so it is the same refusal.
        raise _too_large(filename, "over 179 megapixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ApiError(400, "not_an_image", f"{filename[:200]!r} is not an image file ({exc})") from None
    if kind not in FORMATS:
        raise ApiError(400, "not_an_image", f"{filename[:200]!r} is a {kind} image; uploads are "
                                            + ", ".join(sorted(FORMATS)))
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise _too_large(filename, f"{width}×{height}")


def _too_large(filename: str, size: str) -> ApiError:
    return ApiError(400, "too_large", f"{filename[:200]!r} is {size}: too large (at most {MAX_IMAGE_SIDE} "
                                      f"pixels a side and {MAX_IMAGE_PIXELS // 2**20} megapixels)")


def store(path: Path, data: bytes, overwrite: bool) -> Path:
    """Write `data` at `path` (or, not overwriting, at the first free `name (i)` beside it); where it is."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ApiError(409, "name_taken", f"the subfolder {folder.name!r} is a file") from None
    if overwrite and path.is_dir():
        raise ApiError(409, "name_taken", f"{path.name!r} is a folder")
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(temp, path)
            return path
        stem, suffix = os.path.splitext(path.name)
        for i in range(10_000):
            candidate = path if i == 0 else folder / f"{stem} ({i}){suffix}"
            if candidate.is_file() and candidate.read_bytes() == data:
                return candidate  # already here: as ComfyUI, the same image is not stored twice
            try:
                os.link(temp, candidate)  # fails when the name is taken: never clobbers a file
                return candidate
            except FileExistsError:
                continue
        raise ApiError(409, "name_taken", f"too many files named like {path.name!r}")
    finally:
        Path(temp).unlink(missing_ok=True)


@routes.post("/api/upload/image")
async def upload_image(request: web.Request) -> web.Response:
    form = await request.post()  # the body size limit (413) applies here
    image = form.get("image")
    if not isinstance(image, web.FileField):
        raise ApiError(400, "missing_image", "send a multipart form with the file in the field 'image'")
    subfolder, kind = _field(form, "subfolder").rstrip("/"), _field(form, "type") or "input"
    overwrite = _field(form, "overwrite").lower() in ("true", "1")
    if kind != "input":
        raise ApiError(400, "bad_type", f"type {kind[:50]!r}: uploads go to the input folder only ('input')")
    filename = image.filename or ""
    if not filename or "/" in filename or "\\" in filename or filename.startswith("."):
        raise ApiError(400, "bad_name", f"{filename[:200]!r} is not a file name (no folders, not hidden)")
    if Path(filename).suffix.lower() not in IMAGE_SUFFIXES:
        raise ApiError(400, "not_an_image", f"{filename[:200]!r}: image files end in " + ", ".join(IMAGE_SUFFIXES))
    if any(part.startswith(".") for part in subfolder.split("/") if part):
        raise ApiError(400, "bad_name", f"subfolder {subfolder[:200]!r}: hidden folders are not listed")
    folder = request.app[EXECUTOR].settings.input_dir
    path = confined(folder, f"{subfolder}/{filename}" if subfolder else filename)
    data = image.file.read()
    await asyncio.to_thread(check_image, data, filename)
    try:
        stored = await asyncio.to_thread(store, path, data, overwrite)
    except OSError as exc:
        if storage_full(exc):
            raise StorageFull(folder.name or folder.as_posix(), "input folder") from exc
        raise
    return web.json_response({"name": stored.name, "subfolder": subfolder, "type": "input"})
