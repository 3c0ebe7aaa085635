"""ComfyUI's HTTP API and websocket (nodegraph/server/comfy/): its clients' first requests work here.

The first test does what ComfyUI's two script examples do (basic_api_example.py, websockets_api_example.py):
queue a prompt, follow the websocket until `executing` with `node: null`, read the history, fetch the images.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientWebSocketResponse, FormData, WSServerHandshakeError
from PIL import Image

from nodegraph.settings import Settings
from tests.server.conftest import WAIT, Client, MakeClient

TXT2IMG = json.loads((Path(__file__).parents[2] / "workflows" / "comfyui" / "txt2img_lora.json").read_text())


def slow(steps: int = 10_000, delay: float = 0.01) -> dict[str, Any]:
    return {"1": {"class_type": "Slow", "inputs": {"steps": steps, "delay": delay}},
            "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}


def show(value: Any) -> dict[str, Any]:
    return {"1": {"class_type": "Show", "inputs": {"value": value}}}


async def prompt(client: Client, graph: dict[str, Any], client_id: str = "me", **extra: Any) -> dict[str, Any]:
    response = await client.post("/prompt", json={"prompt": graph, "client_id": client_id, **extra})
    assert response.status == 200, await response.text()
    answer: dict[str, Any] = await response.json()
    return answer


async def until(ws: ClientWebSocketResponse, seen: list[dict[str, Any]], kind: str, **data: Any) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        while True:
            message: dict[str, Any] = await ws.receive_json()
            seen.append(message)
            if message["type"] == kind and all(message["data"].get(k) == v for k, v in data.items()):
                return message

    return await asyncio.wait_for(read(), WAIT)


async def done(client: Client, prompt_id: str) -> dict[str, Any]:
    for _ in range(int(WAIT / 0.01)):
        history: dict[str, Any] = await (await client.get(f"/history/{prompt_id}")).json()
        if history:
            return history[prompt_id]  # type: ignore[no-any-return]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{prompt_id} never finished")


async def test_comfyuis_script_examples_run_txt2img_with_a_lora(make_client: MakeClient,
                                                                 demo_settings: Settings) -> None:
    client = await make_client(settings=demo_settings)
    ws = await client.ws_connect("/ws?clientId=script")
    hello = await ws.receive_json()
    assert hello == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "script"}}
    answer = await prompt(client, TXT2IMG, client_id="script")
    assert set(answer) >= {"prompt_id", "number", "node_errors"} and answer["node_errors"] == {}
    prompt_id = answer["prompt_id"]
    seen: list[dict[str, Any]] = []
    await until(ws, seen, "executing", node=None, prompt_id=prompt_id)
    kinds = [m["type"] for m in seen if m["type"] != "status"]
    assert kinds[0] == "execution_start" and kinds[-2:] == ["execution_success", "executing"]
    executing = [m["data"]["node"] for m in seen if m["type"] == "executing"][:-1]
    assert set(executing) == set(TXT2IMG)  # the prompt's own node ids
    steps = [(m["data"]["value"], m["data"]["max"], m["data"]["node"]) for m in seen if m["type"] == "progress"]
    assert steps[-1] == (4, 4, "3")
    executed = next(m["data"] for m in seen if m["type"] == "executed")
    assert executed["node"] == "9" and executed["prompt_id"] == prompt_id
    entry = (await (await client.get(f"/history/{prompt_id}")).json())[prompt_id]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert entry["prompt"][1] == prompt_id and entry["prompt"][2]["3"]["class_type"] == "KSampler"
    assert entry["prompt"][4] == ["9"]
    pictures = entry["outputs"]["9"]["images"]
    assert pictures == executed["output"]["images"] and len(pictures) == 1
    for picture in pictures:
        response = await client.get("/view", params=picture)
        assert response.status == 200 and response.headers["Content-Type"] == "image/png"
        image = Image.open(io.BytesIO(await response.read()))
        assert image.format == "PNG" and image.size == (64, 64)
    queued = [m["data"]["status"]["exec_info"]["queue_remaining"] for m in seen if m["type"] == "status"]
    assert queued[0] == 1  # the status sent when the prompt was queued
    assert await ws.receive_json() == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}}


async def test_the_prompt_id_given_is_the_jobs_and_cached_nodes_are_reported(client: Client) -> None:
    ws = await client.ws_connect("/api/ws?clientId=front")  # ComfyUI's frontend calls /api/ws
    assert (await ws.receive_json())["type"] == "status"
    answer = await prompt(client, show(7), client_id="front", prompt_id="my-id-1", extra_data={"x": 1})
    assert answer["prompt_id"] == "my-id-1"
    seen: list[dict[str, Any]] = []
    await until(ws, seen, "executing", node=None, prompt_id="my-id-1")
    job = await (await client.get("/api/jobs/my-id-1")).json()
    assert job["status"] == "ok" and job["workflow"]["comfy"]["extra_data"] == {"x": 1, "client_id": "front"}
    again = await prompt(client, show(7), client_id="front")
    await until(ws, seen, "execution_cached", nodes=["1"], prompt_id=again["prompt_id"])
    await until(ws, seen, "executing", node=None, prompt_id=again["prompt_id"])
    taken = await client.post("/prompt", json={"prompt": show(7), "prompt_id": "my-id-1"})
    assert taken.status == 400 and (await taken.json())["error"]["type"] == "prompt_id_taken"


async def test_a_bad_prompt_is_refused_in_comfyuis_shape_with_the_prompts_node_ids(client: Client) -> None:
    bad = {"5": {"class_type": "Slow", "inputs": {"steps": "many"}},
           "6": {"class_type": "Show", "inputs": {"value": ["5", 0]}},
           "7": {"class_type": "NoSuchNode", "inputs": {}}}
    response = await client.post("/prompt", json={"prompt": bad})
    assert response.status == 400
    body = await response.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    assert set(body["node_errors"]) == {"5", "7"}
    slow_errors = body["node_errors"]["5"]
    assert slow_errors["class_type"] == "Slow" and slow_errors["dependent_outputs"] == ["6"]
    assert slow_errors["errors"][0]["type"] == "wrong_type"
    assert slow_errors["errors"][0]["extra_info"] == {"input_name": "steps"}
    assert body["node_errors"]["7"]["errors"][0]["type"] == "unknown_node_type"
    for sent in ({"prompt": {}}, {"prompt": [1]}, {"nothing": 1}, {"prompt": show(1), "client_id": 5}):
        response = await client.post("/prompt", json=sent)
        assert response.status == 400 and (await response.json())["error"]["type"] == "invalid_prompt", sent
    broken = await client.post("/prompt", data=b"{not json")
    assert broken.status == 400 and "error" in await broken.json()
    no_output = await client.post("/prompt", json={"prompt": {"1": {"class_type": "Int", "inputs": {"value": 1}}}})
    assert (await no_output.json())["error"]["type"] == "prompt_no_outputs"
    assert (await (await client.get("/queue")).json()) == {"queue_running": [], "queue_pending": []}


async def test_inputs_the_node_type_does_not_declare_are_dropped_with_a_warning(client: Client) -> None:
    graph = {"1": {"class_type": "Show", "inputs": {"value": 3, "upload": "image", "device": "cpu"}}}
    answer = await prompt(client, graph)
    assert [(w["node_id"], w["input"], w["code"]) for w in answer["warnings"]] == [
        ("1", "upload", "unknown_input_dropped"), ("1", "device", "unknown_input_dropped")]
    entry = await done(client, answer["prompt_id"])
    assert entry["status"]["status_str"] == "success" and entry["prompt"][2]["1"]["inputs"] == {"value": 3}
    job = await (await client.get(f"/api/jobs/{answer['prompt_id']}")).json()
    assert job["workflow"]["comfy"]["warnings"] == answer["warnings"]
    strict = await client.post("/api/jobs", json={"workflow": graph})  # our own API stays strict
    assert strict.status == 400 and strict.reason


async def test_literals_of_the_wrong_json_type_are_converted_as_comfyui_does(client: Client) -> None:
    graph = {"1": {"class_type": "Slow", "inputs": {"steps": 3.0, "delay": "0", "marker": ""}},
             "2": {"class_type": "Format", "inputs": {"template": 12, "a": ["1", 0]}},
             "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    response = await client.post("/prompt", json={"prompt": graph})
    answer = await response.json()
    assert response.status == 200, answer
    assert [(w["node_id"], w["input"], w["code"]) for w in answer["warnings"]] == [
        ("1", "steps", "value_converted"), ("1", "delay", "value_converted"), ("2", "template", "value_converted")]
    entry = await done(client, answer["prompt_id"])
    assert entry["prompt"][2]["1"]["inputs"] == {"steps": 3, "delay": 0.0, "marker": ""}
    for wrong in ({"steps": 2.5}, {"steps": "three"}, {"steps": True}):
        response = await client.post("/prompt", json={"prompt": {**graph, "1": {"class_type": "Slow",
                                                                                "inputs": wrong}}})
        assert response.status == 400 and "1" in (await response.json())["node_errors"], wrong


async def test_object_info_is_comfyuis_shape(make_client: MakeClient, demo_settings: Settings) -> None:
    client = await make_client(settings=demo_settings)
    everything = await (await client.get("/object_info")).json()
    assert {"KSampler", "CheckpointLoaderSimple", "SaveImage", "Show"} <= set(everything)
    sampler = everything["KSampler"]
    seed = sampler["input"]["required"]["seed"]
    assert seed[0] == "INT" and seed[1]["min"] == 0 and seed[1]["max"] >= 2**32 - 1
    names, _ = sampler["input"]["required"]["sampler_name"]
    assert isinstance(names, list) and "euler" in names
    assert sampler["input_order"]["required"][:2] == ["model", "seed"] or "seed" in sampler["input_order"]["required"]
    assert sampler["output"] == ["LATENT"] and sampler["output_is_list"] == [False]
    assert sampler["output_node"] is False and sampler["name"] == "KSampler" and sampler["python_module"] == "nodes"
    for key in ("display_name", "description", "category", "output_name"):
        assert key in sampler
    loader = (await (await client.get("/api/object_info/CheckpointLoaderSimple")).json())["CheckpointLoaderSimple"]
    checkpoints = loader["input"]["required"]["ckpt_name"][0]
    assert "tiny-sd15.safetensors" in checkpoints
    assert loader["output"] == ["MODEL", "CLIP", "VAE"]
    assert everything["SaveImage"]["output_node"] is True
    assert await (await client.get("/object_info/NoSuchNode")).json() == {}
    assert "tiny-sd15.safetensors" in await (await client.get("/models/checkpoints")).json()
    assert "checkpoints" in await (await client.get("/models")).json()
    assert (await client.get("/models/nowhere")).status == 404
    assert isinstance(await (await client.get("/embeddings")).json(), list)


async def test_view_refuses_every_way_out_of_its_folder(client: Client, settings: Settings, tmp_path: Path) -> None:
    settings.output_dir.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(settings.output_dir / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    (settings.output_dir / "link.png").symlink_to(tmp_path / "secret.png")
    assert (await client.get("/view", params={"filename": "a.png"})).status == 200
    for params in ({"filename": "../secret.png"}, {"filename": "secret.png", "subfolder": ".."},
                   {"filename": str(tmp_path / "secret.png")}, {"filename": "link.png"},
                   {"filename": "a.png", "subfolder": "../outputs/../.."}, {"filename": "..\\secret.png"},
                   {"filename": "a.png", "type": "models"}, {"filename": "nodegraph.sqlite3", "subfolder": "../data"},
                   {"filename": ""}, {"filename": "secret.png", "subfolder": "/" + str(tmp_path)}):
        response = await client.get("/view", params=params)
        assert 400 <= response.status < 500, params
        assert "errors" in await response.json(), params


async def test_queue_delete_clear_and_interrupt(client: Client) -> None:
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive_json()
    running = (await prompt(client, slow()))["prompt_id"]
    seen: list[dict[str, Any]] = []
    await until(ws, seen, "executing", node="1", prompt_id=running)
    pending = [(await prompt(client, slow(steps=i + 1)))["prompt_id"] for i in range(3)]
    queue = await (await client.get("/queue")).json()
    assert [item[1] for item in queue["queue_running"]] == [running]
    assert [item[1] for item in queue["queue_pending"]] == pending
    assert queue["queue_pending"][0][2]["1"]["class_type"] == "Slow"
    assert (await (await client.get("/prompt")).json()) == {"exec_info": {"queue_remaining": 4}}
    await client.post("/queue", json={"delete": [pending[0], running]})
    queue = await (await client.get("/queue")).json()
    assert [item[1] for item in queue["queue_pending"]] == pending[1:]  # a running prompt is not deleted
    await client.post("/queue", json={"clear": True})
    assert (await (await client.get("/queue")).json())["queue_pending"] == []
    assert await (await client.get(f"/history/{pending[0]}")).json() == {}  # gone, as in ComfyUI
    assert (await client.post("/interrupt", json={"prompt_id": "another"})).status == 200
    assert (await (await client.get("/queue")).json())["queue_running"] != []
    assert (await client.post("/interrupt")).status == 200  # no body, as ComfyUI's frontend sends it
    await until(ws, seen, "execution_interrupted", prompt_id=running)
    await until(ws, seen, "executing", node=None, prompt_id=running)
    entry = await done(client, running)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert (await client.post("/queue", json={"delete": "x"})).status == 400


async def test_history_max_items_delete_and_clear(client: Client) -> None:
    ids = [(await prompt(client, show(i)))["prompt_id"] for i in range(3)]
    for prompt_id in ids:
        await done(client, prompt_id)
    assert list(await (await client.get("/history")).json()) == ids  # oldest first
    assert list(await (await client.get("/history?max_items=2")).json()) == ids[1:]
    assert (await client.get("/history?max_items=x")).status == 400
    await client.post("/history", json={"delete": [ids[0]]})
    assert list(await (await client.get("/api/history")).json()) == ["jobs", "next"]  # ours at /api/history
    assert list(await (await client.get("/history")).json()) == ids[1:]
    await client.post("/history", json={"clear": True})
    assert await (await client.get("/history")).json() == {}


async def test_a_failing_node_sends_execution_error(client: Client) -> None:
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive_json()
    graph = {"1": {"class_type": "Fail", "inputs": {}}, "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    prompt_id = (await prompt(client, graph))["prompt_id"]
    seen: list[dict[str, Any]] = []
    error = await until(ws, seen, "execution_error", prompt_id=prompt_id)
    assert error["data"]["node_id"] == "1" and error["data"]["node_type"] == "Fail"
    assert error["data"]["exception_message"] == "this node always fails"
    await until(ws, seen, "executing", node=None, prompt_id=prompt_id)
    assert [m["type"] for m in seen].count("execution_error") == 1
    entry = await done(client, prompt_id)
    assert entry["status"]["messages"][-1][0] == "execution_error"


async def test_other_clients_get_only_status_and_prompts_without_a_client_go_to_all(client: Client) -> None:
    other = await client.ws_connect("/ws?clientId=other")
    await other.receive_json()
    mine = (await prompt(client, show(1), client_id="me"))["prompt_id"]
    anyone = (await client.post("/prompt", json={"prompt": show(2)}))
    anyone_id = (await anyone.json())["prompt_id"]
    seen: list[dict[str, Any]] = []
    await until(other, seen, "executing", node=None, prompt_id=anyone_id)
    assert all(m["data"].get("prompt_id") != mine for m in seen)
    assert any(m["type"] == "status" for m in seen)


async def test_system_stats_features_free_and_upload(client: Client, settings: Settings) -> None:
    stats = await (await client.get("/system_stats")).json()
    assert {"os", "python_version", "embedded_python", "comfyui_version", "pytorch_version", "ram_total",
            "ram_free", "argv"} <= set(stats["system"])
    assert isinstance(stats["devices"], list) and stats["devices"][0]["type"] == "cpu"
    assert "max_upload_size" in await (await client.get("/api/features")).json()
    assert (await client.post("/free", json={"unload_models": True, "free_memory": True})).status == 200
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    form = FormData()
    form.add_field("image", buffer.getvalue(), filename="mask.png", content_type="image/png")
    form.add_field("subfolder", "sub")
    form.add_field("overwrite", "true")
    uploaded = await (await client.post("/upload/image", data=form)).json()
    assert uploaded == {"name": "mask.png", "subfolder": "sub", "type": "input"}
    view = await client.get("/view", params={**uploaded, "filename": uploaded["name"]})
    assert view.status == 200 and await view.read() == buffer.getvalue()


def png(size: tuple[int, int], mode: str = "RGB", color: Any = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


async def test_upload_mask_puts_the_masks_alpha_on_the_original(client: Client, settings: Settings) -> None:
    settings.input_dir.mkdir(parents=True)
    (settings.input_dir / "photo.png").write_bytes(png((8, 8), "RGB", (200, 10, 10)))
    form = FormData()
    form.add_field("image", png((8, 8), "RGBA", (0, 0, 0, 77)), filename="clipspace-mask.png",
                   content_type="image/png")
    form.add_field("original_ref", json.dumps({"filename": "photo.png", "subfolder": "", "type": "input"}))
    form.add_field("subfolder", "clipspace")
    answer = await (await client.post("/upload/mask", data=form)).json()
    assert answer == {"name": "clipspace-mask.png", "subfolder": "clipspace", "type": "input"}
    stored = Image.open(settings.input_dir / "clipspace" / "clipspace-mask.png")
    assert stored.mode == "RGBA" and stored.getpixel((3, 3)) == (200, 10, 10, 77)
    for ref in ({"filename": "../photo.png"}, {"filename": "missing.png"}, {"filename": "photo.png", "type": "x"}):
        form = FormData()
        form.add_field("image", png((8, 8), "RGBA"), filename="m.png", content_type="image/png")
        form.add_field("original_ref", json.dumps(ref))
        response = await client.post("/upload/mask", data=form)
        assert 400 <= response.status < 500 and "errors" in await response.json(), ref


async def test_comfy_routes_refuse_cross_site_requests_and_ours_keep_their_paths(client: Client) -> None:
    for path in ("/prompt", "/api/prompt", "/queue", "/interrupt", "/history", "/free", "/upload/image"):
        response = await client.post(path, json={"prompt": show(1)}, headers={"Origin": "http://evil.example"})
        assert response.status == 403, path
    for path in ("/ws?clientId=x", "/api/ws?clientId=x"):
        with pytest.raises(WSServerHandshakeError) as caught:
            await client.ws_connect(path, headers={"Origin": "http://evil.example"})
        assert caught.value.status == 403
    assert (await (await client.get("/api/prompt")).json()) == {"exec_info": {"queue_remaining": 0}}
    assert set(await (await client.get("/api/models/checkpoints")).json()) == {"kind", "files"}  # ours
    assert (await client.post("/api/free")).status == 200 and "freed" in await (await client.post("/api/free")).json()
    ws = await client.ws_connect("/api/ws?client_id=mine")  # ours: our messages
    assert (await ws.receive_json())["type"] == "hello"


async def test_odd_prompts_are_refused_never_a_server_error(client: Client) -> None:
    odd: list[Any] = [
        {"1": {"class_type": ["Show"], "inputs": {}}}, {"1": {"class_type": "Show", "inputs": [1, 2]}},
        {"": {"class_type": "Show", "inputs": {"value": 1}}},
        {"1": {"class_type": "Show", "inputs": {"value": ["9", 0]}}},
        {"1": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}, {"1": {"class_type": "Show", "_meta": 5}},
        {"1": {"class_type": "Show", "inputs": {"value": [{"x": 1}, "y"]}}},
        {"1": {"class_type": "Slow", "inputs": {"steps": "1e999"}}, "2": {"class_type": "Show",
                                                                          "inputs": {"value": ["1", 0]}}},
    ]
    for prompt_body in odd:
        response = await client.post("/prompt", json={"prompt": prompt_body})
        assert response.status == 400, (prompt_body, await response.text())
        assert set(await response.json()) == {"error", "node_errors"}, prompt_body
    for body in ({"prompt": show(1), "extra_data": []}, {"prompt": show(1), "prompt_id": "../x"},
                 {"prompt": show(1), "number": "1"}, {"prompt": show(1), "extra_data": {"client_id": 3}}):
        response = await client.post("/prompt", json=body)
        assert response.status == 400 and (await response.json())["error"]["type"] == "invalid_prompt", body


async def test_one_queue_for_both_apis_and_front_is_a_warning(client: Client) -> None:
    ours = await client.post("/api/jobs", json={"workflow": {"format": "nodegraph/1", "nodes": {
        "1": {"type": "Slow", "inputs": {"steps": 10_000, "delay": 0.01}},
        "2": {"type": "Show", "inputs": {"value": ["1", "value"]}}}}})
    job_id = (await ours.json())["job_id"]
    answer = await prompt(client, show(1), front=True, number=7)
    assert answer["number"] == 7 and [w["code"] for w in answer["warnings"]] == ["front_ignored"]
    queue = await (await client.get("/queue")).json()
    items = queue["queue_running"] + queue["queue_pending"]
    assert [item[1] for item in items] == [job_id, answer["prompt_id"]]
    assert items[0][2] == {"1": {"inputs": {"steps": 10_000, "delay": 0.01}, "class_type": "Slow",
                                 "_meta": {"title": "Slow"}},
                           "2": {"inputs": {"value": ["1", 0]}, "class_type": "Show", "_meta": {"title": "Show"}}}
    assert items[1][0] == 7 and items[1][3] == {"client_id": "me"} and items[1][4] == ["1"]
    await client.post("/interrupt", json={"prompt_id": job_id})
    assert (await done(client, job_id))["status"]["status_str"] == "error"
    assert (await done(client, answer["prompt_id"]))["status"]["status_str"] == "success"
