"""The workflow file: load, save, and import ComfyUI's API and UI formats.

A workflow is kept as the plain JSON dict it was read from, so load → save round-trips
unchanged (editor data such as `title` and `ui` included). The format is specified by
`workflow.schema.json` beside this module and described in the README. A PNG (or ComfyUI's WebP)
is a workflow file too: SaveImage puts ours in its `nodegraph` text chunk, beside ComfyUI's `prompt`
(API format) and `workflow` (UI format, `comfy_ui_format`); older PNGs hold ours in `workflow`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

FORMAT = "nodegraph/1"
SCHEMA_PATH = Path(__file__).with_name("workflow.schema.json")
MAX_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64  # nesting of objects and lists; real workflows stay under 10
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OWN_CHUNK = "nodegraph"  # the PNG text chunk that holds our own workflow


class WorkflowError(Exception):
    """The file is not a workflow at all (unreadable, not JSON); `code` is a stable error code.

    `node_id` and `input` say where a refused value sits, when it is inside a node (its inputs).
    """

    def __init__(self, message: str, code: str = "invalid_json", node_id: str | None = None,
                 input: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.node_id = node_id
        self.input = input

    def to_json(self) -> dict[str, Any]:
        """The shape of a validation problem: node_id, input, code, message."""
        return {"node_id": self.node_id, "input": self.input, "code": self.code, "message": str(self)}


def is_link(value: Any) -> bool:
    """A two-element list is always a link `[node_id, output]`."""
    return isinstance(value, list) and len(value) == 2


def parse(data: bytes | str) -> Any:
    """JSON text to a Python value, with every failure (binary, huge digits, deep nesting) a WorkflowError.

    Python's json reads more than JSON allows: NaN, Infinity, 1e400 (infinite), lone surrogates
    ("\\ud800", which no file or database can store). `check_values` refuses those.
    """
    return parse_members(data)[0]


def parse_members(data: bytes | str) -> tuple[Any, dict[str, str]]:
    """`parse(data)`, and for a JSON object the text of each member's value as written in `data`.

    An API request's workflow is stored as the client sent it rather than encoded again (13 ms for a
    10,000-node workflow). An object's members are read one at a time by json's own decoder.
    """
    raw = data
    if isinstance(data, bytes):
        if len(data) > MAX_BYTES:
            raise WorkflowError(f"the file is {len(data)} bytes; the limit is {MAX_BYTES}")
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise WorkflowError(f"not UTF-8 text (byte {exc.start})") from None
    try:
        found = _members(data)
        if found is None:  # not an object, or one json.loads should name the fault of
            found = json.loads(data, parse_constant=_refuse_constant), {}
        if not _plain(raw):
            check_values(found[0])
    except _NonFinite:
        check_values(json.loads(data))  # parsed the lenient way, so that the walk says where the constant is
        raise AssertionError("unreachable: check_values refuses NaN and Infinity") from None
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise WorkflowError("malformed JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python will convert
        raise WorkflowError(f"malformed JSON: {exc}") from None
    return found


class _NonFinite(Exception):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_SPACE = re.compile(r"[ \t\n\r]*")


def _skip(text: str, at: int) -> int:
    """The index of the first character at or after `at` that is not JSON white space."""
    match = _SPACE.match(text, at)
    assert match is not None  # `*` matches the empty string too
    return match.end()


def _members(text: str) -> tuple[dict[str, Any], dict[str, str]] | None:
    """A top-level JSON object's members and each value's text; None when `text` is anything else."""
    at = _skip(text, 0)
    if text[at:at + 1] != "{":
        return None
    values: dict[str, Any] = {}
    texts: dict[str, str] = {}
    at = _skip(text, at + 1)
    while text[at:at + 1] != "}" or values:
        if text[at:at + 1] != '"':
            return None
        key, at = _DECODER.raw_decode(text, at)
        at = _skip(text, at)
        if text[at:at + 1] != ":":
            return None
        start = _skip(text, at + 1)
        values[key], at = _DECODER.raw_decode(text, start)
        texts[key] = text[start:at]
        at = _skip(text, at)
        if text[at:at + 1] != ",":
            break
        at = _skip(text, at + 1)
    if text[at:at + 1] != "}" or _skip(text, at + 1) != len(text):
        return None
    return values, texts


_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
# A table for bytes.translate: digits → "0", e and E → "e", "+" kept, anything else → " ".
_NUMBERS = bytes(48 if 48 <= c <= 57 else 101 if c in b"eE" else c if c == 43 else 32 for c in range(256))
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')


def _plain(text: bytes | str) -> bool:
    """True when JSON text cannot hold what `check_values` refuses, found by a few scans of the text in C
    rather than a walk over every parsed value (10,000 nodes: ≈2 ms instead of ≈25 ms).

    False means "look closer" (the walk decides), never "refused": an escaped quote or surrogate, a
    bracket inside a string or a long run of digits only sends the text the slow way. NaN and Infinity
    are refused by the parser's constant hook, not here.
    """
    if isinstance(text, str):
        try:
            text = text.encode("utf-8")  # a str may hold a lone surrogate itself: then the walk finds it
        except UnicodeEncodeError:
            return False
    if b'\\"' in text or _ESCAPED_SURROGATE.search(text):
        return False  # an escaped quote hides where strings end; an escaped surrogate may be a lone one
    digits = text.translate(_NUMBERS)
    if b"e00" in digits or b"e+00" in digits or b"0" * 200 in digits:
        return False  # a float that might overflow to infinity (exponent ≥ 10, or 200 digits)
    # Quotes and brackets only. Without escaped quotes, a string holding no bracket is two adjacent quotes,
    # dropped here; a quote left over (a string with a bracket in it) keeps the skeleton from emptying.
    skeleton = text.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    # Each pass takes away the innermost level of lists, then that of objects: at most two levels a pass, so
    # a skeleton gone within MAX_DEPTH / 2 passes is no deeper than MAX_DEPTH. (A deeper single-kind nesting
    # than MAX_DEPTH / 2 is left to the walk.)
    for _ in range(MAX_DEPTH // 2):
        if not skeleton:
            return True
        skeleton = skeleton.replace(b"[]", b"").replace(b"{}", b"")
    return not skeleton


def check_values(value: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH, non-finite numbers and lone surrogates, naming where.

    Iterative, so a deep value cannot exhaust the stack; strings are only encoded when not ASCII.
    Only once a value is refused is its place worked out (`_located`): the node and input it sits in.
    """
    try:
        _check_values(value)
    except WorkflowError as exc:
        raise _located(exc, value) from None


def _check_values(value: Any) -> None:
    _check_scalar(value, ())
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())] if isinstance(value, (dict, list)) else []
    push, isfinite = stack.append, math.isfinite
    while stack:
        item, path = stack.pop()
        if len(path) >= MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels at {where(path)}", "too_deep", path)
        is_dict = type(item) is dict
        for key, child in item.items() if is_dict else enumerate(item):
            kind = type(child)
            if kind is dict or kind is list:
                push((child, (*path, key)))
            elif (kind is float and not isfinite(child)) or (kind is str and not child.isascii()):
                _check_scalar(child, (*path, key))  # only then: most values need no path built
            if is_dict and type(key) is str and not key.isascii():
                _check_scalar(key, (*path, key))


def _check_scalar(value: Any, path: tuple[Any, ...]) -> None:
    if type(value) is float and not math.isfinite(value):
        raise _Refused(f"{where(path)}: {value} is not a finite number (JSON has no NaN or Infinity, "
                            "and 1e400 is out of range)", "non_finite_number", path)
    if type(value) is str and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused(f"{where(path)}: the text holds a lone surrogate (such as \\ud800), which is "
                           "not Unicode text", "invalid_text", path) from None


class _Refused(WorkflowError):
    def __init__(self, message: str, code: str, path: tuple[Any, ...]) -> None:
        super().__init__(message, code)
        self.path = path


def _located(exc: WorkflowError, root: Any) -> WorkflowError:
    """The refusal with the node and input the refused value sits in: `nodes/<id>/inputs/<input>/…`, in an API
    request's `workflow` too, or `<id>/inputs/<input>/…` in ComfyUI's API format."""
    path: tuple[Any, ...] = getattr(exc, "path", ())
    if path[:1] == ("workflow",) and isinstance(root, dict):
        path, root = path[1:], root["workflow"]
    node_id: Any = None
    inside: tuple[Any, ...] = ()
    if len(path) >= 2 and path[0] == "nodes":
        node_id, inside = path[1], path[2:]
    elif len(path) >= 2 and isinstance(root, dict) and isinstance(root.get(path[0]), dict) \
            and "class_type" in root[path[0]] and "format" not in root:
        node_id, inside = path[0], path[1:]
    if node_id is None:
        return WorkflowError(str(exc), exc.code)
    input_name = _printable(inside[1]) if len(inside) >= 2 and inside[0] == "inputs" else None
    return WorkflowError(str(exc), exc.code, _printable(node_id), input_name)


def _printable(key: Any) -> str:
    """A key as JSON can carry it: lone surrogates escaped (a refused key may hold one)."""
    return str(key).encode("utf-8", "backslashreplace").decode("utf-8")


def where(path: tuple[Any, ...]) -> str:
    """A key path for messages: `node '3' at inputs/seed`, or `ui/groups/0` outside the nodes."""
    # Keys come from the request: lone surrogates escaped, long ones cut, so the message prints anywhere.
    keys = [str(k)[:60].encode("utf-8", "backslashreplace").decode("utf-8") for k in path]
    if keys[:1] == ["workflow"]:  # an API request's body: {"workflow": {...}}
        keys = keys[1:]
    if len(keys) >= 2 and keys[0] == "nodes":
        return f"node {keys[1]!r}" + (f" at {'/'.join(keys[2:])}" if keys[2:] else "")
    if len(keys) > 12:
        keys = [*keys[:10], "…"]
    return "/".join(keys) or "the top level"


def load(path: str | Path, registry: Any = None) -> Any:
    """Read a workflow file (nodegraph, ComfyUI API or UI format, a PNG or WebP) into a nodegraph/1 dict.

    ComfyUI's UI format is converted with `registry` (its schemas give each type's widget order); without
    one it is returned as read, and validation converts it.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise WorkflowError(f"cannot read {path}: {exc.strerror or exc}", code="unreadable") from None
    return loads(raw, path, registry)


def loads(raw: bytes, name: str | Path = "the upload", registry: Any = None) -> Any:
    """A workflow from a file's bytes (nodegraph or ComfyUI JSON, or a PNG or WebP carrying one)."""
    if raw.startswith(PNG_SIGNATURE) or _is_webp(raw):
        return from_json(parse_png(raw, name), registry)
    return from_json(parse(raw), registry)


def _is_webp(raw: bytes) -> bool:
    return raw[:4] == b"RIFF" and raw[8:12] == b"WEBP"


def parse_png(raw: bytes, path: str | Path = "the PNG") -> Any:
    """The workflow embedded in a PNG's text chunks (a WebP's EXIF), parsed; a WorkflowError when there is none.

    Ours (`nodegraph`, or an older PNG's `workflow` in our format) first, else ComfyUI's API format
    (`prompt`), else its UI format (`workflow`).
    """
    kind = "WebP" if _is_webp(raw) else "PNG"
    chunks = webp_text(raw, path) if kind == "WebP" else png_text(raw, path)
    if not {OWN_CHUNK, "workflow", "prompt"} & chunks.keys():
        raise WorkflowError(f"{path} is a {kind} without an embedded workflow (only images written by "
                            "SaveImage or ComfyUI carry one)", code="no_workflow")
    try:
        if OWN_CHUNK in chunks:
            return parse(chunks[OWN_CHUNK])
        if "workflow" in chunks:
            value = parse(chunks["workflow"])
            # Ours, in a PNG written before the `nodegraph` chunk; or the only workflow there is.
            if "prompt" not in chunks or (isinstance(value, dict) and value.get("format") == FORMAT) \
                    or not _is_comfy_editor_format(value):
                return value
        return parse(chunks["prompt"])
    except WorkflowError as exc:
        raise WorkflowError(f"{path}: the workflow embedded in the {kind}: {exc}", exc.code, exc.node_id,
                            exc.input) from None


def webp_text(raw: bytes, path: str | Path = "the WebP") -> dict[str, str]:
    """ComfyUI's WebP metadata: EXIF text tags of the form `key:{json}` (SaveAnimatedWEBP puts `prompt:` in
    Model, `workflow:` in Make, further keys in the tags below), whichever tag holds them."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw), formats=["WEBP"]) as image:
            exif = image.getexif()
    except Exception as exc:  # as for PNGs: any failure means no workflow can be read
        raise WorkflowError(f"{path} is not a readable WebP ({type(exc).__name__}: {exc})",
                            code="no_workflow") from None
    found: dict[str, str] = {}
    for value in exif.values():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            key, colon, text = value.partition(":")
            if colon and key in (OWN_CHUNK, "workflow", "prompt"):
                found.setdefault(key, text.rstrip("\x00"))
    return found


def png_text(raw: bytes, path: str | Path = "the PNG") -> dict[str, str]:
    """A PNG's text chunks (tEXt, zTXt, iTXt) by keyword."""
    import io

    from PIL import Image  # imported here: the runtime itself stays free of heavy imports

    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as image:
            # Chunks before the image data are read on open; only when the workflow is not among
            # them is the whole image decoded to reach chunks after it (`text` does that).
            found = {k: v for k, v in image.info.items() if isinstance(v, str)}
            if OWN_CHUNK not in found and "workflow" not in found:
                found = dict(image.text)
    # Pillow reports a damaged PNG in many ways (SyntaxError, OSError, ValueError, zlib.error,
    # DecompressionBombError, …); each means the same here: no workflow can be read from it.
    except Exception as exc:
        raise WorkflowError(f"{path} is not a readable PNG ({type(exc).__name__}: {exc})",
                            code="no_workflow") from None
    return {str(key): str(value) for key, value in found.items()}


def _is_comfy_editor_format(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("nodes"), list) and "links" in value


def from_json(value: Any, registry: Any = None) -> Any:
    """Accept ComfyUI's API format by lowering it, its UI format by converting it with `registry` (a
    `Registry`); anything else is returned for validation."""
    if is_comfy_api(value):
        return lower_comfy_api(value)
    if registry is not None and _is_comfy_editor_format(value):
        from nodegraph.comfy_ui_format import to_graph  # it imports this module

        return to_graph(value, registry.get)
    return value


def save(workflow: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(dumps(workflow), encoding="utf-8")


def dumps(workflow: dict[str, Any]) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def is_comfy_api(value: Any) -> bool:
    """ComfyUI's API format: {"id": {"class_type": ..., "inputs": {...}}, ...}."""
    return (isinstance(value, dict) and "format" not in value and bool(value)
            and all(isinstance(v, dict) and "class_type" in v for v in value.values()))


def lower_comfy_api(value: dict[str, Any]) -> dict[str, Any]:
    """Our format from ComfyUI's API format: the same nodes and links, laid out left to right for the editor
    (the API format has no positions): a node's column is its depth in the graph, its row its order there."""
    nodes: dict[str, Any] = {}
    for node_id, node in value.items():
        entry: dict[str, Any] = {"type": node["class_type"], "inputs": node.get("inputs", {})}
        title = node.get("_meta", {}).get("title") if isinstance(node.get("_meta"), dict) else None
        if isinstance(title, str):
            entry["title"] = title
        nodes[str(node_id)] = entry
    rows: dict[int, int] = {}
    for node_id, depth in _depths(nodes).items():
        nodes[node_id]["ui"] = {"pos": [40 + 340 * depth, 40 + 260 * rows.get(depth, 0)]}
        rows[depth] = rows.get(depth, 0) + 1
    return {"format": FORMAT, "nodes": nodes, "ui": {}}


def _depths(nodes: dict[str, Any]) -> dict[str, int]:
    """Each node's longest distance from a node without links in; nodes on a cycle stay in column 0."""
    depth: dict[str, int] = {}
    for _ in range(len(nodes) + 1):  # relax until stable; a DAG settles within len(nodes) rounds
        changed = False
        for node_id, entry in nodes.items():
            inputs = entry["inputs"] if isinstance(entry["inputs"], dict) else {}
            sources = [v[0] for v in inputs.values()
                       if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] in nodes]
            new = min(len(nodes), max((depth.get(str(src), 0) + 1 for src in sources), default=0))
            if depth.get(node_id) != new:
                depth[node_id], changed = new, True
        if not changed:
            break
    return depth
