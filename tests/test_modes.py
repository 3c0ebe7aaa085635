"""Bypass and mute, as the editor saves them (`"mode"` on a node), honoured by validation and the executor."""

from __future__ import annotations

from typing import Any

from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.validate import validate
from tests.conftest import workflow


def chain(**modes: str) -> dict[str, Any]:
    """Int 3 → Math(+4.5) → Math(×2) → Show; `modes` maps node ids ("n2") to a mode."""
    nodes = {
        "1": {"type": "Int", "inputs": {"value": 3}},
        "2": {"type": "Math", "inputs": {"a": ["1", "value"], "b": 4.5, "op": "add"}},
        "3": {"type": "Math", "inputs": {"a": ["2", 0], "b": 2, "op": "multiply"}},
        "4": {"type": "Show", "inputs": {"value": ["3", "result"]}},
    }
    for key, mode in modes.items():
        nodes[key.removeprefix("n")]["mode"] = mode
    return workflow(nodes)


def test_a_bypassed_node_passes_its_first_input_of_the_same_type_through(executor: Executor) -> None:
    result = executor.run(chain(n2="bypass"))
    assert result.status == "ok"
    assert result.nodes["4"].outputs == {"value": 6.0}  # (3) × 2: the +4.5 was skipped
    assert "2" not in result.nodes


def test_chained_bypasses_follow_through_to_an_active_node(executor: Executor) -> None:
    result = executor.run(chain(n2="bypass", n3="bypass"))
    assert result.status == "ok"
    assert result.nodes["4"].outputs == {"value": 3}


def test_a_bypassed_node_passes_a_literal_input_through(registry: Registry) -> None:
    # Int's own `value` (3, written on it) becomes Math's `a`.
    graph, problems = validate(chain(n1="bypass"), registry)
    assert problems == [] and graph is not None
    assert graph.steps["2"].literals["a"] == 3 and "a" not in graph.steps["2"].links
    assert "1" not in graph.steps


def test_a_muted_node_is_left_out_and_a_required_link_from_it_is_reported(registry: Registry) -> None:
    graph, problems = validate(chain(n4="mute"), registry)
    assert graph is None
    assert [(p.node_id, p.code) for p in problems] == [(None, "no_output_node")]

    muted_source = chain(n3="mute")
    graph, problems = validate(muted_source, registry)
    assert graph is None
    assert [(p.node_id, p.input, p.code) for p in problems] == [("4", "value", "missing_input")]
    assert "node 3, which is muted" in problems[0].message


def test_a_muted_side_branch_does_not_run(executor: Executor) -> None:
    wf = chain()
    wf["nodes"]["5"] = {"type": "Show", "inputs": {"value": ["1", 0]}, "mode": "mute"}
    result = executor.run(wf)
    assert result.status == "ok"
    assert set(result.nodes) == {"1", "2", "3", "4"}


def test_an_unknown_mode_is_an_error_on_its_node(registry: Registry) -> None:
    graph, problems = validate(chain(n2="off"), registry)
    assert graph is None
    assert [(p.node_id, p.code) for p in problems] == [("2", "invalid_mode")]
    assert "'off'" in problems[0].message
