"""`nodegraph models demo | status`, and the options that build the model manager (`run`, `serve`, `models`)."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from nodegraph.cli_output import EXIT_INVALID, EXIT_OK, print_table
from nodegraph.models import ModelManager, format_bytes
from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodegraph.threads import parse_threads


def model_options() -> argparse.ArgumentParser:
    """--device and the memory budgets, shared by `run` and `serve`."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--device", default="auto", metavar="DEVICE",
                         help="auto (default: the first GPU, else the CPU), cpu, cuda, cuda:N or mps")
    options.add_argument("--vram-budget", metavar="SIZE",
                         help="GPU memory models may use: bytes (8G, 8000M, 8589934592) or a percentage of "
                              "the GPU's memory (default 90%%)")
    options.add_argument("--ram-budget", metavar="SIZE",
                         help="main memory models may use: bytes or a percentage of the RAM (default 50%%)")
    options.add_argument("--text-encoder-device", metavar="DEVICE",
                         help="where pipelines' text encoders live (default: --device's); cpu keeps T5 off the GPU")
    options.add_argument("--threads", default=os.environ.get("NODEGRAPH_THREADS", "auto"), metavar="N",
                         help="torch's intra-op threads: auto (default: 1 for small models, every core for large "
                              "ones) or N")
    return options


def model_manager(args: argparse.Namespace) -> ModelManager:
    return ModelManager(device=args.device, vram_budget=args.vram_budget, ram_budget=args.ram_budget,
                        text_encoder_device=args.text_encoder_device, threads=parse_threads(args.threads))


def cmd_models_demo(args: argparse.Namespace, registry: Registry, settings: Settings) -> int:
    """Model sets come from node packs (entry-point group nodegraph.model_sets), like nodes do."""
    makers = {ep.name: ep for ep in entry_points(group="nodegraph.model_sets")}
    if "demo" not in makers:
        print("error: no installed node pack provides the demo models", file=sys.stderr)
        return EXIT_INVALID
    root = Path(args.dir) if args.dir else settings.models_dirs[0]
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"writing the demo models into {root}: {message}", file=sys.stderr, flush=True)

    # The maker takes the input folder too, for its demo input image (LoadImage's `demo.png`), and hears
    # `say` if it takes one (the first write takes 10-40 s on 2 cores; later calls find the files there).
    maker = makers["demo"].load()
    takes_say = "say" in inspect.signature(maker).parameters
    for path in maker(root, args.seed, input_dir=settings.input_dir, **({"say": say} if takes_say else {})):
        print(path)
    print(f"demo models ready in {root} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return EXIT_OK


def cmd_models_status(args: argparse.Namespace, registry: Registry, settings: Settings) -> int:
    """The server's resident models (`GET /api/system`); without a server, this machine's devices and budgets."""
    import urllib.request  # (here: http.client and ssl cost the other commands 50 ms)

    request = urllib.request.Request(args.url.rstrip("/") + "/api/system")
    if args.token:
        request.add_header("Authorization", f"Bearer {args.token}")
    workers: list[dict[str, Any]] = []
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            system = json.load(response)
            status, source, workers = system["models"], f"server {args.url}", system.get("workers", [])
    except (OSError, ValueError, KeyError) as exc:
        status, source = model_manager(args).status(), f"this machine (no server at {args.url}: {exc})"
    if args.json:
        print(json.dumps({**status, "workers": workers} if workers else status, indent=2))
        return EXIT_OK
    print(source)
    for name, budget in status["budgets"].items():
        print(f"{name} budget on {budget['device']}: {format_bytes(budget['budget'])}, models up to "
              f"{format_bytes(budget['limit'])}, {format_bytes(budget['used'])} used")
    for cache in status.get("caches", []):  # counted in the budgets above; dropped before any model
        memory = ", ".join(f"{format_bytes(n)} {d}" for d, n in cache["bytes"].items()) or "0 B"
        print(f"{cache['name']} cache: {cache['entries']} entries, {memory}")
    rows = [(r["name"], r["device"] + (" (offloaded)" if r["offloaded"] else ""),
             ", ".join(f"{format_bytes(n)} {d}" for d, n in r["bytes"].items()) or "0 B",
             "in use" if r["locked"] else f"idle {r['idle_seconds']:.0f} s") for r in status["residents"]]
    rows = [row for r, resident in zip(rows, status["residents"], strict=True) for row in [r, *(
        ("  " + c["name"] + f" ({c['dtype']})", ", ".join(c["bytes"]) or "-",
         ", ".join(f"{format_bytes(n)} {d}" for d, n in c["bytes"].items()) or "0 B", "")
        for c in resident.get("components", []))]]
    print_table(("model", "device", "memory", "state"), rows)
    if not rows:
        print("no models resident")
    for worker in workers:  # serve --ray: each worker's own models
        residents = ", ".join(r["name"] for r in worker.get("models", {}).get("residents", [])) or "none"
        print(f"worker {worker['index']}: {worker['state']}, {worker.get('jobs', '?')} jobs, "
              f"{worker.get('loads', '?')} model loads, {worker['restarts']} restarts; resident: {residents}")
    return EXIT_OK
