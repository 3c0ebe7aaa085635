"""The thread policy's effect: one image through Sample with torch on 1 thread, on every core (torch's default),
and on the policy's choice (`auto`, nodegraph/threads.py), quiet and with the CPU loaded.

    python bench/threads.py                 # tiny demo SD1.5, 64×64, 8 steps: ≈1 min
    python bench/threads.py --size sd15     # full-size SD1.5 architecture, random weights, 256×256, 2 steps
    python bench/threads.py --json          # the figures as one JSON object on the last line

Options: `--repeats N` rounds (default 9 tiny, 3 sd15); `--models-dir DIR` keeps the generated models there
and reuses them; `--no-load` skips the loaded half. "loaded" runs one CPU-bound process per core beside the
benchmark (as on a shared CI machine or a desktop doing other work). One executor, its output cache cleared
before every run, the pipeline resident; the cases take turns (common.interleaved). × is the median of the
per-round ratios against torch's default (every core). The policy's target: never slower than the better of
1 and every core by more than 10 %, on both halves.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import common
from common import interleaved, median, ms, table, verdict
from sample import sample_graph

from nodegraph.threads import ThreadPolicy, machine_cores

SIZES = {"tiny": (64, 8, 9), "sd15": (256, 2, 3)}  # pixels, steps, rounds
TARGET = 1.10


def _spin() -> None:
    while True:
        pass


@contextmanager
def loaded(processes: int) -> Iterator[None]:
    """`processes` CPU-bound processes running while inside."""
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(processes)]
    for spinner in spinners:
        spinner.start()
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.terminate()
            spinner.join()


def measure(executor: Any, workflow: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    cores = machine_cores()
    policies = {"1 thread": ThreadPolicy(1), f"{cores} threads": ThreadPolicy(cores), "auto": ThreadPolicy()}

    def case(policy: ThreadPolicy) -> Any:
        def run() -> None:
            executor.models.threads = policy
            executor.cache.clear()
            result = executor.run(workflow)
            common.require(result.status == "ok", str(result.errors))
        return run

    return interleaved({name: case(policy) for name, policy in policies.items()}, rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--models-dir", default=None, help="keep generated models here (default: a temp dir)")
    parser.add_argument("--no-load", action="store_true", help="only the quiet half")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    pixels, steps, rounds = SIZES[args.size]
    cores = machine_cores()
    halves: dict[str, dict[str, list[float]]] = {}
    with common.models(args.size, args.models_dir) as models:
        from nodegraph.executor import Executor
        from nodegraph.registry import load_registry
        from nodegraph.settings import Settings

        executor = Executor(load_registry(), Settings(models_dirs=(models.root,)))
        workflow = sample_graph(models, pixels, steps, lora=True)
        workflow["nodes"]["ckpt"]["inputs"]["dtype"] = "fp32"
        executor.run(workflow)  # load once: the cases time sampling on a resident pipeline
        halves["quiet"] = measure(executor, workflow, args.repeats or rounds)
        if not args.no_load:
            with loaded(cores):
                halves["loaded"] = measure(executor, workflow, args.repeats or rounds)

    default = f"{cores} threads"
    figures: dict[str, Any] = {"size": args.size, "pixels": pixels, "steps": steps, "cores": cores,
                               "target": TARGET}
    lines: list[tuple[str, ...]] = [("half", *(f"{name} ms" for name in halves["quiet"]), "1 thread ×", "auto ×")]
    ok = True
    for half, times in halves.items():
        ratios = {name: median([t / d for t, d in zip(times[name], times[default], strict=True)]) for name in times}
        best = min(ratios.values())
        ok = ok and ratios["auto"] <= best * TARGET
        figures[half] = {**{f"{name} ms": median(t) * 1e3 for name, t in times.items()},
                         **{f"{name} ×": r for name, r in ratios.items()}}
        lines.append((half, *(ms(median(t)) for t in times.values()), f"{ratios['1 thread']:.2f}×",
                      f"{ratios['auto']:.2f}× {verdict(ratios['auto'] <= best * TARGET)}"))
    figures["ok"] = ok
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"Thread policy — {args.size}: Sample {pixels}×{pixels}, {steps} Euler steps, CFG 7, LoRA, fp32 CPU; "
          f"{args.repeats or rounds} interleaved rounds; × against torch's default ({default}); "
          f"loaded = {cores} CPU-bound processes beside it")
    print(common.machine())
    print(table(lines))
    print(f"auto within {TARGET:g}× of the better choice on every half: {verdict(ok)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
