"""Numbered output files, `{name}_{counter:05}_.png` as ComfyUI names them, never overwriting one.

The counter starts one past the highest already in the folder, and a name is only ever taken exclusively
(a file created with O_EXCL, a finished file hard-linked, a folder made), so two writers racing for the
same counter both get a name of their own. SaveImage's PNGs, the sweep grids, and SaveCheckpoint's and
SaveLoRA's `.safetensors` files and folders are all named here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")


def next_counter(folder: Path, name: str, suffix: str = ".png") -> int:
    """One past the highest counter among `{name}_{counter}_{suffix}` entries already in `folder`."""
    pattern = re.compile(re.escape(name) + r"_(\d+)_" + re.escape(suffix))
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 1
    counters = (int(match.group(1)) for entry in entries if (match := pattern.fullmatch(entry.name)))
    return max(counters, default=0) + 1


def claim_numbered(folder: Path, name: str, counter: int, suffix: str,
                   claim: Callable[[Path], T]) -> tuple[T, Path, int]:
    """`claim(path)` on the first `{name}_{counter:05}_{suffix}` from `counter` on where it does not raise
    FileExistsError; returns what it returned, the path, and the next counter."""
    while True:
        path = folder / f"{name}_{counter:05}_{suffix}"
        counter += 1
        try:
            return claim(path), path, counter
        except FileExistsError:
            continue


def create_numbered(folder: Path, name: str, counter: int, suffix: str = ".png") -> tuple[BinaryIO, Path, int]:
    """Open the first free `{name}_{counter:05}_{suffix}` from `counter` on; also returns the next counter."""
    # Exclusive create: never overwrite, even when another process took the same counter after our scan;
    # O_EXCL also refuses a symlink planted under that name.
    return claim_numbered(folder, name, counter, suffix, lambda path: open(path, "xb"))


def link_numbered(finished: Path, folder: Path, name: str, suffix: str) -> Path:
    """Hard-link a finished file (written under a temporary name in `folder`) to the first free numbered name:
    a reader never sees it half-written, and a link never replaces a file."""
    return claim_numbered(folder, name, next_counter(folder, name, suffix), suffix,
                          lambda path: os.link(finished, path))[1]


def move_numbered(finished: Path, folder: Path, name: str, suffix: str = "") -> Path:
    """Rename a finished folder (built under a temporary name in `folder`) to the first free numbered name."""

    def claim(path: Path) -> None:
        os.mkdir(path)  # the reservation: fails if the name is taken
        os.rename(finished, path)  # replaces only the empty folder just made

    return claim_numbered(folder, name, next_counter(folder, name, suffix), suffix, claim)[1]
