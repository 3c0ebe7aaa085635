"""ComfyUI's API on nodegraph: `POST /prompt` → `execution_start` on an idle server, and `GET /object_info`.

    python bench/comfy_api.py [--runs 31] [--json]

A real aiohttp server on 127.0.0.1 with every built-in node (what `nodegraph serve` loads), an empty models
folder. Phases, each the median of `--runs` (`time.perf_counter`, garbage collected before each):
  POST /prompt            a 4-node Int → Math → Math → Show prompt in ComfyUI's API format, sending the body
                          to reading the answer (parse, lenient lowering, validation, store insert with its
                          fsync).
  /prompt → start         the same, up to `execution_start` for that prompt on `/ws?clientId=bench` (claimed
                          by the worker, re-validated, planned). The server is idle again before each run.
  GET /object_info        every node type in ComfyUI's shape, model folders listed.
Targets (issue "Speak ComfyUI at the boundary"): /prompt → execution_start ≤ 5 ms, /object_info ≤ 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from nodegraph.executor import Executor
from nodegraph.registry import load_registry
from nodegraph.server.app import create_app, settle
from nodegraph.server.state import ServerConfig
from nodegraph.settings import Settings

START_S, OBJECT_INFO_S = 0.005, 0.020


def prompt(value: int) -> dict[str, Any]:
    return {"1": {"class_type": "Int", "inputs": {"value": value}},
            "2": {"class_type": "Math", "inputs": {"a": ["1", 0], "b": 4, "op": "add"}},
            "3": {"class_type": "Math", "inputs": {"a": ["2", 0], "b": 2, "op": "multiply"}},
            "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}


def require(ok: bool, message: str) -> None:
    if not ok:
        raise SystemExit(f"comfy_api: {message}")


async def phases(root: Path, runs: int) -> dict[str, float]:
    settings = Settings(models_dirs=(root / "models",), output_dir=root / "out", input_dir=root / "in")
    app = create_app(Executor(load_registry([]), settings), ServerConfig(root / "data", root / "workflows"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    settle()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    posts, starts, infos = [], [], []
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{base}/ws?clientId=bench") as ws:
            require((await ws.receive_json())["type"] == "status", "no status message on connect")

            async def until(kind: str, prompt_id: str, **data: Any) -> None:
                while True:
                    message = await ws.receive_json(timeout=60)
                    if message["type"] == kind and message["data"].get("prompt_id") == prompt_id \
                            and all(message["data"].get(k) == v for k, v in data.items()):
                        return

            for i in range(runs + 1):  # the first run warms up (imports, the first validation)
                body = json.dumps({"prompt": prompt(i), "client_id": "bench"}).encode()
                gc.collect()
                t0 = time.perf_counter()
                async with session.post(f"{base}/prompt", data=body) as response:
                    answer = await response.json()
                    posted = time.perf_counter() - t0
                require(response.status == 200, f"POST /prompt: {response.status} {answer}")
                await until("execution_start", answer["prompt_id"])
                started = time.perf_counter() - t0
                await until("executing", answer["prompt_id"], node=None)  # idle again
                if i:
                    posts.append(posted)
                    starts.append(started)
            for i in range(runs + 1):
                gc.collect()
                t0 = time.perf_counter()
                async with session.get(f"{base}/object_info") as response:
                    info = await response.json()
                elapsed = time.perf_counter() - t0
                require(response.status == 200 and "KSampler" in info, "GET /object_info failed")
                if i:
                    infos.append(elapsed)
    finally:
        await runner.cleanup()
    return {"post_prompt_s": statistics.median(posts), "prompt_to_execution_start_s": statistics.median(starts),
            "object_info_s": statistics.median(infos), "object_info_nodes": float(len(info))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=31, help="timed runs per phase (median)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        figures = asyncio.run(phases(Path(folder), args.runs))
    print(f"ComfyUI's API on nodegraph — Python {platform.python_version()}, {platform.system()} "
          f"{platform.machine()}; median of {args.runs} runs")
    print()
    for label, key in (("POST /prompt (answer)", "post_prompt_s"),
                       ("POST /prompt → execution_start", "prompt_to_execution_start_s"),
                       (f"GET /object_info ({int(figures['object_info_nodes'])} nodes)", "object_info_s")):
        print(f"  {label:<36} {figures[key] * 1e3:8.2f} ms")
    print()
    start_ok = figures["prompt_to_execution_start_s"] <= START_S
    info_ok = figures["object_info_s"] <= OBJECT_INFO_S
    print(f"/prompt → execution_start ≤ {START_S * 1e3:g} ms: {'PASS' if start_ok else 'MISS'}; "
          f"/object_info ≤ {OBJECT_INFO_S * 1e3:g} ms: {'PASS' if info_ok else 'MISS'}")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
