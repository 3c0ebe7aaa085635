"""Outputs, saved workflows and imports: safe names only, explicit content types, atomic writes."""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from nodegraph import workflow as wf_module
from nodegraph.cli import main
from nodegraph.server.state import ServerConfig
from nodegraph.settings import Settings
from tests.server.conftest import Client, show, state


def png(text: dict[str, str] | None = None) -> bytes:
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


async def test_outputs_serves_images_with_explicit_types(client: Client, settings: Settings) -> None:
    (settings.output_dir / ".temp" / "sub").mkdir(parents=True)
    (settings.output_dir / "a_00001_.png").write_bytes(png())
    (settings.output_dir / ".temp" / "sub" / "p.png").write_bytes(png())
    for name in ("a_00001_.png", ".temp/sub/p.png"):
        response = await client.get(f"/api/outputs/{name}")
        assert response.status == 200 and await response.read() == (settings.output_dir / name).read_bytes()
        assert response.headers["Content-Type"] == "image/png"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert (await client.get("/api/outputs/missing.png")).status == 404


@pytest.mark.parametrize("name, status", [
    ("..%2Fsecret.png", 400), ("sub/..%2F..%2Fsecret.png", 400), ("%2Fetc%2Fpasswd.png", 400),
    ("a%00.png", 400), ("notes.txt", 403), ("page.html", 403), ("link.png", 403), ("a%5C..%5Cb.png", 400),
])
async def test_outputs_refuses_unsafe_names(client: Client, settings: Settings, tmp_path: Path, name: str,
                                            status: int) -> None:
    settings.output_dir.mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(png())
    (settings.output_dir / "notes.txt").write_text("x")
    (settings.output_dir / "page.html").write_text("<script>alert(1)</script>")
    os.symlink(tmp_path / "secret.png", settings.output_dir / "link.png")
    response = await client.get(f"/api/outputs/{name}")
    assert response.status == status and "errors" in await response.json()


async def test_workflows_round_trip_and_run_unchanged_from_the_command_line(
        client: Client, config: ServerConfig, capsys: pytest.CaptureFixture[str]) -> None:
    assert await (await client.get("/api/workflows")).json() == {"workflows": []}
    workflow = {**show("saved"), "ui": {"groups": [1]}}
    response = await client.put("/api/workflows/my flow.json", json=workflow)
    assert response.status == 201
    assert (await client.put("/api/workflows/my flow.json", json=workflow)).status == 200
    path = config.workflows_dir / "my flow.json"
    assert path.read_text() == wf_module.dumps(workflow)  # pretty-printed like `nodegraph.workflow.save`
    assert [p.name for p in config.workflows_dir.iterdir()] == ["my flow.json"]  # no temporary file left
    assert await (await client.get("/api/workflows")).json() == {"workflows": ["my flow.json"]}
    assert await (await client.get("/api/workflows/my flow.json")).json() == workflow
    assert main(["run", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"]["1"]["outputs"] == {"value": "saved"}
    assert (await client.delete("/api/workflows/my flow.json")).status == 200
    assert (await client.get("/api/workflows/my flow.json")).status == 404
    assert (await client.delete("/api/workflows/my flow.json")).status == 404


async def test_workflow_names_and_bodies_are_checked(client: Client, config: ServerConfig, tmp_path: Path) -> None:
    for name in ("..json", ".hidden.json", "a.txt", "..%2Fx.json", "x%00.json", "-x.json"):
        response = await client.put(f"/api/workflows/{name}", json=show(1))
        assert response.status == 400, name
    config.workflows_dir.mkdir()
    (tmp_path / "outside.json").write_text("{}")
    os.symlink(tmp_path / "outside.json", config.workflows_dir / "link.json")
    for method in ("get", "put", "delete"):
        response = await client.request(method, "/api/workflows/link.json", json=show(1))
        assert response.status == 403 and (await response.json())["errors"][0]["code"] == "outside_folder"
    assert (tmp_path / "outside.json").read_text() == "{}"
    assert await (await client.get("/api/workflows")).json() == {"workflows": []}
    for body in ([1], {"nodes": {}}, {"format": "nodegraph/1", "nodes": []}):
        response = await client.put("/api/workflows/x.json", json=body)
        assert response.status == 400 and (await response.json())["errors"][0]["code"] == "invalid_shape"


async def test_workflows_in_subfolders_are_listed_opened_and_saved(client: Client, config: ServerConfig,
                                                                  tmp_path: Path) -> None:
    folder = config.workflows_dir
    for name in ("top.json", "comfyui/a.json", "comfyui/deep/b.json", "zoo/c.json", ".git/x.json", "comfyui/.d.json",
                 "comfyui/notes.txt", "comfyui/-x.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(show(name)))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "o.json").write_text(json.dumps(show("outside")))
    os.symlink(tmp_path / "outside", folder / "out")  # a folder that leads out
    os.symlink(tmp_path / "outside" / "o.json", folder / "comfyui" / "link.json")  # a file that does
    os.symlink(folder / "zoo" / "c.json", folder / "comfyui" / "inside.json")  # one that stays inside
    listed = (await (await client.get("/api/workflows")).json())["workflows"]
    assert listed == ["top.json", "comfyui/a.json", "comfyui/inside.json", "comfyui/deep/b.json", "zoo/c.json"]
    for name in listed:  # every name listed opens
        response = await client.get(f"/api/workflows/{name}")
        assert response.status == 200 and (await response.json())["nodes"], name
    assert (await (await client.get("/api/workflows/comfyui/a.json")).json()) == show("comfyui/a.json")

    response = await client.put("/api/workflows/comfyui/new.json", json=show("new"))
    assert response.status == 201 and await response.json() == {"name": "comfyui/new.json"}
    assert (await client.put("/api/workflows/comfyui/new.json", json=show("again"))).status == 200
    assert json.loads((folder / "comfyui" / "new.json").read_text()) == show("again")
    assert "comfyui/new.json" in (await (await client.get("/api/workflows")).json())["workflows"]
    assert (await client.delete("/api/workflows/comfyui/new.json")).status == 200
    assert not (folder / "comfyui" / "new.json").exists()

    for name, status in [("out/o.json", 403), ("comfyui/link.json", 403), ("comfyui%2F..%2F..%2Fx.json", 400),
                         ("%2Fetc%2Fx.json", 400), ("comfyui//a.json", 400),
                         (".git/x.json", 400), ("comfyui/.d.json", 400), ("comfyui%5C..%5Cx.json", 400)]:
        for method in ("get", "put", "delete"):
            response = await client.request(method, f"/api/workflows/{name}", json=show(1))
            assert response.status == status, (method, name, response.status)
    assert (tmp_path / "outside" / "o.json").read_text() == json.dumps(show("outside"))
    assert not (tmp_path / "x.json").exists()
    response = await client.put("/api/workflows/top.json/x.json", json=show(1))  # a file is no folder
    assert response.status == 409 and (await response.json())["errors"][0]["code"] == "not_a_file"


async def test_concurrent_puts_of_one_new_name_create_it_once(client: Client, config: ServerConfig) -> None:
    bodies = [show("x" * 20_000 + str(i)) for i in range(20)]
    responses = await asyncio.gather(*(client.put("/api/workflows/race.json", json=body) for body in bodies))
    statuses = sorted(response.status for response in responses)
    assert statuses == [200] * 19 + [201]
    assert json.loads((config.workflows_dir / "race.json").read_text()) in bodies  # one whole body, never a mix
    assert [p.name for p in config.workflows_dir.iterdir()] == ["race.json"]  # no temporary file left


async def test_import_accepts_workflows_comfyui_api_json_and_pngs(client: Client) -> None:
    workflow = show("hi")
    for body in (json.dumps(workflow).encode(), png({"workflow": json.dumps(workflow)})):
        response = await client.post("/api/import", data=body)
        assert response.status == 200 and await response.json() == {"workflow": workflow}
    comfy = {"3": {"class_type": "Show", "inputs": {"value": "x"}}}
    lowered = await (await client.post("/api/import", data=json.dumps(comfy))).json()
    shown = {"type": "Show", "inputs": {"value": "x"}, "ui": {"pos": [40, 40]}}  # laid out: the format has no positions
    assert lowered == {"workflow": {"format": "nodegraph/1", "nodes": {"3": shown}, "ui": {}}}
    # ComfyUI's UI format (the editor's drop of a ComfyUI file): widgets by the schema's order, links by id.
    ui = {"nodes": [{"id": 1, "type": "String", "pos": [5, 6], "widgets_values": ["x"]},
                    {"id": 2, "type": "Show", "pos": [300, 6], "inputs": [{"name": "value", "type": "*", "link": 4}]}],
          "links": [[4, 1, 0, 2, 0, "STRING"]]}
    converted = await (await client.post("/api/import", data=json.dumps(ui))).json()
    assert converted == {"workflow": {"format": "nodegraph/1", "ui": {}, "nodes": {
        "1": {"type": "String", "inputs": {"value": "x"}, "ui": {"pos": [5, 6]}},
        "2": {"type": "Show", "inputs": {"value": ["1", 0]}, "ui": {"pos": [300, 6]}}}}}


@pytest.mark.parametrize("body, code", [
    (b"\xff\xfe", "invalid_json"), (b"{", "invalid_json"), (png(), "no_workflow"),
    (png()[:40], "no_workflow"), (b'{"nodes": [], "links": 3}', "invalid_shape"), (b'{"format": "x", "nodes": {}}',
                                                                                   "unknown_format"),
])
async def test_import_refuses_what_is_not_a_workflow(client: Client, body: bytes, code: str) -> None:
    response = await client.post("/api/import", data=body)
    assert response.status == 400 and (await response.json())["errors"][0]["code"] == code


LONG = "a" * 300  # past the 255 bytes a file name may have (ENAMETOOLONG)


async def test_names_too_long_for_the_file_system_are_refused(client: Client, tmp_path: Path) -> None:
    before = await state(client, tmp_path)
    for method, path in [("get", f"/api/outputs/{LONG}.png"), ("get", f"/api/outputs/x/{LONG}.png"),
                         ("get", "/api/outputs/" + "a/" * 600 + "x.png"), ("get", f"/api/workflows/{LONG}.json"),
                         ("put", f"/api/workflows/{LONG}.json"), ("delete", f"/api/workflows/{LONG}.json")]:
        response = await client.request(method, path, json=show(1))
        assert response.status == 400, (method, path[:40])
        assert (await response.json())["errors"][0]["code"] == "bad_name"
    assert await state(client, tmp_path) == before


STORABLE = [  # JSON that Python reads but no file, database or JSON answer can hold
    (b'{"format": "nodegraph/1", "nodes": {}, "ui": {"title": "\\ud800"}}', "invalid_text", "ui/title"),
    (b'{"format": "nodegraph/1", "nodes": {}, "ui": {"x": 1e400}}', "non_finite_number", "ui/x"),
    (b'{"format": "nodegraph/1", "nodes": {"1": {"type": "Int", "inputs": {"value": NaN}}}}', "non_finite_number",
     "node '1' at inputs/value"),
]


@pytest.mark.parametrize("body, code, where", STORABLE)
async def test_workflows_that_cannot_be_stored_are_refused_everywhere(client: Client, tmp_path: Path, body: bytes,
                                                                     code: str, where: str) -> None:
    before = await state(client, tmp_path)
    for method, path, data in [("put", "/api/workflows/w.json", body), ("post", "/api/import", body),
                               ("post", "/api/jobs", b'{"workflow": ' + body + b"}"),
                               ("post", "/api/validate", b'{"workflow": ' + body + b"}")]:
        response = await client.request(method, path, data=data)
        assert response.status == 400, path
        error = (await response.json())["errors"][0]
        assert error["code"] == code and where in error["message"], (path, error)
    assert await state(client, tmp_path) == before


@pytest.mark.parametrize("value, code", [(b"1e400", "non_finite_number"), (b"NaN", "non_finite_number"),
                                         (b'"\\ud800"', "invalid_text"), (b"[" * 70 + b"]" * 70, "too_deep")])
async def test_a_refused_literal_names_its_node_and_input(client: Client, value: bytes, code: str) -> None:
    body = b'{"format": "nodegraph/1", "nodes": {"1": {"type": "Show", "inputs": {"value": ' + value + b"}}}}"
    for method, path, data in [("put", "/api/workflows/w.json", body), ("post", "/api/import", body),
                               ("post", "/api/jobs", b'{"workflow": ' + body + b"}"),
                               ("post", "/api/validate", b'{"workflow": ' + body + b"}")]:
        response = await client.request(method, path, data=data)
        error = (await response.json())["errors"][0]
        assert response.status == 400 and (error["node_id"], error["input"], error["code"]) == ("1", "value", code)


async def test_an_import_nested_too_deep_to_answer_is_refused(client: Client) -> None:
    body = '{"format": "nodegraph/1", "nodes": {}, "ui": ' + "[" * 980 + "]" * 980 + "}"
    response = await client.post("/api/import", data=body)
    assert response.status == 400  # too_deep here; invalid_json where Python's own parser gives up first
    assert (await response.json())["errors"][0]["code"] in ("too_deep", "invalid_json")
