"""Validation: every error code, every problem at once, and no traceback on any input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodegraph.registry import Registry
from nodegraph.settings import Settings
from nodegraph.validate import validate
from tests.conftest import workflow

SHOW = {"type": "Show", "inputs": {"value": 1}}


def codes(registry: Registry, wf: Any) -> list[tuple[str | None, str | None, str]]:
    graph, problems = validate(wf, registry)
    assert (graph is None) == bool(problems)
    return [(p.node_id, p.input, p.code) for p in problems]


def test_valid_workflow_gives_a_graph(registry: Registry) -> None:
    graph, problems = validate(workflow({"1": {"type": "Int", "inputs": {"value": 3}},
                                         "2": {"type": "Math", "inputs": {"a": ["1", 0], "b": 2}},
                                         "3": {"type": "Show", "inputs": {"value": ["2", "result"]}}}), registry)
    assert problems == []
    assert graph is not None
    assert graph.steps["2"].links == {"a": ("1", "value")}  # index 0 resolved to the output's name
    assert graph.steps["2"].literals == {"b": 2, "op": "add"}  # defaults filled in
    assert graph.outputs == ["3"]


@pytest.mark.parametrize("wf, expected", [
    ([1, 2], [(None, None, "invalid_shape")]),
    ({"format": "nodegraph/1", "nodes": []}, [(None, None, "invalid_shape")]),
    ({"nodes": [], "links": []}, [(None, None, "no_output_node")]),  # ComfyUI's UI format, converted: empty
    ({"format": "other/2", "nodes": {"1": SHOW}}, [(None, None, "unknown_format")]),
    (workflow({"1": SHOW, "2": "Int"}), [("2", None, "invalid_node")]),
    (workflow({"1": SHOW, "2": {"inputs": {}}}), [("2", None, "invalid_node")]),
    (workflow({"1": SHOW, "": {"type": "Int"}}), [("", None, "invalid_node")]),
    (workflow({"1": SHOW, "2": {"type": "Int", "inputs": [1]}}), [("2", None, "invalid_node")]),
    (workflow({"1": SHOW, "2": {"type": "Nope"}}), [("2", None, "unknown_node_type")]),
    (workflow({"1": {"type": "Show", "inputs": {"value": 1, "colour": 2}}}), [("1", "colour", "unknown_input")]),
    (workflow({"1": {"type": "Show"}}), [("1", "value", "missing_input")]),
    (workflow({"1": {"type": "Show", "inputs": {"value": [1, 0]}}}), [("1", "value", "bad_link")]),
    (workflow({"1": {"type": "Show", "inputs": {"value": ["1x", True]}}}), [("1", "value", "bad_link")]),
    (workflow({"1": {"type": "Show", "inputs": {"value": ["9", 0]}}}), [("1", "value", "missing_node")]),
    (workflow({"1": {"type": "Int"}, "2": {"type": "Show", "inputs": {"value": ["1", "nope"]}}}),
     [("2", "value", "missing_output")]),
    (workflow({"1": {"type": "Int"}, "2": {"type": "Show", "inputs": {"value": ["1", 3]}}}),
     [("2", "value", "missing_output")]),
    (workflow({"1": {"type": "Boolean"}, "2": {"type": "Math", "inputs": {"a": ["1", 0]}}, "3": SHOW}),
     [("2", "a", "type_mismatch")]),
    (workflow({"1": SHOW, "2": {"type": "Math", "inputs": {"a": "x"}}}), [("2", "a", "wrong_type")]),
    (workflow({"1": SHOW, "2": {"type": "Int", "inputs": {"value": 1.5}}}), [("2", "value", "wrong_type")]),
    (workflow({"1": SHOW, "2": {"type": "Int", "inputs": {"value": True}}}), [("2", "value", "wrong_type")]),
    (workflow({"1": SHOW, "2": {"type": "Boolean", "inputs": {"value": 1}}}), [("2", "value", "wrong_type")]),
    (workflow({"1": SHOW, "2": {"type": "String", "inputs": {"value": {"a": 1}}}}), [("2", "value", "wrong_type")]),
    (workflow({"1": SHOW, "2": {"type": "Int", "inputs": {"value": 2**64}}}), [("2", "value", "out_of_range")]),
    (workflow({"1": SHOW, "2": {"type": "Float", "inputs": {"value": float("inf")}}}),
     [("2", "value", "out_of_range")]),
    (workflow({"1": SHOW, "2": {"type": "Slow", "inputs": {"steps": 0}}}), [("2", "steps", "out_of_range")]),
    (workflow({"1": SHOW, "2": {"type": "Math", "inputs": {"op": "modulo"}}}), [("2", "op", "not_a_choice")]),
    (workflow({"1": {"type": "UseThing", "inputs": {"thing": "a thing"}}}), [("1", "thing", "link_required")]),
    (workflow({"1": SHOW, "2": {"type": "Int"}, "3": {"type": "Int", "inputs": {"value": ["2", 0]}}}),
     [("3", "value", "literal_required")]),
    (workflow({"1": {"type": "Show", "inputs": {"value": ["2", 0]}},
               "2": {"type": "Show", "inputs": {"value": ["1", 0]}}}), [("1", None, "cycle")]),
    (workflow({"1": {"type": "Show", "inputs": {"value": ["1", 0]}}}), [("1", None, "cycle")]),
    (workflow({"1": {"type": "Int"}}), [(None, None, "no_output_node")]),
    (workflow({"1": SHOW, "2": {"type": "Format", "inputs": {"template": "{x}"}}}),
     [("2", "template", "invalid_value")]),
])
def test_each_error_code(registry: Registry, wf: Any, expected: list[Any]) -> None:
    assert codes(registry, wf) == expected


def test_every_problem_is_reported_at_once(registry: Registry) -> None:
    wf = workflow({
        "1": {"type": "Mathh"},
        "2": {"type": "Math", "inputs": {"a": ["9", 0], "b": "x", "op": "mod", "zz": 1}},
        "3": {"type": "Show", "inputs": {"value": ["4", 0]}},
        "4": {"type": "Show", "inputs": {"value": ["3", 0]}},
    })
    assert sorted(codes(registry, wf), key=str) == sorted([
        ("1", None, "unknown_node_type"), ("2", "zz", "unknown_input"), ("2", "a", "missing_node"),
        ("2", "b", "wrong_type"), ("2", "op", "not_a_choice"), ("3", None, "cycle")], key=str)


def test_messages_name_the_problem(registry: Registry) -> None:
    _, problems = validate(workflow({"1": {"type": "Maths"}, "2": {"type": "Math", "inputs": {"op": "mod"}},
                                     "3": {"type": "Show", "inputs": {"value": ["2", "res"]}}}), registry)
    messages = {p.node_id: p.message for p in problems}
    assert "did you mean 'Math'" in messages["1"]
    assert "'add'" in messages["2"]
    assert "0: result" in messages["3"]
    assert str(problems[0]).startswith("node 1: ")


def test_cycle_names_every_node_in_it(registry: Registry) -> None:
    nodes = {str(i): {"type": "Show", "inputs": {"value": [str((i + 1) % 4), 0]}} for i in range(4)}
    _, problems = validate(workflow(nodes), registry)
    assert [p.code for p in problems] == ["cycle"]
    assert all(n in problems[0].message for n in "0123")


def test_combo_fed_by_string_link_and_int_feeds_float(registry: Registry) -> None:
    wf = workflow({"1": {"type": "String", "inputs": {"value": "b"}}, "2": {"type": "MakeThing"},
                   "3": {"type": "UseThing", "inputs": {"thing": ["2", 0], "choice": ["1", 0]}},
                   "4": {"type": "Int"}, "5": {"type": "Math", "inputs": {"a": ["4", 0]}}, "6": SHOW})
    assert codes(registry, wf) == []


def test_huge_strings_are_truncated_in_messages(registry: Registry) -> None:
    _, problems = validate(workflow({"1": SHOW, "2": {"type": "Math", "inputs": {"op": "x" * 10_000_000}}}),
                           registry)
    assert problems[0].code == "not_a_choice" and len(problems[0].message) < 500


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4),
    max_leaves=30)
node_entries = st.fixed_dictionaries({"type": st.sampled_from(["Int", "Math", "Show", "Format", "X"])},
                                     optional={"inputs": st.dictionaries(
                                         st.sampled_from(["value", "a", "b", "op", "template", "q"]),
                                         json_values | st.tuples(st.sampled_from(["1", "2", "3"]),
                                                                 st.integers(-1, 2)).map(list), max_size=4)})


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.dictionaries(st.sampled_from(["1", "2", "3"]), node_entries).map(workflow)))
def test_any_json_gives_problems_or_a_graph_never_an_exception(registry: Registry, wf: Any) -> None:
    graph, problems = validate(wf, registry)
    assert (graph is None) != (problems == [])
    for p in problems:
        assert p.code and p.message


def model_settings(tmp_path: Path, names: list[str]) -> Settings:
    for name in names:
        (tmp_path / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
        (tmp_path / "models" / "checkpoints" / name).write_bytes(b"")
    return Settings(models_dirs=(tmp_path / "models",))


def loader(name: Any) -> dict[str, Any]:
    return workflow({"1": {"type": "LoadCheckpoint", "inputs": {"checkpoint": name}},
                     "2": {"type": "Show", "inputs": {"value": ["1", 0]}}})


def test_a_misspelt_model_file_gets_the_closest_name(registry: Registry, tmp_path: Path) -> None:
    names = [f"a{i:02}.safetensors" for i in range(20)] + ["zebra-xl.safetensors"]
    _, [problem] = validate(loader("zebra_xl.safetensors"), registry, model_settings(tmp_path, names))
    assert (problem.input, problem.code) == ("checkpoint", "not_a_choice")
    assert "did you mean 'zebra-xl.safetensors'?" in problem.message  # though not among the ten listed
    assert "(21 in all)" in problem.message


def test_other_choices_offer_the_closest_too(registry: Registry) -> None:
    _, [problem] = validate(workflow({"1": {"type": "Math", "inputs": {"op": "substract"}},
                                      "2": {"type": "Show", "inputs": {"value": ["1", 0]}}}), registry)
    assert problem.code == "not_a_choice" and "did you mean 'subtract'?" in problem.message


@pytest.mark.parametrize("name", ["a" * 256, "sub/" + "é" * 128 + ".safetensors", "x\udc80\ud800"])
def test_a_model_name_no_file_can_have_is_a_bad_name_written_or_linked(registry: Registry, tmp_path: Path,
                                                                        name: str) -> None:
    settings = model_settings(tmp_path, ["a.safetensors"])
    _, [problem] = validate(loader(name), settings=settings, registry=registry)
    assert (problem.node_id, problem.input, problem.code) == ("1", "checkpoint", "bad_name")
    wf = loader(["s", 0])
    wf["nodes"]["s"] = {"type": "String", "inputs": {"value": name}}
    _, [problem] = validate(wf, registry, settings)
    assert (problem.node_id, problem.input, problem.code) == ("1", "checkpoint", "bad_name")
    assert "from node s" in problem.message and str(tmp_path) not in problem.message


def test_a_link_of_the_wrong_shape_into_a_model_file_is_a_bad_link(registry: Registry, tmp_path: Path) -> None:
    assert codes(registry, loader([["s"], 0])) == [("1", "checkpoint", "bad_link")]


def test_a_misspelt_name_from_a_string_node_is_refused_before_running(registry: Registry, tmp_path: Path) -> None:
    wf = loader(["s", "value"])
    wf["nodes"]["s"] = {"type": "String", "inputs": {"value": "b.safetensor"}}
    _, [problem] = validate(wf, registry, model_settings(tmp_path, ["b.safetensors"]))
    assert (problem.node_id, problem.input, problem.code) == ("1", "checkpoint", "not_a_choice")
    assert "did you mean 'b.safetensors'?" in problem.message
