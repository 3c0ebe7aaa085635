"""Nodes, models, validation, system and free, and the OpenAPI document against the app's routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodegraph import model_listing
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.server.app import create_app
from nodegraph.server.openapi import document
from nodegraph.server.state import STORE, ServerConfig
from nodegraph.settings import Settings
from tests.server.conftest import Client, connect, finished, queue, show, slow, wf


async def test_nodes_is_the_catalog_with_choices_current_at_request_time(
        client: Client, registry: Registry, settings: Settings) -> None:
    catalog = await (await client.get("/api/nodes")).json()
    assert catalog == registry.catalog(settings)
    (settings.models_dirs[0] / "loras").mkdir(parents=True)
    (settings.models_dirs[0] / "loras" / "new.safetensors").write_bytes(b"")
    lora_input = next(i for i in (await (await client.get("/api/nodes")).json())["nodes"]["LoadLoRA"]["inputs"]
                      if i["name"] == "lora")
    assert "new.safetensors" in lora_input["choices"]


async def test_models_lists_files_of_a_kind(client: Client, settings: Settings) -> None:
    root = settings.models_dirs[0]
    (root / "checkpoints" / "folder-model").mkdir(parents=True)
    (root / "checkpoints" / "folder-model" / "model_index.json").write_text("{}")
    (root / "checkpoints" / "one.safetensors").write_bytes(b"")
    (root / "checkpoints" / "notes.txt").write_text("")
    assert await (await client.get("/api/models/checkpoints")).json() == {
        "kind": "checkpoints", "files": ["folder-model", "one.safetensors"]}
    assert await (await client.get("/api/models/loras")).json() == {"kind": "loras", "files": []}
    response = await client.get("/api/models/secrets")
    assert response.status == 404 and (await response.json())["errors"][0]["code"] == "unknown_model_kind"


async def test_validate_returns_every_problem(client: Client) -> None:
    ok = await (await client.post("/api/validate", json={"workflow": show(1)})).json()
    assert ok == {"ok": True, "errors": []}
    bad = await (await client.post("/api/validate", json={"workflow": wf({"1": {"type": "Show"}})})).json()
    assert bad == {"ok": False, "errors": [{"node_id": "1", "input": "value", "code": "missing_input",
                                            "message": "Show needs 'value' (*)"}]}
    response = await client.post("/api/validate", json={"nope": 1})
    assert response.status == 400


async def test_sizes_too_large_for_the_device_are_refused_when_validated_and_queued(client: Client) -> None:
    huge = wf({"1": {"type": "LoadCheckpoint", "inputs": {"checkpoint": "any"}},
               "2": {"type": "Sample", "inputs": {"model": ["1", 0], "width": 8192, "height": 8192,
                                                  "batch_size": 64}},
               "3": {"type": "Show", "inputs": {"value": ["2", 0]}}})
    found = (await (await client.post("/api/validate", json={"workflow": huge})).json())["errors"]
    assert ("2", "too_large") in {(e["node_id"], e["code"]) for e in found}
    response = await client.post("/api/jobs", json={"workflow": huge})
    assert response.status == 400
    assert ("2", "too_large") in {(e["node_id"], e["code"]) for e in (await response.json())["errors"]}


async def test_system_reports_versions_models_and_queue(client: Client) -> None:
    await finished(client, await queue(client, show(1)))
    system = await (await client.get("/api/system")).json()
    assert {"python", "nodegraph", "aiohttp"} <= set(system["versions"])
    assert system["queue"] == {"pending": 0, "running": 0}
    assert isinstance(system["models"], dict) and system["cache"]["entries"] == 1


async def test_a_models_folder_past_the_listing_bound_is_reported_in_system(
        client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_listing, "MAX_ENTRIES", 10)
    loras = settings.models_dirs[0] / "loras"
    for name in [f"a/{i:02}.safetensors" for i in range(20)] + ["b/never-read.safetensors"]:
        (loras / name).parent.mkdir(parents=True, exist_ok=True)
        (loras / name).write_bytes(b"")
    try:
        assert (await (await client.get("/api/system")).json())["model_folders"] == {"truncated": []}
        files = (await (await client.get("/api/models/loras")).json())["files"]
        assert len(files) == 20 and "b/never-read.safetensors" not in files  # a/ read whole, then the bound
        report = (await (await client.get("/api/system")).json())["model_folders"]["truncated"]
        assert report == [{"code": "listing_truncated", "folder": str(loras), "reason": "over 10 entries"}]
    finally:
        model_listing.forget()


async def test_free_clears_the_cache_now_when_idle_and_after_the_running_job_otherwise(client: Client) -> None:
    await finished(client, await queue(client, show(1)))
    assert await (await client.post("/api/free")).json() == {"freed": True, "deferred": False}
    assert (await (await client.get("/api/system")).json())["cache"]["entries"] == 0

    events = await connect(client)
    running = await queue(client, slow(), client_id="me")
    await events.until(type="progress", job_id=running)
    assert await (await client.post("/api/free")).json() == {"freed": False, "deferred": True}
    await client.delete(f"/api/jobs/{running}")
    await events.until(type="job_finished", job_id=running)
    after = await finished(client, await queue(client, show(1)))
    assert after["nodes"]["1"]["status"] == "ran"  # the cache was cleared before this job ran


def test_openapi_describes_exactly_the_routes_of_the_app(registry: Registry, settings: Settings,
                                                          tmp_path: Path) -> None:
    app = create_app(Executor(registry, settings), ServerConfig(tmp_path / "d", tmp_path / "w"))
    app[STORE].close()
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()  # type: ignore[union-attr]
              if r.method != "HEAD"}
    described = {(method, path) for path, ops in document()["paths"].items() for method in ops}
    assert routes == described
    for path, ops in document()["paths"].items():
        for op in ops.values():
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == {part[1:-1] for part in path.split("/") if part.startswith("{")}


async def test_openapi_is_served(client: Client) -> None:
    served = await (await client.get("/api/openapi.json")).json()
    assert served["openapi"].startswith("3.") and "/api/jobs" in served["paths"]


async def test_system_lists_each_residents_components(aiohttp_client: Any, registry: Registry, settings: Settings,
                                                      config: ServerConfig) -> None:
    from nodegraph.models import ModelManager
    from tests.test_models import Parts

    manager = ModelManager(device="cpu", text_encoder_device="cpu")
    with manager.use("flux", lambda placement: Parts("flux", 300, placement, []), 300, "tiny-flux (bf16)"):
        pass
    client = await aiohttp_client(create_app(Executor(registry, settings, models=manager), config))
    models = (await (await client.get("/api/system")).json())["models"]
    assert models["text_encoder_device"] == "cpu"
    [flux] = models["residents"]
    assert flux["components"] == [{"name": "transformer", "dtype": "bfloat16", "bytes": {"cpu": 300}},
                                  {"name": "text_encoder_2", "dtype": "float32", "bytes": {"cpu": 70}}]
