"""Editing in a real browser: undo/redo, delete without rewiring, groups, the node search, link
drop, bypass, the textarea, number widgets, the title prompt and the colour menu.

Like test_editor.py, each test drives the page as a user does and reads the result from the
page's graph, the saved file or the server's job record.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from tests.browser.conftest import Server
from tests.browser.test_editor import drag, graph_workflow, open_workflow, queue_and_wait, to_screen

MATH = {"format": "nodegraph/1", "nodes": {
    "1": {"type": "Int", "inputs": {"value": 3}, "ui": {"pos": [40, 80]}},
    "2": {"type": "Math", "inputs": {"a": ["1", "value"], "b": 4.5, "op": "add"}, "ui": {"pos": [320, 80]}},
    "3": {"type": "Show", "inputs": {"value": ["2", "result"]}, "ui": {"pos": [640, 80]}}}, "ui": {}}


def show(page: Any, workflow: dict[str, Any]) -> None:
    page.evaluate("wf => window.nodegraph.files.show(wf, null)", copy.deepcopy(workflow))
    page.wait_for_function("n => window.nodegraph.graph._nodes.length === n", arg=len(workflow["nodes"]))


def click_title(page: Any, node_id: int, double: bool = False) -> None:
    x, y = page.evaluate("id => { const n = window.nodegraph.graph.getNodeById(id); "
                         "return [n.pos[0] + 30, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2]; }", node_id)
    (page.mouse.dblclick if double else page.mouse.click)(*to_screen(page, x, y))


def links(page: Any) -> list[tuple[str, str, str, str]]:
    """Every link of the shown workflow as (source, output, target, input)."""
    nodes = graph_workflow(page)["nodes"]
    return sorted((v[0], str(v[1]), k, name) for k, n in nodes.items() for name, v in n["inputs"].items()
                  if isinstance(v, list) and len(v) == 2)


def test_delete_does_not_rewire_and_undo_redo_restore_the_node_and_its_links(page: Any) -> None:
    show(page, MATH)
    before = graph_workflow(page)
    click_title(page, 2)
    page.keyboard.press("Delete")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 2")
    assert links(page) == []  # Int is not silently wired into Show
    page.keyboard.press("Control+z")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 3")
    assert graph_workflow(page)["nodes"] == before["nodes"]
    page.keyboard.press("Control+Shift+z")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 2")
    page.keyboard.press("Control+z")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 3")

    # A widget edit and a move are undone one step at a time; Ctrl+Y redoes.
    steps = page.evaluate("() => window.nodegraph.history.undoStack.length")
    page.evaluate("() => { const n = window.nodegraph.graph.getNodeById(2); "
                  "n.widgets.find(w => w.name === 'b').callback(7.5); }")
    page.wait_for_function("n => window.nodegraph.history.undoStack.length === n", arg=steps + 1)
    drag(page, to_screen(page, 350, 70), to_screen(page, 350, 270))
    page.wait_for_function("n => window.nodegraph.history.undoStack.length === n", arg=steps + 2)
    assert graph_workflow(page)["nodes"]["2"]["ui"]["pos"][1] == 280
    page.keyboard.press("Control+z")
    assert graph_workflow(page)["nodes"]["2"]["ui"]["pos"] == [320, 80]
    assert graph_workflow(page)["nodes"]["2"]["inputs"]["b"] == 7.5
    page.keyboard.press("Control+z")
    assert graph_workflow(page)["nodes"]["2"]["inputs"]["b"] == 4.5
    page.keyboard.press("Control+y")
    assert graph_workflow(page)["nodes"]["2"]["inputs"]["b"] == 7.5

    # A paste (Ctrl+C, Ctrl+V at the mouse) is one step too.
    click_title(page, 1)
    page.keyboard.press("Control+c")
    page.mouse.move(*to_screen(page, 60, 400))
    page.keyboard.press("Control+v")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 4")
    page.keyboard.press("Control+z")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 3")

    # Ctrl+Delete asks for the rewiring: one visible step, undone like any other.
    click_title(page, 2)
    page.keyboard.press("Control+Delete")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 2")
    assert links(page) == [("1", "value", "3", "value")]
    page.keyboard.press("Control+z")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 3")
    assert links(page) == [("1", "value", "2", "a"), ("2", "result", "3", "value")]


def test_a_group_is_saved_restored_and_moves_its_nodes(page: Any, server: Server) -> None:
    show(page, MATH)
    page.evaluate("""() => {
        const group = new LGraphGroup("Numbers");
        group._bounding.set([20, 20, 560, 220]);
        window.nodegraph.graph.add(group);
        window.nodegraph.canvas.setDirty(true, true);
    }""")
    # Its colour from the group's menu (litegraph's own menu used inline styles the CSP refuses).
    page.mouse.click(*to_screen(page, 60, 30), button="right")
    page.click(".litecontextmenu .litemenu-entry:has-text('Edit Group')")
    page.click(".litecontextmenu .litemenu-entry:has-text('Color')")
    page.click(".litecontextmenu .litemenu-entry:has-text('green')")
    # Dragging the group's title moves the nodes inside it.
    drag(page, to_screen(page, 200, 30), to_screen(page, 300, 80))
    nodes = graph_workflow(page)["nodes"]
    assert [nodes[k]["ui"]["pos"] for k in "123"] == [[140, 130], [420, 130], [640, 80]]

    page.click("#btn-save-as")
    page.fill("#name-input", "grouped.json")
    page.click("#name-ok")
    page.wait_for_function("() => document.getElementById('workflow-name').textContent === 'grouped.json'")
    saved = json.loads((server.workflows_dir / "grouped.json").read_text())
    assert saved["ui"]["groups"] == [{"title": "Numbers", "color": "#8A8", "bounding": [120, 70, 560, 220]}]
    assert server.post("/api/validate", {"workflow": saved})["ok"] is True

    page.click("#btn-new")
    page.wait_for_function("() => window.nodegraph.graph._groups.length === 0")
    open_workflow(page, "grouped.json")
    assert page.evaluate("() => window.nodegraph.graph._groups.map(g => [g.title, g.color, [...g._bounding]])") == \
        [["Numbers", "#8A8", [120, 70, 560, 220]]]
    assert graph_workflow(page) == saved


def search(page: Any, text: str) -> list[dict[str, str]]:
    page.fill("#node-search-input", text)
    return page.eval_on_selector_all("#node-search-results li[data-type]", """items => items.map(li => ({
        type: li.dataset.type, description: li.querySelector('.description').textContent}))""")


def test_search_matches_names_inputs_and_descriptions_and_shows_them(page: Any, server: Server) -> None:
    catalog = server.get("/api/nodes")["nodes"]
    page.click("#btn-add")
    found = search(page, "sampler")
    assert [r["type"] for r in found[:2]] == ["KSampler", "KSamplerAdvanced"]
    assert all(r["description"] == catalog[r["type"]]["description"] for r in found)
    seeded = [r["type"] for r in search(page, "seed")]
    assert {"Sample", "KSampler", "KSamplerAdvanced"} <= set(seeded)
    assert [r["type"] for r in search(page, "lora strength")][0] in ("LoadLoRA", "LoraLoader")
    assert search(page, "zzzz") == [] and page.is_visible("#node-search-results li.none")
    page.keyboard.press("Escape")
    assert page.is_hidden("#node-search")


def test_a_link_dropped_on_the_canvas_offers_compatible_nodes_and_connects_the_choice(
        page: Any, server: Server) -> None:
    catalog = server.get("/api/nodes")["nodes"]
    takes_model = {t for t, n in catalog.items()
                   if any(i["type"] in ("MODEL", "*") and i["accepts"] != "literal" for i in n["inputs"])}
    open_workflow(page, "lora.json")
    start = page.evaluate("() => { const n = window.nodegraph.graph.getNodeById(1); "
                          "return n.getConnectionPos(false, n.findOutputSlot('model')); }")
    drag(page, to_screen(page, *start), to_screen(page, start[0] + 120, start[1] + 330))
    page.wait_for_selector("#node-search:not([hidden])")
    assert page.text_content("#node-search-filter") == "nodes that take MODEL"
    offered = [r["type"] for r in search(page, "")]
    assert offered and set(offered) <= takes_model and "SaveImage" not in offered
    assert "LoadLoRA" in [r["type"] for r in search(page, "lora")]
    page.click("#node-search-results li[data-type=LoadLoRA]")
    page.wait_for_function("() => window.nodegraph.graph._nodes.length === 5")
    new = max(int(k) for k in graph_workflow(page)["nodes"])
    assert graph_workflow(page)["nodes"][str(new)]["inputs"]["model"] == ["1", "model"]


def test_a_bypassed_node_passes_its_input_to_its_consumer(page: Any, server: Server) -> None:
    show(page, MATH)
    click_title(page, 2)
    page.keyboard.press("Control+b")
    assert graph_workflow(page)["nodes"]["2"]["mode"] == "bypass"
    job = queue_and_wait(page)
    assert job["status"] == "ok"
    assert job["nodes"]["3"]["outputs"]["value"] == 3  # Int's value, not 3 + 4.5
    assert job["workflow"]["nodes"]["2"]["mode"] == "bypass"
    x, y = page.evaluate("() => { const n = window.nodegraph.graph.getNodeById(2); "
                         "return [n.pos[0] + 30, n.pos[1] + 10]; }")
    page.mouse.click(*to_screen(page, x, y), button="right")  # the node's menu
    page.click(".litecontextmenu .litemenu-entry:has-text('Mute (Ctrl+M)')")
    assert graph_workflow(page)["nodes"]["2"]["mode"] == "mute"
    page.keyboard.press("Control+m")
    assert "mode" not in graph_workflow(page)["nodes"]["2"]


def test_multiline_text_is_a_textarea_on_the_node_and_numbers_snap_and_clamp(page: Any) -> None:
    open_workflow(page, "lora.json")
    area = page.locator(".node-text[data-input=prompt]")
    area.wait_for(state="visible")
    box, canvas = area.bounding_box(), page.locator("#graph-canvas").bounding_box()
    assert box["height"] > 30 and canvas["x"] <= box["x"] and box["x"] + box["width"] <= canvas["x"] + canvas["width"]
    area.click()
    page.keyboard.press("Control+a")
    page.keyboard.type("a red fox\nin the snow")
    assert graph_workflow(page)["nodes"]["3"]["inputs"]["prompt"] == "a red fox\nin the snow"
    # What was typed is one undo step, taken when the textarea is left.
    steps = page.evaluate("() => window.nodegraph.history.undoStack.length")
    page.mouse.click(*to_screen(page, 0, 500))
    page.wait_for_function("n => window.nodegraph.history.undoStack.length === n + 1", arg=steps)
    page.keyboard.press("Control+z")
    assert graph_workflow(page)["nodes"]["3"]["inputs"]["prompt"] == "a watercolour fox in the snow"
    assert area.input_value() == "a watercolour fox in the snow"
    values = page.evaluate("""() => {
        const node = window.nodegraph.graph.getNodeById(3), w = (name) => node.widgets.find(x => x.name === name);
        const out = [];
        for (const [name, v] of [["width", 65], ["width", 100000], ["steps", 0], ["guidance", 7.349]]) {
            w(name).callback(v);
            out.push(w(name).value);
        }
        return out;
    }""")
    assert values == [64, 8192, 1, 7.3]


def test_double_click_renames_a_node_in_a_prompt_inside_the_window(page: Any) -> None:
    show(page, MATH)
    page.evaluate("() => { const c = window.nodegraph.canvas; c.ds.scale = 1; "
                  "c.ds.offset = [c.canvas.width - 700, 100]; c.setDirty(true, true); }")
    click_title(page, 3, double=True)  # Show, 60 px from the canvas's right edge
    dialog = page.locator(".graphdialog")
    dialog.wait_for(state="visible")
    box = dialog.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 1400 and box["y"] + box["height"] <= 820
    dialog.locator("input").fill("total")
    dialog.locator("input").press("Enter")
    assert graph_workflow(page)["nodes"]["3"]["title"] == "total"
