"""What ComfyUI's frontend stores on the server: `/users`, `/settings`, `/userdata`, `/v2/userdata`; and the
lists it reads at start-up, `/extensions`, `/i18n`, `/workflow_templates`, `/global_subgraphs`.

    curl -X POST --data-binary @w.json 'http://127.0.0.1:8188/api/userdata/workflows%2Fw.json?overwrite=false'

One user (ComfyUI's single-user mode, `default`): files live in `DATA_DIR/user/default/`, the settings in
`comfy.settings.json` there. File names are URL-encoded paths, confined to that folder as every file name here
(`security.confined`: no `..`, absolute names, NUL or symlinks that lead out); listings leave out hidden files
(our temporary files among them). Writes go to a temporary file that is then moved in.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from nodegraph.server.errors import ApiError, json_body
from nodegraph.server.security import confined
from nodegraph.server.state import CONFIG

routes = web.RouteTableDef()
USER = "default"
SETTINGS_FILE = "comfy.settings.json"


def user_root(request: web.Request) -> Path:
    return request.app[CONFIG].data_dir / "user" / USER


def _flag(request: web.Request, name: str, default: str = "false") -> bool:
    return request.query.get(name, default).lower() == "true"


def _file(request: web.Request, param: str = "file") -> Path:
    name = request.match_info[param]
    root = user_root(request)
    root.mkdir(parents=True, exist_ok=True)  # confined resolves the root: it must exist
    return confined(root, name)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(os.path.realpath(root)).as_posix()


def file_info(path: Path, root: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": _relative(path, root), "size": stat.st_size, "modified": int(stat.st_mtime * 1000),
            "created": int(stat.st_ctime * 1000)}


# --- users and settings ---

@routes.get("/users")
async def get_users(request: web.Request) -> web.Response:
    return web.json_response({"storage": "server", "migrated": user_root(request).is_dir()})


@routes.post("/users")
async def post_users(request: web.Request) -> web.Response:
    raise ApiError(400, "single_user", f"this server keeps one user ({USER!r}); it has no multi-user mode")


def read_settings(root: Path) -> dict[str, Any]:
    path = root / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        settings = None
    if not isinstance(settings, dict):
        raise ApiError(409, "bad_settings_file", f"{path} is not a JSON object: fix or remove it")
    return settings


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# The settings file is small, read and written on the event loop: one request's read-modify-write is never
# interleaved with another's.
@routes.get("/settings")
async def get_settings(request: web.Request) -> web.Response:
    return web.json_response(read_settings(user_root(request)))


@routes.get("/settings/{id}")
async def get_setting(request: web.Request) -> web.Response:
    return web.json_response(read_settings(user_root(request)).get(request.match_info["id"]))


@routes.post("/settings")
async def post_settings(request: web.Request) -> web.Response:
    changes = await json_body(request)
    if not isinstance(changes, dict):
        raise ApiError(400, "invalid_shape", "the settings are a JSON object of setting ids and values")
    root = user_root(request)
    write_atomically(root / SETTINGS_FILE, json.dumps({**read_settings(root), **changes}, indent=4).encode())
    return web.Response()


@routes.post("/settings/{id}")
async def post_setting(request: web.Request) -> web.Response:
    value = await json_body(request)
    root = user_root(request)
    settings = read_settings(root)
    settings[request.match_info["id"]] = value
    write_atomically(root / SETTINGS_FILE, json.dumps(settings, indent=4).encode())
    return web.Response()


# --- user files ---

def _inside(path: Path, folder: Path) -> bool:
    return os.path.realpath(path).startswith(str(folder) + os.sep)


def _visible(path: Path, top: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(top).parts)


def list_files(folder: Path, recurse: bool) -> list[Path]:
    """The plain files in `folder` (and below, with `recurse`) that resolve inside it, hidden ones left out."""
    found = folder.rglob("*") if recurse else folder.glob("*")
    files = []
    for path in sorted(found):
        if _visible(path, folder) and path.is_file() and _inside(path, folder):
            files.append(path)
    return files


@routes.get("/userdata")
async def list_userdata(request: web.Request) -> web.Response:
    directory = request.query.get("dir", "")
    if not directory:
        raise ApiError(400, "missing_dir", "say which folder to list: ?dir=workflows")
    root = user_root(request)
    root.mkdir(parents=True, exist_ok=True)
    folder = confined(root, directory.rstrip("/"))
    if not folder.exists():
        return web.json_response([])  # ComfyUI answers 404; its frontend reads that as empty, so do we
    if not folder.is_dir():
        raise ApiError(400, "not_a_folder", f"{directory[:200]!r} is a file, not a folder")
    full_info, split = _flag(request, "full_info"), _flag(request, "split")
    files = await asyncio.to_thread(list_files, folder, _flag(request, "recurse"))
    answer: list[Any] = []
    for path in files:
        relative = path.relative_to(folder).as_posix()
        answer.append(file_info(path, folder) if full_info else [relative, *relative.split("/")] if split
                      else relative)
    return web.json_response(answer)


def _walk(folder: Path, root: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for top, dirs, files in os.walk(folder):
        # Symlinked folders are not walked into, and left out where they lead outside.
        dirs[:] = [d for d in dirs if not d.startswith(".") and _inside(Path(top, d), root)]
        for name in dirs:
            entries.append({"name": name, "path": _relative(Path(top, name), root), "type": "directory"})
        for name in files:
            path = Path(top, name)
            if name.startswith(".") or not _inside(path, root):
                continue
            stat = path.stat()
            entries.append({"name": name, "path": _relative(path, root), "type": "file", "size": stat.st_size,
                            "modified": stat.st_mtime})
    entries.sort(key=lambda entry: (entry["type"] != "directory", entry["name"].lower()))
    return entries


@routes.get("/v2/userdata")
async def list_userdata_v2(request: web.Request) -> web.Response:
    root = user_root(request)
    if not root.is_dir():
        return web.json_response([])
    requested = request.query.get("path", "").rstrip("/")
    folder = confined(root, requested) if requested else Path(os.path.realpath(root))
    if not folder.exists():
        raise ApiError(404, "no_such_folder", f"no folder {requested[:200]!r} in the user's files")
    if not folder.is_dir():
        raise ApiError(400, "not_a_folder", f"{requested[:200]!r} is a file, not a folder")
    return web.json_response(await asyncio.to_thread(_walk, folder, Path(os.path.realpath(root))))


def _existing(request: web.Request, param: str = "file") -> Path:
    path = _file(request, param)
    if not path.is_file():
        raise ApiError(404, "no_such_file", f"no file {request.match_info[param][:200]!r} in the user's files")
    return path


def _answer(request: web.Request, path: Path) -> web.Response:
    root = user_root(request)
    return web.json_response(file_info(path, root) if _flag(request, "full_info") else _relative(path, root))


@routes.get("/userdata/{file}")
async def get_userdata(request: web.Request) -> web.StreamResponse:
    path = _existing(request)
    # User files are anything a page stored: never rendered inline, except the user's own stylesheet.
    if path == confined(user_root(request), "user.css"):
        content_type, disposition = "text/css; charset=utf-8", "inline"
    else:
        json_file = path.suffix.lower() == ".json"
        content_type = "application/json" if json_file else "application/octet-stream"
        disposition = "attachment"
    return web.FileResponse(path, headers={"Content-Type": content_type, "Content-Disposition": disposition,
                                           "Cache-Control": "no-cache"})


def _refuse_existing(request: web.Request, path: Path) -> None:
    if request.query.get("overwrite", "true") == "false" and path.exists():
        raise ApiError(409, "file_exists", f"{_relative(path, user_root(request))!r} exists (overwrite=false)")
    if path.is_dir():
        raise ApiError(409, "not_a_file", f"{_relative(path, user_root(request))!r} is a folder")


@routes.post("/userdata/{file}")
async def post_userdata(request: web.Request) -> web.Response:
    path = _file(request)
    _refuse_existing(request, path)
    data = await request.read()
    try:
        await asyncio.to_thread(write_atomically, path, data)
    except (NotADirectoryError, FileExistsError):
        raise ApiError(409, "not_a_file", f"{request.match_info['file'][:200]!r} is inside a file") from None
    return _answer(request, path)


@routes.delete("/userdata/{file}")
async def delete_userdata(request: web.Request) -> web.Response:
    _existing(request).unlink()
    return web.Response(status=204)


@routes.post("/userdata/{file}/move/{dest}")
async def move_userdata(request: web.Request) -> web.Response:
    source, dest = _existing(request), _file(request, "dest")
    _refuse_existing(request, dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, dest)
    except (NotADirectoryError, FileExistsError):
        raise ApiError(409, "not_a_file", f"{request.match_info['dest'][:200]!r} is inside a file") from None
    return _answer(request, dest)


# --- what the frontend reads at start-up ---

@routes.get("/extensions")
async def extensions(request: web.Request) -> web.Response:
    return web.json_response([])  # no web extensions: our node packs ship none


@routes.get("/i18n")
async def i18n(request: web.Request) -> web.Response:
    return web.json_response({})


@routes.get("/global_subgraphs")
async def global_subgraphs(request: web.Request) -> web.Response:
    return web.json_response({})  # the node packs' subgraph blueprints: ours ship none


@routes.get("/workflow_templates")
async def workflow_templates(request: web.Request) -> web.Response:
    return web.json_response({})  # the node packs' example workflows by pack: ours ship none
