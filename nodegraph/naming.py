"""Numbered output files, `{name}_{counter:05}_.png` as ComfyUI names them, never overwriting one.

The counter starts one past the highest already in the folder, and a file is only ever created
exclusively, so two writers racing for the same counter both get a file of their own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO


def next_counter(folder: Path, name: str, suffix: str = ".png") -> int:
    """One past the highest counter among `{name}_{counter}_{suffix}` files already in `folder`."""
    pattern = re.compile(re.escape(name) + r"_(\d+)_" + re.escape(suffix))
    counters = (int(match.group(1)) for entry in os.scandir(folder) if (match := pattern.fullmatch(entry.name)))
    return max(counters, default=0) + 1


def create_numbered(folder: Path, name: str, counter: int, suffix: str = ".png") -> tuple[BinaryIO, Path, int]:
    """Open the first free `{name}_{counter:05}_{suffix}` from `counter` on; also returns the next counter."""
    while True:
        path = folder / f"{name}_{counter:05}_{suffix}"
        counter += 1
        try:
            # Exclusive create: never overwrite, even when another process took the same counter
            # after our scan; O_EXCL also refuses a symlink planted under that name.
            return open(path, "xb"), path, counter
        except FileExistsError:
            continue
