"""ComfyUI's UI format: to our graph (widgets, seed controls, Reroute, Primitive, modes, notes) and back."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from nodegraph import workflow as wf
from nodegraph.cli import main
from nodegraph.comfy_ui_format import to_api, to_graph, to_ui
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.validate import validate


def node(node_id: int, type_: str, widgets: Any = None, inputs: list[dict[str, Any]] | None = None,
         mode: int = 0, **extra: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"id": node_id, "type": type_, "pos": [10 * node_id, 20], "size": [315, 80],
                             "mode": mode, "inputs": inputs or [], "outputs": [], **extra}
    if widgets is not None:
        found["widgets_values"] = widgets
    return found


def slot(name: str, link: int | None, widget: bool = False) -> dict[str, Any]:
    return {"name": name, "type": "*", "link": link, **({"widget": {"name": name}} if widget else {})}


def ui(nodes: list[dict[str, Any]], links: list[list[Any]]) -> dict[str, Any]:
    return {"last_node_id": 99, "last_link_id": 99, "nodes": nodes, "links": links, "groups": [], "version": 0.4}


def inputs_of(graph: dict[str, Any]) -> dict[str, Any]:
    return {node_id: entry["inputs"] for node_id, entry in graph["nodes"].items()}


def test_widgets_values_follow_the_schema_order_with_the_seed_control(registry: Registry) -> None:
    flow = ui([node(3, "KSampler", [42, "randomize", 4, 7.5, "euler", "karras", 0.9],
                    [slot("model", 1), slot("positive", 2), slot("negative", 3), slot("latent_image", 4)]),
               node(5, "KSamplerAdvanced", ["enable", 7, "fixed", 20, 8, "euler", "normal", 0, 10, "disable"])],
              [[1, 10, 0, 3, 0, "MODEL"], [2, 11, 0, 3, 1, "CONDITIONING"], [3, 12, 0, 3, 2, "CONDITIONING"],
               [4, 13, 0, 3, 3, "LATENT"]])
    graph = to_graph(flow, registry.get)
    assert inputs_of(graph)["3"] == {"seed": 42, "steps": 4, "cfg": 7.5, "sampler_name": "euler",
                                     "scheduler": "karras", "denoise": 0.9, "model": ["10", 0],
                                     "positive": ["11", 0], "negative": ["12", 0], "latent_image": ["13", 0]}
    assert graph["nodes"]["3"]["ui"] == {"control_after_generate": "randomize", "pos": [30, 20], "size": [315, 80]}
    assert inputs_of(graph)["5"] == {"add_noise": "enable", "noise_seed": 7, "steps": 20, "cfg": 8,
                                     "sampler_name": "euler", "scheduler": "normal", "start_at_step": 0,
                                     "end_at_step": 10, "return_with_leftover_noise": "disable"}
    assert "control_after_generate" not in graph["nodes"]["5"]["ui"]  # "fixed" is the default


def test_a_linked_widget_input_takes_the_link(registry: Registry) -> None:
    flow = ui([node(1, "Int", [2]), node(2, "Math", [1.0, 5.0, "add"], [slot("b", 7, widget=True)]),
               node(3, "Show", None, [slot("value", 8)])],
              [[7, 1, 0, 2, 1, "INT"], [8, 2, 0, 3, 0, "FLOAT"]])
    assert inputs_of(to_graph(flow, registry.get)) == {
        "1": {"value": 2}, "2": {"a": 1.0, "b": ["1", 0], "op": "add"}, "3": {"value": ["2", 0]}}


def test_reroutes_are_followed_and_primitives_feed_their_values(registry: Registry, executor: Executor) -> None:
    flow = ui([node(1, "Int", [2]),
               node(10, "Reroute", None, [slot("", 1)]), node(11, "Reroute", None, [slot("", 2)]),
               node(12, "PrimitiveNode", [40, "fixed"]), node(13, "PrimitiveFloat", [0.5]),
               node(2, "Math", [0.0, 5.0, "add"], [slot("a", 3, widget=True), slot("b", 4, widget=True)]),
               node(3, "Show", None, [slot("value", 5)]), node(7, "Show", None, [slot("value", 6)]),
               node(4, "Note", ["a note is not a node"]), node(6, "MarkdownNote", ["# nor this"])],
              [[1, 1, 0, 10, 0, "INT"], [2, 10, 0, 11, 0, "INT"], [3, 11, 0, 2, 0, "INT"], [4, 12, 0, 2, 1, "FLOAT"],
               [5, 2, 0, 3, 0, "FLOAT"], [6, 13, 0, 7, 0, "FLOAT"]])
    graph = to_graph(flow, registry.get)
    assert sorted(graph["nodes"]) == ["1", "2", "3", "7"]  # no Reroute, Primitive or Note is left
    assert inputs_of(graph)["7"] == {"value": 0.5}
    assert inputs_of(graph)["2"] == {"a": ["1", 0], "b": 40, "op": "add"}  # the Primitive's value, not 5.0
    result = executor.run(flow)  # the UI format runs as it is
    assert result.status == "ok" and result.nodes["3"].outputs["value"] == 42


def test_bypass_passes_the_matching_input_and_mute_drops_what_needs_the_node(registry: Registry,
                                                                            executor: Executor) -> None:
    flow = ui([node(1, "Int", [2]), node(2, "Math", [0.0, 5.0, "add"], [slot("a", 1, widget=True)], mode=4),
               node(3, "Show", None, [slot("value", 2)]),
               node(4, "Math", [1.0, 1.0, "add"], mode=2), node(5, "Show", None, [slot("value", 3)]),
               node(6, "Show", None, [slot("value", 4)])],
              [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "FLOAT"], [3, 4, 0, 5, 0, "FLOAT"], [4, 5, 0, 6, 0, "*"]])
    graph = to_graph(flow, registry.get)
    modes = {node_id: entry.get("mode") for node_id, entry in graph["nodes"].items()}
    assert modes == {"1": None, "2": "bypass", "3": None, "4": "mute", "5": "mute", "6": "mute"}
    result = executor.run(flow)
    assert result.status == "ok" and result.nodes["3"].outputs["value"] == 2  # Int's value, past the Math
    assert sorted(result.nodes) == ["1", "3"]


def test_an_unknown_type_is_a_validation_error_naming_the_node(registry: Registry) -> None:
    flow = ui([node(1, "Int", [2]), node(7, "WASImageBlend", [0.5], [slot("image_a", 1)])], [[1, 1, 0, 7, 0, "INT"]])
    _, problems = validate(flow, registry)
    assert [(p.node_id, p.code) for p in problems] == [("7", "unknown_node_type")]
    assert "WASImageBlend" in problems[0].message


@pytest.mark.parametrize("flow, code, node_id", [
    (ui([{"type": "Int"}], []), "invalid_node", None),
    (ui([{"id": 4, "type": 5}], []), "invalid_node", "4"),
    (ui([node(1, "Int", [1])], [["x"]]), "bad_link", None),
    ({"nodes": [], "links": 3}, "invalid_shape", None),
    (ui([node(1, "Int", [1])], [[[1], 1, 0, 2, 0, "INT"]]), "bad_link", None),
    ({"nodes": [{"id": 1, "type": "Show", "inputs": 5, "widgets_values": 4}], "links": [], "groups": 1.5},
     "missing_input", "1"),  # junk where lists belong is ignored: what is left is validated
])
def test_a_malformed_ui_file_is_a_structured_error(registry: Registry, flow: Any, code: str,
                                                   node_id: str | None) -> None:
    _, problems = validate(flow, registry)
    assert [(p.node_id, p.code) for p in problems] == [(node_id, code)]


def test_groups_titles_and_version_1_links_are_kept(registry: Registry) -> None:
    flow = {"version": 1, "nodes": [node(1, "Int", [3], title="three"), node(2, "Show", None, [slot("value", 9)])],
            "links": [{"id": 9, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "INT"}],
            "groups": [{"title": "G", "bounding": [0, 0, 100, 100], "color": "#335", "flags": {}}]}
    graph = to_graph(flow, registry.get)
    assert graph["nodes"]["1"]["title"] == "three" and inputs_of(graph)["2"] == {"value": ["1", 0]}
    assert graph["ui"] == {"groups": [{"title": "G", "color": "#335", "bounding": [0, 0, 100, 100]}]}


def test_our_graph_to_comfyui_and_back_is_the_same_graph(registry: Registry) -> None:
    ours = wf.load(Path(__file__).parents[1] / "workflows" / "comfyui" / "txt2img_lora.json")
    ours["nodes"]["3"]["ui"]["control_after_generate"] = "increment"
    ours["nodes"]["10"]["mode"] = "bypass"
    again = to_graph(to_ui(ours, registry.get), registry.get)
    assert {k: (e["type"], e["inputs"], e.get("mode"), e.get("title")) for k, e in again["nodes"].items()} == \
        {k: (e["type"], e["inputs"], e.get("mode"), e.get("title")) for k, e in ours["nodes"].items()}
    assert again["nodes"]["3"]["ui"]["control_after_generate"] == "increment"
    prompt = to_api(ours, registry.get)  # no bypassed node in ComfyUI's prompt: its links go past it
    assert "10" not in prompt
    assert prompt["3"]["inputs"]["model"] == ["4", 0] and prompt["6"]["inputs"]["clip"] == ["4", 1]
    del ours["nodes"]["10"]["mode"]
    assert wf.lower_comfy_api(to_api(ours, registry.get))["nodes"]["10"]["inputs"] == ours["nodes"]["10"]["inputs"]


def test_named_outputs_become_indices_in_comfyuis_formats(registry: Registry) -> None:
    ours = {"format": "nodegraph/1", "ui": {}, "nodes": {"1": {"type": "Int", "inputs": {"value": 1}},
                                                         "2": {"type": "Show", "inputs": {"value": ["1", "value"]}}}}
    assert to_api(ours, registry.get)["2"]["inputs"] == {"value": ["1", 0]}
    assert to_ui(ours, registry.get)["links"] == [[1, 1, 0, 2, 0, "*"]]


def webp_with(tags: dict[int, str]) -> bytes:
    image = Image.new("RGB", (4, 4))
    exif = image.getexif()
    for tag, text in tags.items():
        exif[tag] = text
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", exif=exif)
    return buffer.getvalue()


def test_comfyuis_webp_is_read_like_its_png(tmp_path: Path, registry: Registry) -> None:
    prompt = {"4": {"class_type": "Int", "inputs": {"value": 2}},
              "5": {"class_type": "Show", "inputs": {"value": ["4", 0]}}}
    editor = ui([node(4, "Int", [9]), node(5, "Show", None, [slot("value", 1)])], [[1, 4, 0, 5, 0, "INT"]])
    # As ComfyUI's SaveAnimatedWEBP: the prompt in Model (0x0110), the workflow in Make (0x010F), other
    # extra keys in the tags below it (0x010E, ImageDescription, …).
    both = webp_with({0x0110: "prompt:" + json.dumps(prompt), 0x010F: "workflow:" + json.dumps(editor),
                      0x010E: "other:{}"})
    assert inputs_of(wf.loads(both, "x.webp", registry)) == {"4": {"value": 2}, "5": {"value": ["4", 0]}}
    only_ui = webp_with({0x010F: "workflow:" + json.dumps(editor)})
    assert inputs_of(wf.loads(only_ui, "x.webp", registry)) == {"4": {"value": 9}, "5": {"value": ["4", 0]}}
    (tmp_path / "a.webp").write_bytes(only_ui)
    assert main(["validate", str(tmp_path / "a.webp")]) == 0
    with pytest.raises(wf.WorkflowError, match="WebP without an embedded workflow") as err:
        wf.loads(webp_with({}), "plain.webp")
    assert err.value.code == "no_workflow"


def test_the_command_line_runs_a_ui_file_with_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flow = ui([node(1, "Int", [2]), node(2, "Show", None, [slot("value", 1)])], [[1, 1, 0, 2, 0, "INT"]])
    (tmp_path / "ui.json").write_text(json.dumps(flow))
    assert main(["run", str(tmp_path / "ui.json"), "--set", "1.value=5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"]["2"]["outputs"]["value"] == 5


def subgraph(sub_id: str, nodes: list[dict[str, Any]], links: list[list[Any]], inputs: list[dict[str, Any]],
             outputs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": sub_id, "name": sub_id, "nodes": nodes, "links": links, "inputs": inputs, "outputs": outputs}


def test_nested_subgraphs_are_inlined(registry: Registry, executor: Executor) -> None:
    """Int → [outer: Math(+10) → [inner: Math(+100)]] → Show: links run into and out of both subgraphs."""
    inner = subgraph("inner-uuid", [node(1, "Math", [0.0, 100.0, "add"], [slot("a", 1, widget=True)])],
                     [[1, -10, 0, 1, 0, "FLOAT"], [2, 1, 0, -20, 0, "FLOAT"]],
                     [{"name": "v", "type": "FLOAT", "linkIds": [1]}], [{"name": "out", "linkIds": [2]}])
    outer = subgraph("outer-uuid", [node(1, "Math", [0.0, 10.0, "add"], [slot("a", 1, widget=True)]),
                                    node(2, "inner-uuid", None, [slot("v", 2)])],
                     [[1, -10, 0, 1, 0, "FLOAT"], [2, 1, 0, 2, 0, "FLOAT"], [3, 2, 0, -20, 0, "FLOAT"]],
                     [{"name": "x", "type": "FLOAT", "linkIds": [1]}], [{"name": "y", "linkIds": [3]}])
    flow = ui([node(1, "Int", [2]), node(5, "outer-uuid", None, [slot("x", 7)]),
               node(2, "Show", None, [slot("value", 8)])], [[7, 1, 0, 5, 0, "INT"], [8, 5, 0, 2, 0, "FLOAT"]])
    flow["definitions"] = {"subgraphs": [inner, outer]}
    graph = to_graph(flow, registry.get)
    assert inputs_of(graph) == {"1": {"value": 2}, "5:1": {"a": ["1", 0], "b": 10.0, "op": "add"},
                                "5:2:1": {"a": ["5:1", 0], "b": 100.0, "op": "add"}, "2": {"value": ["5:2:1", 0]}}
    result = executor.run(flow)
    assert result.status == "ok" and result.nodes["2"].outputs["value"] == 112
    flow["nodes"][1]["mode"] = 2  # a muted instance mutes what is inside, and what needs it
    modes = {k: e.get("mode") for k, e in to_graph(flow, registry.get)["nodes"].items()}
    assert modes == {"1": None, "5:1": "mute", "5:2:1": "mute", "2": "mute"}


def test_a_subgraph_inside_itself_is_an_error_not_a_recursion(registry: Registry) -> None:
    loop = subgraph("loop", [node(1, "loop", None, [])], [], [], [{"name": "y", "linkIds": []}])
    flow = ui([node(1, "loop", None, [])], [])
    flow["definitions"] = {"subgraphs": [loop]}
    _, problems = validate(flow, registry)
    assert [p.code for p in problems] == ["invalid_shape"] and "nested deeper" in problems[0].message
