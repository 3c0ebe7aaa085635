"""Workflow files in the editor: subfolders in the Workflow list, the default graph of a first visit, and the
names that dropped or picked files give their workflows.

    pytest tests/browser/test_files.py -q
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.browser.conftest import ROOT, Server, open_editor
from tests.browser.test_editor import drop_file, graph_workflow, open_workflow


def essence(workflow: dict[str, Any]) -> dict[str, Any]:
    return {k: (n["type"], n["inputs"]) for k, n in workflow["nodes"].items()}


def shown_name(page: Any) -> str:
    return str(page.text_content("#workflow-name"))


def wait_for_name(page: Any, text: str) -> None:
    page.wait_for_function("text => document.getElementById('workflow-name').textContent === text", arg=text)


def record_dialogs(page: Any) -> list[str]:
    """The messages of the dialogs the page opens (the `page` fixture accepts them)."""
    messages: list[str] = []
    page.on("dialog", lambda dialog: messages.append(dialog.message))
    return messages


def test_the_workflow_list_opens_and_saves_files_in_subfolders(page: Any, server: Server) -> None:
    listed = page.eval_on_selector_all("#workflow-list option", "os => os.map(o => o.value)")
    assert {f"comfyui/{p.name}" for p in (ROOT / "workflows/comfyui").glob("*.json")} <= set(listed)
    assert "lora.json" in listed and listed.index("lora.json") < listed.index("comfyui/txt2img_lora.json")

    # A ComfyUI API-format file opens converted, as dropping it does.
    name = "comfyui/txt2img_lora.json"
    open_workflow(page, name)
    converted = server.post("/api/import", json.loads((ROOT / "workflows" / name).read_text()))["workflow"]
    assert essence(graph_workflow(page)) == essence(converted) and len(converted["nodes"]) > 3
    assert shown_name(page) == name
    # Save rewrites it in nodegraph's format, once the user says so.
    dialogs = record_dialogs(page)
    original = (server.workflows_dir / name).read_text()
    try:
        page.click("#btn-save")
        page.wait_for_function("text => document.getElementById('status-message').textContent === text",
                               arg=f"saved {name}")
        assert dialogs == [f"Replace {name}?"]
        assert json.loads((server.workflows_dir / name).read_text()) == graph_workflow(page)
    finally:
        (server.workflows_dir / name).write_text(original)

    # Save as… into the subfolder; the saved file opens from the list and Save writes it again, asking nothing.
    dialogs.clear()
    page.click("#btn-save-as")
    page.fill("#name-input", "comfyui/mine")
    page.click("#name-ok")
    wait_for_name(page, "comfyui/mine.json")
    saved = server.workflows_dir / "comfyui" / "mine.json"
    try:
        assert json.loads(saved.read_text()) == graph_workflow(page)
        page.wait_for_selector("#workflow-list option[value='comfyui/mine.json']", state="attached")
        page.click("#btn-new")
        page.wait_for_function("() => window.nodegraph.graph._nodes.length === 0")
        open_workflow(page, "comfyui/mine.json")
        assert graph_workflow(page) == json.loads(saved.read_text())
        saved.write_text("{}")
        page.click("#btn-save")
        page.wait_for_function("() => document.getElementById('status-message').textContent === "
                               "'saved comfyui/mine.json'")
        assert json.loads(saved.read_text()) == graph_workflow(page)
        assert dialogs == []
    finally:
        saved.unlink(missing_ok=True)


def test_a_first_visit_opens_the_default_workflow_and_a_reload_keeps_what_is_open(
        browser: Any, server: Server, request: pytest.FixtureRequest) -> None:
    with open_editor(browser, server, request.node.name, blank=False) as page:
        assert shown_name(page) == "lora.json"
        assert page.get_attribute("#workflow-name", "data-dirty") == "false"
        assert page.input_value("#workflow-list") == "lora.json"
        assert essence(graph_workflow(page)) == essence(json.loads((ROOT / "workflows/lora.json").read_text()))
        # Once the editor has state, a reload shows that state, not the default again.
        page.click("#btn-new")
        page.wait_for_function("() => window.nodegraph.graph._nodes.length === 0")
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        assert shown_name(page) == "untitled" and page.evaluate("() => window.nodegraph.graph._nodes.length") == 0


def test_without_the_default_workflow_a_first_visit_is_an_empty_canvas(
        browser: Any, server: Server, request: pytest.FixtureRequest) -> None:
    default, aside = server.workflows_dir / "lora.json", server.workflows_dir / ".lora.json.aside"
    default.rename(aside)
    try:
        with open_editor(browser, server, request.node.name, blank=False) as page:
            assert shown_name(page) == "untitled"
            assert page.evaluate("() => window.nodegraph.graph._nodes.length") == 0
    finally:
        aside.rename(default)


def test_a_dropped_or_picked_file_takes_its_name_and_save_replaces_a_file_only_when_told(
        page: Any, server: Server) -> None:
    workflow = json.loads((ROOT / "workflows/math.json").read_text())
    dialogs = record_dialogs(page)
    drop_file(page, "my drop.json", json.dumps(workflow).encode(), "application/json")
    wait_for_name(page, "my drop.json ●")  # named, and not saved yet
    saved = server.workflows_dir / "my drop.json"
    try:
        page.click("#btn-save")  # a new name: saved without asking
        wait_for_name(page, "my drop.json")
        assert json.loads(saved.read_text()) == graph_workflow(page) and dialogs == []

        # The file picker (Import…): a file of a name that exists replaces it only once the user says so.
        changed = json.loads(json.dumps(workflow))
        changed["nodes"]["1"]["inputs"]["value"] = 7
        with page.expect_file_chooser() as chooser:
            page.click("#btn-import")
        chooser.value.set_files({"name": "my drop.json", "mimeType": "application/json",
                                 "buffer": json.dumps(changed).encode()})
        wait_for_name(page, "my drop.json ●")
        assert essence(graph_workflow(page)) == essence(changed)
        page.click("#btn-save")
        wait_for_name(page, "my drop.json")
        assert dialogs == ["Replace my drop.json?"]
        assert json.loads(saved.read_text())["nodes"]["1"]["inputs"]["value"] == 7
    finally:
        saved.unlink(missing_ok=True)
