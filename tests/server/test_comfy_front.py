"""`--front-end comfyui`: ComfyUI's frontend files at /, and ComfyUI's shapes where the two APIs share a path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nodegraph.server.comfy import front
from tests.server.conftest import Client, MakeClient, finished, queue, show, wf


@pytest.fixture
def fake_front(tmp_path: Path) -> Path:
    """A stand-in for the package's static folder: the routes, not the real files, are under test here."""
    folder = tmp_path / "static"
    (folder / "assets").mkdir(parents=True)
    (folder / "index.html").write_text("<!doctype html><title>ComfyUI</title>")
    (folder / "assets" / "index.js").write_text("console.log(1)")
    (folder / "secret.py").write_text("x")
    (tmp_path / "outside.js").write_text("outside")
    (folder / "assets" / "link.js").symlink_to(tmp_path / "outside.js")
    return folder


@pytest.fixture
async def comfy_client(make_client: MakeClient, fake_front: Path) -> Client:
    return await make_client(front_end="comfyui", front_end_dir=fake_front)


async def test_the_frontends_files_are_served_and_confined(comfy_client: Client) -> None:
    page = await comfy_client.get("/")
    assert page.status == 200 and "ComfyUI" in await page.text()
    assert "'unsafe-inline'" in page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    script = await comfy_client.get("/assets/index.js")
    assert script.status == 200 and script.headers["Content-Type"].startswith("text/javascript")
    for path, status in (("/assets/link.js", 403), ("/assets/..%2F..%2Foutside.js", 400), ("/secret.py", 403),
                         ("/assets/none.js", 404), ("/api/no_such_route", 404)):
        answer = await comfy_client.get(path)
        assert answer.status == status, path
        assert (await answer.json())["errors"][0]["message"]
    assert (await comfy_client.get("/web/index.html")).status == 404  # our editor is not served in this mode
    assert await (await comfy_client.get("/templates/index.json")).json() == []  # no templates package
    assert await (await comfy_client.get("/templates/index_logo.json")).json() == {}
    assert (await comfy_client.get("/templates/other.json")).status == 404
    library = await (await comfy_client.get("/api/experiment/models")).json()
    assert all(set(entry) == {"name", "folders"} for entry in library) and library
    assert (await comfy_client.get("/api/experiment/models/nope")).status == 404


async def test_colliding_paths_answer_in_comfyuis_shapes(comfy_client: Client) -> None:
    assert await (await comfy_client.get("/api/history")).json() == {}
    assert await (await comfy_client.post("/api/free", json={"unload_models": True})).json() == {}
    assert isinstance(await (await comfy_client.get("/api/models/checkpoints")).json(), list)
    assert isinstance(await (await comfy_client.get("/api/models")).json(), list)
    assert await (await comfy_client.get("/api/jobs")).json() == {
        "jobs": [], "pagination": {"offset": 0, "limit": 200, "total": 0, "has_more": False}}
    ws = await comfy_client.ws_connect("/api/ws?clientId=front")
    assert (await ws.receive_json())["type"] == "status"
    await ws.close()


async def test_the_jobs_api_lists_our_jobs_in_comfyuis_shape(comfy_client: Client) -> None:
    job_id = await queue(comfy_client, show(3))  # our POST /api/jobs stays
    await finished(comfy_client, job_id)
    failed = await queue(comfy_client, wf({"1": {"type": "Fail", "inputs": {}},
                                           "2": {"type": "Show", "inputs": {"value": ["1", 0]}}}))
    await finished(comfy_client, failed)
    listed = await (await comfy_client.get("/api/jobs", params={"status": "completed,failed"})).json()
    assert [(j["id"], j["status"]) for j in listed["jobs"]] == [(failed, "failed"), (job_id, "completed")]
    error = listed["jobs"][0]["execution_error"]
    assert error["node_id"] == "1" and error["node_type"] == "Fail" and error["exception_message"]
    first: dict[str, Any] = listed["jobs"][1]
    assert isinstance(first["create_time"], int) and first["execution_end_time"] >= first["create_time"]
    assert first["outputs_count"] == 0 and first["previewable_outputs_count"] == 0
    assert await (await comfy_client.get("/api/jobs", params={"status": "pending"})).json() == {
        "jobs": [], "pagination": {"offset": 0, "limit": 200, "total": 0, "has_more": False}}
    page = await (await comfy_client.get("/api/jobs", params={"limit": 1, "offset": 1})).json()
    assert [j["id"] for j in page["jobs"]] == [job_id] and page["pagination"]["has_more"] is False
    detail = await (await comfy_client.get(f"/api/jobs/{job_id}")).json()
    assert detail["status"] == "completed" and detail["workflow"]["prompt"]["1"]["class_type"] == "Show"
    assert detail["execution_status"]["completed"] is True
    graph = {"1": {"class_type": "Show", "inputs": {"value": 5}}}
    sent = await comfy_client.post("/api/prompt", json={"prompt": graph, "extra_data": {
        "create_time": 1234, "extra_pnginfo": {"workflow": {"id": "wf-1"}}}})
    prompt_id = (await sent.json())["prompt_id"]
    await finished(comfy_client, prompt_id)
    mine = await (await comfy_client.get(f"/api/jobs/{prompt_id}")).json()
    assert (mine["create_time"], mine["workflow_id"]) == (1234, "wf-1")
    for query in ({"status": "done"}, {"limit": "x"}, {"offset": "-1"}):
        refused = await comfy_client.get("/api/jobs", params=query)
        assert refused.status == 400 and (await refused.json())["errors"][0]["code"] == "bad_query"
    assert (await comfy_client.get("/api/jobs/nope")).status == 404


async def test_the_default_front_end_keeps_our_shapes(client: Client) -> None:
    assert "jobs" in await (await client.get("/api/history")).json()
    assert "freed" in await (await client.post("/api/free")).json()
    assert set(await (await client.get("/api/models/checkpoints")).json()) == {"kind", "files"}
    ours = await (await client.get("/api/jobs")).json()
    assert "pagination" not in ours
    assert "ComfyUI" not in await (await client.get("/")).text()
    assert (await client.get("/jobs")).status == 200  # ComfyUI's, at its bare path


def test_a_missing_frontend_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(front, "PACKAGE", "no_such_frontend_package")
    with pytest.raises(front.FrontEndMissing, match=r'pip install -e "\.\[comfyui\]"'):
        front.static_dir()


def test_serve_refuses_to_start_without_the_package(tmp_path: Path) -> None:
    code = ("import importlib.util, sys; real = importlib.util.find_spec; importlib.util.find_spec = "
            "lambda name, *a: None if name == 'comfyui_frontend_package' else real(name, *a); "
            "from nodegraph.cli import main; sys.exit(main(['serve', '--front-end', 'comfyui', '--port', '0', "
            f"'--data-dir', {str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and 'pip install -e ".[comfyui]"' in done.stderr, done.stderr
