"""Jobs and files in a real browser: the queue and history panels, the seed's control after
generate, model lists that refresh without a reload, LoadImage's upload, and a visible message
for every failed request.
"""

from __future__ import annotations

import io
import json
import shutil
from typing import Any

from tests.browser.conftest import ROOT, Server
from tests.browser.test_editor import JOB_TIMEOUT, graph_workflow, open_workflow, queue_and_wait, to_screen


def widget_point(page: Any, node_id: int, name: str, dx: float | None = None) -> tuple[float, float]:
    """A widget on the screen: its middle, or `dx` graph units from the node's left edge."""
    # `last_y` is set when the canvas first draws the widget: a node just added may not be drawn yet.
    page.wait_for_function("""([id, name]) => typeof window.nodegraph.graph.getNodeById(id)
        ?.widgets?.find(w => w.name === name)?.last_y === 'number'""", arg=[node_id, name])
    x, y = page.evaluate("""([id, name, dx]) => {
        const node = window.nodegraph.graph.getNodeById(id);
        const w = node.widgets.find(w => w.name === name);
        return [node.pos[0] + (dx ?? node.size[0] / 2), node.pos[1] + w.last_y + LiteGraph.NODE_WIDGET_HEIGHT / 2];
    }""", [node_id, name, dx])
    return to_screen(page, x, y)


def test_pending_and_running_jobs_are_cancelled_from_the_queue_panel(page: Any, server: Server) -> None:
    workflow = json.loads((ROOT / "workflows/lora.json").read_text())
    workflow["nodes"]["3"]["inputs"]["steps"] = 1000  # runs long enough to be cancelled while it runs
    page.evaluate("wf => window.nodegraph.files.show(wf, null)", workflow)
    page.click("#btn-queue")
    page.wait_for_selector("#queue-items li[data-status=running]", timeout=JOB_TIMEOUT)
    running = page.get_attribute("#queue-items li[data-status=running]", "data-job-id")
    page.click("#btn-queue")
    page.wait_for_selector("#queue-items li[data-status=pending]")
    pending = page.get_attribute("#queue-items li[data-status=pending]", "data-job-id")
    assert page.text_content("#status-queue").startswith("queue 2")
    # Queueing the second job left the running one's node states on the graph.
    assert page.evaluate("() => window.nodegraph.graph.getNodeById(3).ngRun.status") == "running"

    page.click(f"#queue-items li[data-job-id='{pending}'] button.cancel")
    page.wait_for_selector(f"#queue-items li[data-job-id='{pending}']", state="detached")
    assert server.get(f"/api/jobs/{pending}")["status"] == "cancelled"
    page.click(f"#queue-items li[data-job-id='{running}'] button.cancel")
    page.wait_for_selector("#queue-items li.empty", timeout=JOB_TIMEOUT)
    assert server.get(f"/api/jobs/{running}")["status"] in ("interrupted", "cancelled")
    page.click("#sidebar [data-tab=history]")
    page.wait_for_selector(f"#history-items li[data-job-id='{running}']")
    statuses = page.eval_on_selector_all("#history-items li[data-job-id]", "items => items.map(i => i.dataset.status)")
    assert "cancelled" in statuses


def test_the_seed_moves_after_queue_and_a_history_entry_reopens_its_workflow(page: Any, server: Server) -> None:
    open_workflow(page, "lora.json")
    page.mouse.click(*widget_point(page, 3, "control_after_generate"))
    page.click(".litecontextmenu .litemenu-entry:has-text('increment')")
    assert graph_workflow(page)["nodes"]["3"]["ui"]["control_after_generate"] == "increment"
    job = queue_and_wait(page)
    assert job["workflow"]["nodes"]["3"]["inputs"]["seed"] == 42
    assert graph_workflow(page)["nodes"]["3"]["inputs"]["seed"] == 43  # ready for the next run

    page.click("#btn-new")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 0")
    page.click("#sidebar [data-tab=history]")
    entry = f"#history-items li[data-job-id='{job['job_id']}']"
    page.wait_for_selector(f"{entry} .thumb img")
    page.click(f"{entry} button.open")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 4")
    assert graph_workflow(page)["nodes"]["3"]["inputs"]["seed"] == 42
    states = page.evaluate("() => window.nodegraph.graph._nodes.map(n => n.ngRun.status)")
    assert states == [job["nodes"][k]["status"] for k in "1234"]


def test_a_new_lora_file_appears_in_the_combo_without_a_reload(page: Any, server: Server) -> None:
    open_workflow(page, "lora.json")
    folder = server.models_dir / "loras"
    added = folder / "fresh-from-disk.safetensors"
    shutil.copyfile(folder / "tiny-sd15-style.safetensors", added)
    try:
        page.mouse.click(*widget_point(page, 2, "lora"))  # opening the list asks the server again
        page.wait_for_selector(".litecontextmenu .litemenu-entry:has-text('fresh-from-disk.safetensors')")
        page.click(".litecontextmenu .litemenu-entry:has-text('fresh-from-disk.safetensors')")
        assert graph_workflow(page)["nodes"]["2"]["inputs"]["lora"] == "fresh-from-disk.safetensors"
    finally:
        added.unlink()
    page.click("#btn-refresh")  # the manual refresh: the file is gone again
    page.wait_for_function("""() => !window.nodegraph.graph.getNodeById(2).ngSpec.inputs
        .find(i => i.name === "lora").choices.includes("fresh-from-disk.safetensors")""")


def test_load_image_uploads_a_file_and_selects_it(page: Any, server: Server) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    page.evaluate("""() => {
        const node = window.nodegraph.createNode("LoadImage");
        node.pos = [100, 100];
        window.nodegraph.graph.add(node);
        window.nodegraph.canvas.ds.scale = 1;
        window.nodegraph.canvas.ds.offset = [0, 0];
    }""")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 1")
    uploaded = server.input_dir / "browser-upload.png"
    try:
        with page.expect_file_chooser() as chooser:
            page.mouse.click(*widget_point(page, 1, "upload"))
        chooser.value.set_files(files=[{"name": "browser-upload.png", "mimeType": "image/png",
                                         "buffer": buffer.getvalue()}])
        page.wait_for_function("() => window.nodegraph.graph._nodes[0].widgets[0].value === 'browser-upload.png'")
        assert uploaded.read_bytes() == buffer.getvalue()
        node_id = next(iter(graph_workflow(page)["nodes"]))
        assert graph_workflow(page)["nodes"][node_id]["inputs"]["image"] == "browser-upload.png"
    finally:
        uploaded.unlink(missing_ok=True)


def test_every_failed_request_shows_a_message(page: Any) -> None:
    open_workflow(page, "lora.json")
    page.route("**/api/jobs", lambda route: route.abort())
    page.click("#btn-queue")
    page.wait_for_selector("#status-message[data-kind=error]")
    assert "not reachable" in page.text_content("#status-message")

    page.unroute("**/api/jobs")
    page.route("**/api/jobs", lambda route: route.fulfill(status=500, content_type="application/json",
                                                           body='{"error": "the worker crashed"}'))
    page.click("#btn-queue")
    page.wait_for_function("() => document.getElementById('status-message').textContent.includes('worker crashed')")
    page.unroute("**/api/jobs")

    page.route("**/api/workflows/lora.json", lambda route: route.fulfill(
        status=409, content_type="application/json",
        body='{"errors": [{"node_id": null, "input": null, "code": "busy", "message": "the file is locked"}]}'))
    page.keyboard.press("Control+s")
    page.wait_for_function("() => document.getElementById('status-message').textContent.includes('file is locked')")
    # What the routes above made happen is what this test expects; nothing else may have gone wrong.
    page.wait_for_timeout(0)  # let the page's console messages arrive before they are sorted
    expected = ("/api/jobs", "lora.json", "status of 409")
    page.watch.problems[:] = [p for p in page.watch.problems if not any(e in p for e in expected)]
