"""Start-up of the commands that need no model loaded: `validate`, `nodes`, and `run`'s share, against a baseline.

    python bench/cold.py --startup [--repeats N] [--base REV] [--models-dir DIR] [--json]

Every measurement is a fresh `python -m nodegraph.cli …` process, spawn to exit, on the demo models (made once in a
temp dir unless `--models-dir` has them) with workflows/lora.json (LoadCheckpoint tiny-sd15 → LoadLoRA → Sample 4
steps 64×64 batch 2 → SaveImage); 1 torch thread, page cache warm, the best of `--repeats` (default 5), the cases
alternating with their baselines so that the shared machine's load falls on both alike.
  validate   `nodegraph validate workflows/lora.json` (its LoRA checks read safetensors headers only)
  nodes      `nodegraph nodes`
  run        `nodegraph run workflows/lora.json` (it imports the diffusion stack to sample, so it is not expected
             to change: it shows that nothing was lost)
The baseline is today's behaviour before commands paid only for what they use:
  default    the same command in a process that first imports torch, diffusers, transformers and peft, as
             `validate` did to check a LoRA against its model (`nodes` did not: for it, see --base)
  --base REV that revision of nodegraph/ and nodes/ (`git archive`, into a temp dir put first on PYTHONPATH), e.g.
             --base d7ee551, the commit before
Ratios: this tree / the baseline (below 1: faster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "lora.json"
FORCED = "import torch, diffusers, transformers, peft, runpy, sys; sys.argv[0] = 'nodegraph'; " \
         "runpy.run_module('nodegraph.cli', run_name='__main__')"


def commands(models: Path, out: Path) -> dict[str, list[str]]:
    common = ["--models-dir", str(models)]
    return {"validate": ["validate", str(WORKFLOW), *common],
            "nodes": ["nodes", *common],
            "run": ["run", str(WORKFLOW), *common, "--output-dir", str(out)]}


def timed(argv: list[str], pythonpath: str, cwd: Path) -> float:
    """Spawn → exit of `python ARGV`; run outside the checkout, so that PYTHONPATH alone says which tree it runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], env=env, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return seconds


def base_tree(rev: str, into: Path) -> Path:
    """nodegraph/ and nodes/ of `rev`, unpacked without touching the repository's worktrees or index."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "nodegraph", "nodes"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base", metavar="REV", help="compare with this git revision (default: forced imports)")
    parser.add_argument("--models-dir", type=Path, help="the demo models (default: made in a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    try:
        models = (args.models_dir or scratch / "models").resolve()
        if not (models / "checkpoints" / "tiny-sd15").is_dir():
            timed(["-m", "nodegraph.cli", "models", "demo", "--dir", str(models)], str(ROOT), scratch)
        ours = str(ROOT)
        if args.base:
            base, label = str(base_tree(args.base, Path(tempfile.mkdtemp(dir=scratch)))), f"nodegraph at {args.base}"
        else:
            base, label = ours, "torch, diffusers, transformers, peft imported first"
        figures: dict[str, dict[str, list[float]]] = {}
        for round_ in range(args.repeats):
            print(f"round {round_ + 1}/{args.repeats} …", file=sys.stderr, flush=True)
            for case, command in commands(models, scratch / "out").items():
                found = figures.setdefault(case, {"ours": [], "base": []})
                found["ours"].append(timed(["-m", "nodegraph.cli", *command], ours, scratch))
                base_argv = ["-m", "nodegraph.cli", *command] if args.base else ["-c", FORCED, *command]
                found["base"].append(timed(base_argv, base, scratch))
        report(figures, label, args.json)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def report(figures: dict[str, dict[str, list[float]]], label: str, as_json: bool) -> None:
    best = {case: {side: min(values) for side, values in sides.items()} for case, sides in figures.items()}
    print(f"spawn → exit, best of {len(figures['validate']['ours'])}, seconds; baseline: {label}")
    print(f"  {'command':10s} {'this tree':>10s} {'baseline':>10s} {'ratio':>8s}")
    for case, sides in best.items():
        print(f"  {case:10s} {sides['ours']:10.2f} {sides['base']:10.2f} {sides['ours'] / sides['base']:7.2f}×")
    if as_json:
        result: dict[str, Any] = {"baseline": label, "best": best, "all": figures,
                                  "ratio": {case: sides["ours"] / sides["base"] for case, sides in best.items()}}
        print(json.dumps(result))


if __name__ == "__main__":
    main()
