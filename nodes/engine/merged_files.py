"""MergeLoRA's files: where they live and how long they stay.

MergeLoRA writes each merge once, named by a hash of its inputs (`lora_merge.merged_path`), into
`<first models folder>/.nodegraph-merged/`. Unbounded, a sweep over merge weights would fill the disk, so
after each new merge `prune` keeps the folder within a count and a byte budget (`NODEGRAPH_MERGED_FILES`,
default 32; `NODEGRAPH_MERGED_MB`, default 8192), least recently used first. A use is MergeLoRA returning the
file (`touch` sets its access time; its modification time, part of the recipe's fingerprint, stays). Never
deleted: a file a resident pipeline's recipe holds (a live or fused slot: a rebuild reloads it), and the
file just made.

A job queued or run later that would reuse a cached MergeLoRA output whose file is gone does not: MergeLoRA
declares the file (`Context.needs_file`), so the executor runs it again, which writes the same file again
(same inputs, same bytes, same name); recipes downstream name that path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FOLDER = ".nodegraph-merged"
PATTERN = "merged-*.safetensors"


def folder(models_dir: Path | str) -> Path:
    return Path(models_dir) / FOLDER


def limits() -> tuple[int, int]:
    """(files, bytes) the folder may hold, from the environment."""
    return (int(os.environ.get("NODEGRAPH_MERGED_FILES", "32")),
            int(os.environ.get("NODEGRAPH_MERGED_MB", "8192")) << 20)


def touch(path: Path) -> None:
    """Mark a use: the access time is the LRU order (the modification time is left as it is)."""
    try:
        os.utime(path, (time.time(), path.stat().st_mtime))
    except FileNotFoundError:
        pass


def in_use(models: Any) -> set[str]:
    """Paths of every LoRA file the resident pipelines' recipes hold (any part, live or fused)."""
    from nodes.engine.recipe import Adapter
    from nodes.engine.resident import Resident

    held: set[str] = set()
    for entry in models.resident() if models is not None else ():
        for part in entry.value.parts.values() if isinstance(entry.value, Resident) else ():
            held.update(str(Path(op.path).resolve()) for op in part.applied.ops if isinstance(op, Adapter))
    return held


def prune(where: Path, keep: Iterable[str], max_files: int, max_bytes: int) -> list[Path]:
    """Delete the least recently used merged files until at most `max_files` files and `max_bytes` bytes
    remain, never one in `keep` (resolved paths); returns what was deleted."""
    kept = {str(Path(p).resolve()) for p in keep}
    files = []
    for path in where.glob(PATTERN):
        try:
            stat = path.stat()
        except FileNotFoundError:  # another process pruned it meanwhile
            continue
        files.append((stat.st_atime, stat.st_size, path))
    files.sort(key=lambda item: item[0])
    count, total = len(files), sum(size for _, size, _ in files)
    deleted = []
    for _, size, path in files:
        if count <= max_files and total <= max_bytes:
            break
        if str(path.resolve()) in kept:
            continue
        path.unlink(missing_ok=True)
        deleted.append(path)
        count, total = count - 1, total - size
    return deleted
