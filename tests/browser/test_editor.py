"""The editor in a real browser: open, edit, connect, queue, watch, save, import, see errors.

Each test drives the page the way a user does (the toolbar, mouse drags and clicks on the
canvas, dropping a file) and reads the result from the page's graph and the server's API.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import ARTIFACTS, ROOT, Server

JOB_TIMEOUT = 120_000  # the first Sample loads the tiny model; on a 2-core machine that takes a while


def open_workflow(page: Any, name: str) -> None:
    page.select_option("#workflow-list", name)
    page.wait_for_function("name => window.nodegraph.files.name === name", arg=name)


def graph_workflow(page: Any) -> dict[str, Any]:
    return page.evaluate("() => JSON.parse(window.nodegraph.files.text())")


def node_run(page: Any, node_id: str) -> dict[str, Any]:
    return page.evaluate("""id => {
        const run = window.nodegraph.graph.getNodeById(Number(id)).ngRun;
        return {status: run.status, progress: run.progress, errors: run.errors || [],
                images: (run.images || []).map(i => ({name: i.ngName, width: i.naturalWidth}))};
    }""", node_id)


def to_screen(page: Any, x: float, y: float) -> tuple[float, float]:
    """A point in graph coordinates, on the screen."""
    return tuple(page.evaluate("""([x, y]) => {
        const {canvas} = window.nodegraph;
        const [cx, cy] = canvas.ds.convertOffsetToCanvas([x, y]);
        const rect = canvas.canvas.getBoundingClientRect();
        return [rect.left + cx, rect.top + cy];
    }""", [x, y]))


def slot_position(page: Any, node_id: int, is_input: bool, name: str) -> tuple[float, float]:
    x, y = page.evaluate("""([id, isInput, name]) => {
        const node = window.nodegraph.graph.getNodeById(id);
        const slot = isInput ? node.findInputSlot(name) : node.findOutputSlot(name);
        return node.getConnectionPos(isInput, slot);
    }""", [node_id, is_input, name])
    return to_screen(page, x, y)


def drag(page: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=12)
    page.mouse.up()


def queue_and_wait(page: Any) -> dict[str, Any]:
    """Click Queue and wait for the job's record; returns it (as GET /api/jobs/{id} gave it)."""
    before = page.evaluate("() => window.nodegraph.tracker.lastJob?.job_id ?? null")
    page.click("#btn-queue")
    page.wait_for_function("""before => {
        const t = window.nodegraph.tracker;
        return t.lastJob && t.lastJob.job_id !== before && t.lastJob.job_id === t.jobId;
    }""", arg=before, timeout=JOB_TIMEOUT)
    return page.evaluate("() => window.nodegraph.tracker.lastJob")


def drop_file(page: Any, name: str, data: bytes, mime: str) -> None:
    """Drop a file on the canvas, as dragging it from the desktop does."""
    page.evaluate("""([name, bytes, mime]) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], name, {type: mime}));
        const target = document.getElementById("graph-canvas");
        for (const type of ["dragenter", "dragover", "drop"]) {
            target.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }
    }""", [name, list(data), mime])


def test_editor_loads_with_every_node_type_and_adds_nodes_from_the_search_box(page: Any, server: Server) -> None:
    catalog = server.get("/api/nodes")["nodes"]
    registered = page.evaluate("() => Object.values(LiteGraph.registered_node_types).map(c => c.title)")
    assert sorted(registered) == sorted(catalog)
    assert page.text_content("#status-queue") == "queue 0"
    assert page.text_content("#workflow-name") == "untitled"

    page.click("#btn-add")
    page.fill("#node-search-input", "LoadLo")
    page.wait_for_selector("#node-search-results li[data-type=LoadLoRA]")
    page.keyboard.press("Enter")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 1")
    node = page.evaluate("""() => {
        const n = window.nodegraph.graph._nodes[0];
        return {type: n.ngSpec.type, inputs: n.inputs.map(i => [i.name, i.type]),
                widgets: n.widgets.map(w => [w.name, w.type, w.value, {...w.options,
                    values: typeof w.options.values === "function" ? w.options.values(w, n) : w.options.values}])};
    }""")
    assert node["type"] == "LoadLoRA"
    assert node["inputs"] == [["model", "MODEL"]]
    widgets = {name: (kind, value, options) for name, kind, value, options in node["widgets"]}
    assert widgets["lora"][0] == "combo" and "tiny-sd15-style.safetensors" in widgets["lora"][2]["values"]
    assert widgets["strength"][:2] == ("number", 1.0)
    assert (widgets["strength"][2]["min"], widgets["strength"][2]["max"]) == (-10, 10)
    assert widgets["block_scales"][2]["multiline"] is True
    page.wait_for_selector("#workflow-name[data-dirty=true]")


def test_open_workflow_from_the_toolbar(page: Any, server: Server) -> None:
    assert "lora.json" in page.eval_on_selector_all("#workflow-list option", "os => os.map(o => o.value)")
    open_workflow(page, "lora.json")
    shown = page.evaluate("""() => window.nodegraph.graph._nodes.map(n => ({
        id: n.id, type: n.ngSpec.type,
        widgets: Object.fromEntries(n.widgets.map(w => [w.name, w.value])),
        links: n.inputs.filter(i => i.link !== null).map(i => i.name)}))""")
    by_id = {str(n["id"]): n for n in shown}
    assert {k: v["type"] for k, v in by_id.items()} == {"1": "LoadCheckpoint", "2": "LoadLoRA", "3": "Sample",
                                                          "4": "SaveImage"}
    assert by_id["3"]["widgets"]["seed"] == 42 and by_id["3"]["widgets"]["scheduler"] == "karras"
    assert by_id["3"]["links"] == ["model"] and by_id["4"]["links"] == ["images"]
    assert page.text_content("#workflow-name") == "lora.json"


def test_a_wrong_type_connection_is_refused(page: Any) -> None:
    open_workflow(page, "lora.json")
    # Through litegraph's API: MODEL into IMAGE is refused; INT into FLOAT is the allowed widening.
    result = page.evaluate("""() => {
        const {graph, createNode} = window.nodegraph;
        const checkpoint = graph.getNodeById(1), save = graph.getNodeById(4);
        const refused = checkpoint.connect(0, save, 0) === null;
        const number = createNode("Int"), math = createNode("Math"), text = createNode("String");
        for (const n of [number, math, text]) graph.add(n);
        math.toSocket("a");
        const widened = number.connect(0, math, math.findInputSlot("a")) !== null;
        math.toSocket("b");
        const stringRefused = text.connect(0, math, math.findInputSlot("b")) === null;
        for (const n of [number, math, text]) graph.remove(n);
        return {refused, widened, stringRefused, saveInput: graph.links[save.inputs[0].link].origin_id};
    }""")
    assert result == {"refused": True, "widened": True, "stringRefused": True, "saveInput": 3}

    # With the mouse: dragging LoadCheckpoint's MODEL onto SaveImage's IMAGE input leaves it as it was...
    drag(page, slot_position(page, 1, False, "model"), slot_position(page, 4, True, "images"))
    assert page.evaluate("() => { const g = window.nodegraph.graph; "
                         "return g.links[g.getNodeById(4).inputs[0].link].origin_id; }") == 3
    # ...while onto Sample's MODEL input it connects (replacing the LoRA's link).
    drag(page, slot_position(page, 1, False, "model"), slot_position(page, 3, True, "model"))
    assert page.evaluate("() => { const g = window.nodegraph.graph; "
                         "return g.links[g.getNodeById(3).inputs[0].link].origin_id; }") == 1
    assert graph_workflow(page)["nodes"]["3"]["inputs"]["model"] == ["1", "model"]


def test_queue_shows_progress_and_the_image_then_a_changed_seed_reruns_only_what_it_reaches(
        page: Any, server: Server) -> None:
    open_workflow(page, "lora.json")
    job = queue_and_wait(page)
    assert job["status"] == "ok"
    steps = [(m["step"], m["total"]) for m in page.messages if m["type"] == "progress" and m["node_id"] == "3"]
    assert steps and steps[-1] == (4, 4)
    sample, save = node_run(page, "3"), node_run(page, "4")
    assert sample["progress"] == {"step": 4, "total": 4}
    assert sample["status"] in ("ran", "cached") and save["status"] in ("ran", "cached")
    page.wait_for_function("() => window.nodegraph.graph.getNodeById(4).ngRun.images.every(i => i.naturalWidth)")
    images = node_run(page, "4")["images"]
    assert len(images) == 2 and all(i["width"] == 64 for i in images)
    assert [i["name"] for i in images] == job["nodes"]["4"]["files"]
    page.wait_for_function("n => document.querySelectorAll('#gallery-items img').length >= n", arg=2)
    assert page.get_attribute("#status-job", "data-state") == "ok"
    page.click("#sidebar [data-tab=history]")
    page.wait_for_selector(f"#history-items li[data-job-id='{job['job_id']}'] .thumb img")
    page.wait_for_selector("#workflow-name[data-dirty=false]")  # nodes grown to show images are no edit
    page.screenshot(path=str(ARTIFACTS / "lora-finished.png"))  # docs/editor.png is a copy of one of these

    # Click the right arrow of Sample's seed widget: 42 → 43; queue again.
    x, y = page.evaluate("""() => {
        const node = window.nodegraph.graph.getNodeById(3);
        const seed = node.widgets.find(w => w.name === "seed");
        return [node.pos[0] + node.size[0] - 25, node.pos[1] + seed.last_y + LiteGraph.NODE_WIDGET_HEIGHT / 2];
    }""")
    page.mouse.click(*to_screen(page, x, y))
    page.wait_for_function("() => window.nodegraph.graph.getNodeById(3).widgets.find(w => w.name === 'seed')"
                           ".value === 43")
    assert graph_workflow(page)["nodes"]["3"]["inputs"]["seed"] == 43
    job = queue_and_wait(page)
    record = server.get(f"/api/jobs/{job['job_id']}")
    assert {k: v["status"] for k, v in record["nodes"].items()} == {"1": "cached", "2": "cached", "3": "ran",
                                                                    "4": "ran"}
    assert [node_run(page, k)["status"] for k in "1234"] == ["cached", "cached", "ran", "ran"]
    assert record["workflow"]["nodes"]["3"]["inputs"]["seed"] == 43


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "workflows").glob("*.json")))
def test_save_as_then_reopen_gives_the_same_workflow(page: Any, server: Server, name: str) -> None:
    original = json.loads((ROOT / "workflows" / name).read_text())
    open_workflow(page, name)
    copy = f"copy-{name}"
    page.click("#btn-save-as")
    page.fill("#name-input", copy)
    page.click("#name-ok")
    page.wait_for_function("name => document.getElementById('workflow-name').textContent === name", arg=copy)
    saved = json.loads((server.workflows_dir / copy).read_text())

    def essence(workflow: dict[str, Any]) -> dict[str, Any]:
        return {k: {f: n.get(f) for f in ("type", "inputs", "title")} for k, n in workflow["nodes"].items()}

    assert essence(saved) == essence(original)
    assert all(saved["nodes"][k]["ui"]["pos"] == n["ui"]["pos"] for k, n in original["nodes"].items())
    assert server.post("/api/validate", {"workflow": saved})["ok"] is True

    page.click("#btn-new")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 0")
    open_workflow(page, copy)
    assert graph_workflow(page) == saved


def test_errors_show_on_the_node_and_input(page: Any, server: Server) -> None:
    bad = json.loads((ROOT / "workflows/lora.json").read_text())
    bad["nodes"]["3"]["inputs"]["steps"] = 0
    bad["nodes"]["2"]["inputs"]["lora"] = "no-such-lora.safetensors"
    drop_file(page, "bad.json", json.dumps(bad).encode(), "application/json")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 4")
    page.click("#btn-queue")
    page.wait_for_selector("#errors:not([hidden]) li")
    listed = page.eval_on_selector_all("#error-list li", """items => items.map(li => ({
        node: li.dataset.nodeId, input: li.dataset.input, code: li.dataset.code,
        text: li.textContent}))""")
    assert {(e["node"], e["input"], e["code"]) for e in listed} == {("3", "steps", "out_of_range"),
                                                                    ("2", "lora", "not_a_choice")}
    assert any(e["text"].startswith("Sample #3 · steps") for e in listed)
    assert [(e["input"], e["code"]) for e in node_run(page, "3")["errors"]] == [("steps", "out_of_range")]
    assert "not queued: 2 problems" in page.text_content("#status-message")
    page.screenshot(path=str(ARTIFACTS / "validation-errors.png"))

    # An error while running: Math divides by zero; the node and its message show it.
    divide = {"format": "nodegraph/1", "nodes": {
        "1": {"type": "Float", "inputs": {"value": 1.0}, "ui": {"pos": [40, 80]}},
        "2": {"type": "Math", "inputs": {"a": ["1", "value"], "b": 0, "op": "divide"}, "ui": {"pos": [300, 80]}},
        "3": {"type": "Show", "inputs": {"value": ["2", "result"]}, "ui": {"pos": [560, 80]}}}, "ui": {}}
    drop_file(page, "divide.json", json.dumps(divide).encode(), "application/json")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 3")
    job = queue_and_wait(page)
    assert job["status"] == "error"
    assert [e["code"] for e in node_run(page, "2")["errors"]] == ["division_by_zero"]
    assert node_run(page, "2")["status"] == "error"
    page.wait_for_selector("#error-list li[data-code=division_by_zero]")
    assert page.get_attribute("#status-job", "data-state") == "error"


def test_dropping_a_png_written_by_save_image_opens_its_workflow(page: Any, server: Server) -> None:
    workflow = json.loads((ROOT / "workflows/lora.json").read_text())
    workflow["nodes"]["3"]["inputs"]["seed"] = 7
    job = server.post("/api/jobs", {"workflow": workflow})
    deadline = time.monotonic() + JOB_TIMEOUT / 1000
    while (record := server.get(f"/api/jobs/{job['job_id']}"))["status"] in ("pending", "running"):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.2)  # polling the server's API, not synchronising with the page
    assert record["status"] == "ok"
    png = (server.output_dir / record["files"][0]).read_bytes()
    drop_file(page, record["files"][0], png, "image/png")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 4")
    shown = graph_workflow(page)["nodes"]
    assert {k: (n["type"], n["inputs"]) for k, n in shown.items()} == \
        {k: (n["type"], n["inputs"]) for k, n in workflow["nodes"].items()}
    # Named as the image (a workflow name: ".json"), not saved yet.
    assert page.text_content("#workflow-name") == Path(record["files"][0]).stem + ".json ●"
