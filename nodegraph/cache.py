"""The content-addressed output cache: an LRU bounded by bytes.

Keys are sha256 digests over what determines a node's outputs (see `node_key`), never node
ids, so renumbering a workflow or running it again finds the same entries. The cache holds
plain values, recipes and images; live models belong to the model manager, never here.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_BUDGET = 2 * 1024**3


@dataclass(frozen=True)
class Entry:
    outputs: dict[str, Any]
    files: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # files the outputs refer to (`Context.needs_file`): gone, the entry is not used


class OutputCache:
    def __init__(self, max_bytes: int = DEFAULT_BUDGET) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[Entry, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Entry | None:
        item = self._entries.get(key)
        if item is None or (item[0].needs and not all(os.path.exists(p) for p in item[0].needs)):
            return None
        self._entries.move_to_end(key)
        return item[0]

    def put(self, key: str, entry: Entry) -> None:
        size = nbytes(entry.outputs)
        if size > self.max_bytes:
            return  # larger than the whole cache: keeping it would evict everything else
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1]
        self._entries[key] = (entry, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def nbytes(value: Any) -> int:
    """Approximate memory held by a value: tensors and arrays by their buffers, containers summed."""
    kind = type(value)
    if kind in _SCALARS:
        return sys.getsizeof(value)
    if kind is dict:  # every node's outputs: a loop, with plain values sized in place
        total = sys.getsizeof(value)
        for k, v in value.items():
            total += sys.getsizeof(k) + sys.getsizeof(v) if type(v) in _SCALARS else nbytes(k) + nbytes(v)
        return total
    size = getattr(value, "nbytes", None)
    if isinstance(size, int):
        return size
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(nbytes(k) + nbytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sys.getsizeof(value) + sum(nbytes(v) for v in value)
    return sys.getsizeof(value)


_SCALARS = frozenset({int, float, str, bool, type(None)})
# One encoder for every key: json.dumps with options builds a new encoder per call (~3 µs).
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(value: Any) -> str:
    return _ENCODER.encode(value)


def node_key(node_type: str, version: str, literals_json: str, upstream: dict[str, str],
             files: Sequence[Path] = ()) -> str:
    """The content address of a node's outputs.

    `literals_json` is the canonical JSON of its literal inputs; `upstream` maps each linked input
    to the key of the producing node plus the output name; `files` are the files the node reads,
    fingerprinted by path, size and modification time.
    """
    links = [f"{name}={key}" for name, key in sorted(upstream.items())]
    return keyed(key_prefix(node_type, version, literals_json), links, files)


def key_prefix(node_type: str, version: str, literals_json: str) -> str:
    """The part of a node's key that its step alone fixes (the executor computes it once per graph)."""
    return "\x00".join((node_type, version, literals_json))


def keyed(prefix: str, links: list[str], files: Sequence[Path] = ()) -> str:
    """`node_key` from its prefix and its links as `name=upstream_key/output`, sorted by input name."""
    parts = [prefix, *links]
    if files:
        parts += [file_fingerprint(path) for path in files]
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def file_fingerprint(path: Path) -> str:
    """Path, size and mtime of a file, or of every file in a folder (a diffusers checkpoint)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = [path]
    out = []
    for file in files:
        try:
            stat = os.stat(file)
            out.append(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
        except OSError:
            out.append(f"{file}:missing")
    return "|".join(out)
