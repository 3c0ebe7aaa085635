"""How long the server's event loop is held while a job with a huge workflow is read back.

    python bench/server_readback.py [--nodes 200000] [--reads 5]

A finished job whose workflow has `--nodes` nodes (≈12.5 MB of JSON at 200 000) is read back with
`GET /api/jobs/{id}` again and again, while `GET /api/system` is asked every 20 ms: its latency is
how long any request waits. For comparison, the cost of what the handler did before (parse the
stored workflow, encode the whole job on the event loop) is timed directly. Prints the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from nodegraph.executor import Executor
from nodegraph.registry import load_registry
from nodegraph.server.app import create_app
from nodegraph.server.state import ServerConfig
from nodegraph.settings import Settings
from nodegraph.store import Store


def big_workflow(nodes: int) -> dict[str, Any]:
    graph = {str(i): {"type": "Int", "inputs": {"value": i}, "ui": {"pos": [i, 10]}} for i in range(nodes)}
    return {"format": "nodegraph/1", "nodes": graph, "ui": {}}


def stored_job(data_dir: Path, workflow: dict[str, Any]) -> tuple[str, int, float]:
    """A finished job holding `workflow`; its id, stored size, and the old handler's time to answer it."""
    store = Store(data_dir)
    try:
        job = store.add(workflow)
        store.claim()
        store.finish(job.id, "ok", {"nodes": {}, "files": [], "errors": []})
        finished = store.get(job.id)
        assert finished is not None
        start = time.perf_counter()
        json.dumps({**finished.to_json(with_workflow=False), "workflow": json.loads(finished.workflow_json)})
        return job.id, len(finished.workflow_json), time.perf_counter() - start
    finally:
        store.close()


async def measure(base: str, job_id: str, reads: int) -> tuple[list[float], list[float], list[float]]:
    async with aiohttp.ClientSession() as session:

        async def timed(path: str) -> float:
            start = time.perf_counter()
            async with session.get(base + path) as response:
                await response.read()
                assert response.status == 200, path
            return time.perf_counter() - start

        idle = [await timed("/api/system") for _ in range(20)]
        reading = True

        async def read_back() -> list[float]:
            nonlocal reading
            try:
                return [await timed(f"/api/jobs/{job_id}") for _ in range(reads)]
            finally:
                reading = False

        async def poll() -> list[float]:
            latencies = []
            while reading:
                latencies.append(await timed("/api/system"))
                await asyncio.sleep(0.02)
            return latencies

        reads_s, during = await asyncio.gather(read_back(), poll())
        return idle, reads_s, during


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200_000)
    parser.add_argument("--reads", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        job_id, size, old_s = stored_job(root / "data", big_workflow(args.nodes))
        app = create_app(Executor(load_registry([]), Settings(models_dirs=(root / "models",), output_dir=root / "out")),
                         ServerConfig(data_dir=root / "data", workflows_dir=root / "workflows"))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            idle, reads_s, during = await measure(f"http://127.0.0.1:{port}", job_id, args.reads)
        finally:
            await runner.cleanup()
    print(f"workflow: {args.nodes} nodes, {size / 1e6:.1f} MB stored; {args.reads} read-backs of the job")
    print(f"GET /api/jobs/ID: median {statistics.median(reads_s) * 1000:.0f} ms per read")
    print(f"old handler (parse + encode on the loop): {old_s * 1000:.0f} ms of event loop held per read")
    print(f"GET /api/system while reading: median {statistics.median(during) * 1000:.1f} ms, "
          f"max {max(during) * 1000:.1f} ms over {len(during)} requests (idle: median "
          f"{statistics.median(idle) * 1000:.1f} ms)")
    print(f"ratio, old loop hold / worst /api/system wait now: {old_s / max(during):.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
