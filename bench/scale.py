"""Jobs/s and model loads on Ray workers: 1 vs 2 workers, affinity routing vs round-robin, in one run.

    python bench/scale.py [--jobs 24] [--seed 0] [--json]

A mixed workload of two checkpoints (the demo SD1.5 model as a diffusers folder and as a single
file: two residents) and four LoRAs, in a seeded random order, runs through `RayPool` on a local
Ray runtime (CPU workers, one per core) three times: 1 worker, 2 workers with affinity routing, 2
workers with round-robin. Workers free their models between runs, so each starts cold. Prints
jobs/s, model loads and LoRA switches per run, the ratios against 1 worker and against round-robin,
and the measured cost of a model load and of a LoRA switch (the README's throughput model uses them).
Last, the store on its own: how many jobs/s the SQLite queue can take through add, claim and finish
(each a committed, fsync'd transaction), the ceiling of one server whatever the number of workers.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common  # noqa: F401  (quiets the libraries, makes HF_HUB_OFFLINE=1)
import ray

from nodegraph.registry import load_registry
from nodegraph.scale import cluster
from nodegraph.scale.pool import RayPool
from nodegraph.scale.router import AffinityRouter, RoundRobin, Router
from nodegraph.settings import Settings
from nodegraph.store import PENDING, RUNNING, Store

CHECKPOINTS = ("tiny-sd15", "tiny-sd15.safetensors")
LORAS = ("tiny-sd15-style", "tiny-sd15-kohya", "tiny-sd15-subset", "tiny-sd15-rank8")


def job(checkpoint: str, lora: str, seed: int) -> dict[str, Any]:
    return {"format": "nodegraph/1", "ui": {}, "nodes": {
        "1": {"type": "LoadCheckpoint", "inputs": {"checkpoint": checkpoint, "dtype": "fp32"}},
        "2": {"type": "LoadLoRA", "inputs": {"model": ["1", "model"], "lora": f"{lora}.safetensors",
                                             "strength": 0.8, "slot": "style"}},
        "3": {"type": "Sample", "inputs": {"model": ["2", "model"], "prompt": "a fox", "seed": seed, "steps": 2,
                                           "width": 64, "height": 64}},
        "4": {"type": "PreviewImage", "inputs": {"images": ["3", "images"]}}}}


def workload(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [job(rng.choice(CHECKPOINTS), rng.choice(LORAS), 1000 + i) for i in range(count)]


def totals(actors: list[Any]) -> dict[str, float]:
    statuses = ray.get([actor.status.remote() for actor in actors])
    return {key: sum(s[key] for s in statuses) for key in ("loads", "load_seconds", "switches", "reconcile_seconds")}


def run(name: str, actors: list[Any], router: Router, jobs: list[dict[str, Any]], registry: Any,
        data: Path) -> dict[str, Any]:
    assert all(ray.get([actor.free.remote() for actor in actors])), "workers busy"
    before = totals(actors)
    store = Store(data / name)
    pool = RayPool(store, lambda client, message: None, actors, registry, router=router)
    done = threading.Event()
    started = time.perf_counter()
    for workflow in jobs:
        store.add(workflow)
    pool.start()
    pool.wake()
    while store.counts() != {PENDING: 0, RUNNING: 0}:
        done.wait(0.05)
    seconds = time.perf_counter() - started
    pool.stop()
    statuses = [job.status for job in store.history(limit=len(jobs))[0]]
    store.close()
    assert statuses == ["ok"] * len(jobs), statuses
    after = totals(actors)
    used = {key: after[key] - before[key] for key in after}
    return {"name": name, "workers": len(actors), "seconds": round(seconds, 3),
            "jobs_per_s": round(len(jobs) / seconds, 3), "loads": int(used["loads"]),
            "switches": int(used["switches"]), "load_seconds": used["load_seconds"],
            "reconcile_seconds": used["reconcile_seconds"]}


def store_jobs_per_s(folder: Path, count: int = 300) -> float:
    """Jobs/s through the store alone: add, claim, finish (a small workflow and record, as a real job's)."""
    store = Store(folder)
    workflow = job(CHECKPOINTS[0], LORAS[0], 1)
    record = {"nodes": {}, "files": ["ComfyUI_00001_.png"], "errors": []}
    started = time.perf_counter()
    for _ in range(count):
        added = store.add(workflow)
        claimed = store.claim(added.id)
        assert claimed is not None
        store.finish(claimed.id, "ok", record)
    seconds = time.perf_counter() - started
    store.close()
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args()
    with common.models("tiny", None) as models, tempfile.TemporaryDirectory() as tmp:
        settings = Settings(models_dirs=(models.root,), output_dir=Path(tmp) / "outputs", input_dir=Path(tmp))
        registry = load_registry()
        cluster.connect(None, num_cpus=2)
        actors = cluster.spawn(2, settings, [], {"device": "cpu"})
        jobs = workload(args.jobs, args.seed)
        # A warm-up job per worker: the first job in a process pays one-off imports, not a model load.
        run("warm-up", actors, RoundRobin(), workload(2, args.seed + 1), registry, Path(tmp))
        runs = [run("1 worker", actors[:1], AffinityRouter(), jobs, registry, Path(tmp)),
                run("2 workers, affinity", actors, AffinityRouter(), jobs, registry, Path(tmp)),
                run("2 workers, round-robin", actors, RoundRobin(), jobs, registry, Path(tmp))]
        ray.shutdown()
        store_rate = store_jobs_per_s(Path(tmp) / "store")
    one, affinity, robin = runs
    loads = sum(r["loads"] for r in runs)
    switches = sum(r["switches"] for r in runs)
    result = {"jobs": args.jobs, "runs": runs,
              "affinity_vs_1_worker": round(affinity["jobs_per_s"] / one["jobs_per_s"], 3),
              "affinity_vs_round_robin": round(affinity["jobs_per_s"] / robin["jobs_per_s"], 3),
              "seconds_per_load": round(sum(r["load_seconds"] for r in runs) / max(loads, 1), 3),
              "seconds_per_switch": round(sum(r["reconcile_seconds"] for r in runs) / max(switches, 1), 4),
              "store_jobs_per_s": round(store_rate, 1)}
    for r in runs:
        print(f"{r['name']:24} {r['jobs_per_s']:6.2f} jobs/s  {r['loads']:3d} model loads  "
              f"{r['switches']:3d} LoRA switches  ({r['seconds']:.1f} s)")
    print(f"2 workers with affinity: {result['affinity_vs_1_worker']}x 1 worker, "
          f"{result['affinity_vs_round_robin']}x round-robin; a model load {result['seconds_per_load']} s, "
          f"a LoRA switch {result['seconds_per_switch']} s")
    print(f"the SQLite store alone: {result['store_jobs_per_s']} jobs/s (add, claim, finish)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
