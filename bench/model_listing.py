"""What listing a models folder costs: a fresh walk, a cached (unchanged) listing, and a folder linking to `/`.

    python bench/model_listing.py [--files 5000] [--folders 250] [--rounds 20]

A LoRA folder of `--files` files in `--folders` subfolders (mtimes set in the past, as a tree not touched for a
while) is listed once cold (walked) and then `--rounds` times unchanged (each folder stat'ed, nothing read);
then a link to `/` is added and the listing is timed again (bounded: it stops at `MAX_ENTRIES`). Prints
the times and the ratio of a walk to a cached listing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from nodegraph import model_listing
from nodegraph.model_listing import list_folder

PAST = 1_600_000_000


def _timed(base: Path) -> tuple[float, int, str | None]:
    started = time.perf_counter()
    names, note = list_folder(base)
    return time.perf_counter() - started, len(names), note


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--folders", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        base = Path(temp) / "models" / "loras"
        for i in range(args.files):
            path = base / f"set{i % args.folders:04}" / f"lora{i:06}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        for folder, _, _ in os.walk(base):
            os.utime(folder, (PAST, PAST))
        walk, count, _ = _timed(base)
        cached = statistics.median(_timed(base)[0] for _ in range(args.rounds))
        print(f"{count} files in {args.folders + 1} folders: walk {walk * 1e3:.1f} ms, "
              f"unchanged {cached * 1e3:.2f} ms (median of {args.rounds}); walk / cached {walk / cached:.0f}×")
        (base / "everything").symlink_to("/", target_is_directory=True)
        os.utime(base, (PAST, PAST))
        model_listing.forget()
        root, count, note = _timed(base)
        again = statistics.median(_timed(base)[0] for _ in range(args.rounds))
        print(f"with a link to /: first listing {root * 1e3:.0f} ms ({count} names; {note}), "
              f"then {again * 1e3:.2f} ms (median of {args.rounds}, re-checked every "
              f"{model_listing.RECHECK_TRUNCATED:g} s)")


if __name__ == "__main__":
    main()
