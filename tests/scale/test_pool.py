"""`serve --ray` behaviour on a local Ray cluster with two CPU workers: routing, events, cancel, faults."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'): the scale-out tests need it")

from nodegraph.cli import main  # noqa: E402
from nodegraph.executor import Executor  # noqa: E402
from nodegraph.registry import Registry  # noqa: E402
from nodegraph.scale.router import AffinityRouter  # noqa: E402
from nodegraph.settings import Settings  # noqa: E402
from tests.scale.conftest import MakePool, system_workers  # noqa: E402
from tests.server.conftest import WAIT, Client, connect, finished, queue, slow  # noqa: E402

LORA = json.loads((Path(__file__).parents[2] / "workflows" / "lora.json").read_text())


def sample(checkpoint: str, seed: int) -> dict[str, Any]:
    """A small job on `checkpoint`: its output is new (the seed), so it always samples."""
    return {"format": "nodegraph/1", "ui": {}, "nodes": {
        "1": {"type": "LoadCheckpoint", "inputs": {"checkpoint": checkpoint, "dtype": "fp32"}},
        "2": {"type": "Sample", "inputs": {"model": ["1", "model"], "prompt": "a fox", "seed": seed, "steps": 2,
                                           "width": 64, "height": 64}},
        "3": {"type": "PreviewImage", "inputs": {"images": ["2", "images"]}}}}


async def until_running_on(client: Client, job_id: str) -> dict[str, Any]:
    """The worker (from /api/system) once it runs `job_id`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        found = [w for w in await system_workers(client) if w["job_id"] == job_id and "pid" in w]
        if found:
            return found[0]
        assert loop.time() < deadline, f"job {job_id} never ran"
        await asyncio.sleep(0.05)


async def loads(client: Client) -> list[int]:
    workers = await system_workers(client)
    assert all("loads" in w for w in workers), json.dumps(workers)
    return [w["loads"] for w in workers]


async def routed(make_pool: MakePool, router: Any) -> list[int]:
    client = await make_pool(router=router)
    assert (await (await client.post("/api/free")).json())["freed"] is True  # nothing resident: loads count
    before = await loads(client)
    # Round-robin would start both workers on tiny-sd15, then load the other checkpoint on each.
    order = ["tiny-sd15", "tiny-sd15", "tiny-sd15.safetensors", "tiny-sd15.safetensors"]
    jobs = [await queue(client, sample(checkpoint, seed)) for seed, checkpoint in enumerate(order)]
    for job_id in jobs:
        assert (await finished(client, job_id))["status"] == "ok"
    return [after - start for after, start in zip(await loads(client), before, strict=True)]


async def test_two_checkpoints_load_once_per_worker_not_once_per_job(make_pool: MakePool) -> None:
    assert await routed(make_pool, AffinityRouter(max_backlog=99, max_wait=WAIT)) == [1, 1]


async def test_events_files_and_system_are_those_of_one_process(make_pool: MakePool) -> None:
    client = await make_pool()
    events = await connect(client, "client_id=editor")
    job_id = await queue(client, LORA, client_id="editor")
    done = await events.until(type="job_finished", job_id=job_id)
    assert done["status"] == "ok", done["errors"]
    assert [m["type"] for m in events.seen][:2] == ["job_queued", "job_started"]
    progress = [(m["node_id"], m["step"], m["total"]) for m in events.of("progress")]
    assert progress and progress[-1] == ("3", 4, 4)
    saved = next(m for m in events.of("node_finished") if m["node_id"] == "4")
    assert saved["files"] == done["files"] and len(done["files"]) == 2
    job = await (await client.get(f"/api/jobs/{job_id}")).json()
    assert job["status"] == "ok" and job["files"] == done["files"]
    response = await client.get(f"/api/outputs/{done['files'][0]}")  # written into the server's output folder
    assert response.status == 200 and response.headers["Content-Type"] == "image/png"
    workers = await system_workers(client)
    assert [w["index"] for w in workers] == [0, 1] and all(w["state"] == "idle" for w in workers)
    holder = next(w for w in workers if w["models"]["residents"])
    assert ["checkpoints", "tiny-sd15 [fp32]"] in holder["warm"] and holder["pid"] != os.getpid()


async def test_images_equal_those_of_one_process(make_pool: MakePool, registry: Registry, scale_settings: Settings,
                                                 tmp_path: Path) -> None:
    client = await make_pool()
    done = await finished(client, await queue(client, LORA))
    # A Ray worker with one CPU computes on one torch thread; so does the reference (other thread counts sum in
    # another order and move a few pixels by a level).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = Executor(registry, replace(scale_settings, output_dir=tmp_path / "alone")).run(LORA)
    finally:
        torch.set_num_threads(threads)
    assert done["status"] == alone.status == "ok" and len(done["files"]) == len(alone.files) == 2
    for ours, theirs in zip(done["files"], alone.files, strict=True):
        ray_pixels = np.asarray(Image.open(scale_settings.output_dir / ours))
        assert np.array_equal(ray_pixels, np.asarray(Image.open(theirs)))


async def test_models_status_lists_the_workers(make_pool: MakePool, capsys: pytest.CaptureFixture[str]) -> None:
    client = await make_pool()
    url = str(client.make_url("/"))
    assert await asyncio.to_thread(main, ["models", "status", "--url", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"server {url}"
    assert [line.split(":")[0] for line in lines if line.startswith("worker ")] == ["worker 0", "worker 1"]


async def test_cancel_a_pending_and_a_running_job(make_pool: MakePool) -> None:
    client = await make_pool()
    events = await connect(client, "all=1")
    running = [await queue(client, slow()) for _ in range(2)]
    pending = await queue(client, slow())
    for job_id in running:
        await events.until(type="progress", job_id=job_id)
    assert await (await client.post("/api/free")).json() == {"freed": False, "deferred": True}
    response = await client.delete(f"/api/jobs/{pending}")
    assert response.status == 200 and (await response.json())["status"] == "cancelled"
    for job_id in running:
        assert (await client.delete(f"/api/jobs/{job_id}")).status == 202
        assert (await events.until(type="job_finished", job_id=job_id))["status"] == "interrupted"
    assert (await finished(client, pending))["status"] == "cancelled"


async def test_a_killed_worker_loses_no_job(make_pool: MakePool) -> None:
    client = await make_pool()
    events = await connect(client, "all=1")
    victim = await queue(client, slow(steps=100, delay=0.02))
    bystander = await queue(client, slow(steps=100, delay=0.02))
    worker = await until_running_on(client, victim)
    await events.until(type="progress", job_id=victim)
    os.kill(worker["pid"], signal.SIGKILL)
    requeued = await events.until(type="job_requeued", job_id=victim)
    assert f"worker {worker['index']} died" in requeued["reason"]
    done = await events.until(type="job_finished", job_id=victim)
    assert done["status"] == "ok" and (await finished(client, bystander))["status"] == "ok"
    assert len(events.of("job_started", victim)) == 2
    assert (await system_workers(client))[worker["index"]]["restarts"] == 1


async def test_a_job_whose_worker_dies_twice_is_an_error(make_pool: MakePool) -> None:
    client = await make_pool()
    events = await connect(client, "all=1")
    job_id = await queue(client, slow())
    for attempt in (1, 2):
        await events.until(type="progress", job_id=job_id)
        worker = await until_running_on(client, job_id)
        os.kill(worker["pid"], signal.SIGKILL)
        if attempt == 1:
            await events.until(type="job_requeued", job_id=job_id)
    done = await events.until(type="job_finished", job_id=job_id)
    assert done["status"] == "error" and [e["code"] for e in done["errors"]] == ["worker_died"]
    assert "died 2 times" in done["errors"][0]["message"]
    assert (await finished(client, await queue(client, slow(steps=3))))["status"] == "ok"  # the others carry on


async def test_a_job_past_the_time_limit_restarts_its_worker(make_pool: MakePool) -> None:
    client = await make_pool(job_timeout=1.0)
    job_id = await queue(client, slow())
    done = await finished(client, job_id)
    assert done["status"] == "error" and [e["code"] for e in done["errors"]] == ["job_timeout"]
    assert sum(w["restarts"] for w in await system_workers(client)) == 1
    assert (await finished(client, await queue(client, slow(steps=3))))["status"] == "ok"

