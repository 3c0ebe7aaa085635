"""Output nodes: SaveImage writes PNGs into the output folder, PreviewImage into its temp folder.

Every PNG carries four text chunks: `nodegraph` (the JSON of the workflow that made it, so
`nodegraph run outputs/nodegraph_00001_.png` runs it again), ComfyUI's `prompt` (API format) and
`workflow` (UI format), so ComfyUI opens it with its nodes, and `parameters` (the JSON of the
images' params: prompt, seed, steps, …). Names follow ComfyUI, `{prefix}_{counter:05}_.png`,
with the counter one past the highest already in the folder, so no file is ever overwritten.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

from nodegraph import comfy_ui_format
from nodegraph.context import Context, NodeFailure
from nodegraph.naming import create_numbered, next_counter
from nodegraph.schema import Input, Node, Output, describe
from nodegraph.workflow import OWN_CHUNK
from nodes.engine.images import ImageBatch

if TYPE_CHECKING:
    from PIL.PngImagePlugin import PngInfo

# Most filesystems cap a file name at 255 bytes; "_00001_.png" and counters past 99999 need room.
MAX_NAME_BYTES = 200
PREVIEW_NAME = "preview"


def prefix_problem(prefix: str, output_dir: Path | None = None, where: str = "the output folder") -> str | None:
    """Why `prefix` cannot name files inside the output folder (or another, `where` in messages); None when it can.

    Without `output_dir` (validation without settings) only the text of the prefix is checked;
    with it, the folder part must also resolve (symbolic links followed) inside `output_dir`.
    """
    if any(ord(c) < 32 for c in prefix):
        return f"{describe(prefix)} contains control characters"
    # Both kinds of absolute path are refused on every OS, so a workflow behaves the same everywhere.
    if PurePosixPath(prefix).is_absolute() or PureWindowsPath(prefix).anchor:
        return f"{describe(prefix)} is an absolute path; give a path inside {where}, such as 'portraits/cat'"
    *folders, name = _parts(prefix)
    if ".." in folders or name == "..":
        return f"{describe(prefix)} contains '..'; the prefix must stay inside {where}"
    if name in ("", "."):
        return f"{describe(prefix)} has no file name after its folder, such as 'portraits/cat'"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"the file name part of the prefix is longer than {MAX_NAME_BYTES} bytes"
    if output_dir is not None and not inside(Path(output_dir, *folders), output_dir):
        return f"{describe(prefix)} leads outside {where} (through a symbolic link)"
    return None


def inside(folder: Path, output_dir: Path) -> bool:
    """Whether `folder`'s real path (symbolic links followed) is `output_dir`'s or below it."""
    root = os.path.realpath(output_dir)
    return os.path.commonpath([root, os.path.realpath(folder)]) == root


def _parts(prefix: str) -> list[str]:
    # A backslash separates folders too, so a prefix written on Windows means the same on Linux.
    return prefix.replace("\\", "/").split("/")


def resolve_prefix(prefix: str, output_dir: Path) -> tuple[Path, str]:
    """The folder and the file name stem that `prefix` names inside `output_dir`, or a NodeFailure."""
    problem = prefix_problem(prefix, output_dir)
    if problem is not None:
        raise NodeFailure(problem, "filename_prefix", "invalid_value")
    *folders, name = _parts(prefix)
    return Path(output_dir, *folders), name


def png_info(workflow: dict[str, Any], params: dict[str, Any]) -> PngInfo:
    """The text chunks every PNG gets: the workflow that made it (ours, and in ComfyUI's two formats) and the
    images' parameters."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    # Plain tEXt rather than compressed zTXt: Pillow refuses to inflate a text chunk past 1 MB
    # (MAX_TEXT_CHUNK) when reading, and a workflow full of long prompts can grow past that.
    # json.dumps escapes to ASCII, which tEXt (Latin-1) holds as is.
    lookup = _catalog().get
    info.add_text("prompt", json.dumps(comfy_ui_format.to_api(workflow, lookup)))
    info.add_text("workflow", json.dumps(comfy_ui_format.to_ui(workflow, lookup)))
    info.add_text(OWN_CHUNK, json.dumps(workflow))
    info.add_text("parameters", json.dumps(params, default=str))  # a stray numpy int becomes text
    return info


@functools.cache
def _catalog() -> dict[object, type[Node]]:
    """The built-in pack's node types by name, for the widget order of ComfyUI's UI format (a node pack's
    types are written with their literal inputs in the order given)."""
    import nodes  # here: this module is part of the package that import builds

    return {cls.type: cls for cls in nodes.NODES}


def write_pngs(ctx: Context, images: Any, folder: Path, name: str) -> list[Path]:
    """Write each image as `folder/{name}_{counter:05}_.png`, report it with `ctx.add_file`.

    All or nothing: if one image cannot be written, those already written by this call are removed,
    since a node that failed reports no files.
    """
    from PIL import Image

    if not isinstance(images, ImageBatch):  # an ANY output (`*`) may be linked into an IMAGE input
        raise NodeFailure(f"expected an IMAGE, got {type(images).__name__}", "images", "wrong_type")
    info = png_info(ctx.workflow, images.params)
    written: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        counter = next_counter(folder, name)
        for pixels in images.pixels:
            file, path, counter = create_numbered(folder, name, counter)
            written.append(path)
            with file:
                # compress_level 4, as ComfyUI: much faster than the default 6 for nearly the same size.
                Image.fromarray(pixels).save(file, format="PNG", pnginfo=info, compress_level=4)
    except BaseException as exc:
        for partial in written:
            partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            where = exc.filename or (written[-1] if written else folder)
            raise NodeFailure(f"cannot write {where}: {exc.strerror or exc}", None, "write_failed") from None
        raise
    for path in written:
        ctx.add_file(path)
    return written


class SaveImage(Node):
    type = "SaveImage"
    version = "1.0.0"
    category = "image"
    description = (
        "Saves images as PNGs in the output folder, with the workflow and the parameters embedded "
        "(open the PNG as a workflow to run it again)."
    )
    inputs = (
        Input("images", "IMAGE"),
        Input(
            "filename_prefix",
            "STRING",
            default="nodegraph",
            description="file name start, may include subfolders of the output folder: 'portraits/cat'",
        ),
    )
    outputs = (Output("images", "IMAGE"),)
    output_node = True

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        prefix = literals.get("filename_prefix")
        if not isinstance(prefix, str):  # linked: checked when it runs
            return []
        problem = prefix_problem(prefix, getattr(settings, "output_dir", None))
        return [("filename_prefix", problem)] if problem else []

    def run(self, ctx: Context, images: ImageBatch, filename_prefix: str) -> dict[str, Any]:
        folder, name = resolve_prefix(filename_prefix, ctx.settings.output_dir)
        write_pngs(ctx, images, folder, name)
        return {"images": images}


class PreviewImage(Node):
    type = "PreviewImage"
    version = "1.0.0"
    category = "image"
    description = "Shows images in the editor: PNGs in the temporary folder, with the workflow embedded."
    inputs = (Input("images", "IMAGE"),)
    outputs = (Output("images", "IMAGE"),)
    output_node = True

    def run(self, ctx: Context, images: ImageBatch) -> dict[str, Any]:
        # The temporary folder is confined like SaveImage's subfolders: a symlink must not lead out.
        if not inside(ctx.settings.temp_dir, ctx.settings.output_dir):
            raise NodeFailure(f"the temporary folder {ctx.settings.temp_dir} leads outside the output folder "
                              "(through a symbolic link)", None, "outside_output_folder")
        write_pngs(ctx, images, ctx.settings.temp_dir, PREVIEW_NAME)
        return {"images": images}


NODES: list[type[Node]] = [SaveImage, PreviewImage]
