"""The utility nodes: primitives, Math, Format (safe templates only) and Show."""

from __future__ import annotations

from typing import Any

import pytest

from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.validate import validate
from tests.conftest import workflow


def show(executor: Executor, node: dict[str, Any], output: str | int = 0,
         extra: dict[str, Any] | None = None) -> Any:
    result = executor.run(workflow({"1": node, "2": {"type": "Show", "inputs": {"value": ["1", output]}},
                                    **(extra or {})}))
    if result.status != "ok":
        return [(p.node_id, p.input, p.code) for p in result.errors]
    return result.nodes["2"].outputs["value"]


@pytest.mark.parametrize("kind, value", [("Int", -7), ("Float", 2.5), ("String", "a\nb"), ("Boolean", True)])
def test_primitives_pass_their_value(executor: Executor, kind: str, value: Any) -> None:
    assert show(executor, {"type": kind, "inputs": {"value": value}}) == value


def test_float_widens_an_int_literal(executor: Executor) -> None:
    out = show(executor, {"type": "Float", "inputs": {"value": 2}})
    assert out == 2.0 and isinstance(out, float)


@pytest.mark.parametrize("op, a, b, expected", [
    ("add", 1, 2, 3.0), ("subtract", 1, 2, -1.0), ("multiply", 3, 2.5, 7.5), ("divide", 1, 4, 0.25),
    ("power", 2, 10, 1024.0), ("min", 1, -2, -2.0), ("max", 1, -2, 1.0),
])
def test_math(executor: Executor, op: str, a: float, b: float, expected: float) -> None:
    assert show(executor, {"type": "Math", "inputs": {"a": a, "b": b, "op": op}}) == expected


@pytest.mark.parametrize("a, b, op, code", [
    (1, 0, "divide", "division_by_zero"), (0, -1, "power", "division_by_zero"),
    (-8, 0.5, "power", "not_real"), (10, 400, "power", "overflow"), (1e308, 10, "multiply", "overflow"),
])
def test_math_errors_are_node_errors(executor: Executor, a: float, b: float, op: str, code: str) -> None:
    [(node_id, _, got)] = show(executor, {"type": "Math", "inputs": {"a": a, "b": b, "op": op}})
    assert (node_id, got) == ("1", code)


def test_format_fills_placeholders_from_optional_inputs(executor: Executor) -> None:
    node = {"type": "Format", "inputs": {"template": "{a} x {b:.2f} = {c}!", "a": "two", "b": ["3", 0]}}
    assert show(executor, node, extra={"3": {"type": "Float", "inputs": {"value": 1.5}}}) == "two x 1.50 = !"
    assert show(executor, {"type": "Format", "inputs": {"template": "{{a}} {a}", "a": 1}}) == "{a} 1"


@pytest.mark.parametrize("template", ["{a.__class__}", "{x}", "{a[0]}", "{}", "{0}", "{a!r}", "{a:99999999}",
                                      "{a", "}"])
def test_format_refuses_anything_but_plain_placeholders(registry: Registry, template: str) -> None:
    _, problems = validate(workflow({"1": {"type": "Format", "inputs": {"template": template, "a": "s"}},
                                     "2": {"type": "Show", "inputs": {"value": ["1", 0]}}}), registry)
    assert [(p.node_id, p.input, p.code) for p in problems] == [("1", "template", "invalid_value")]


def test_format_checks_a_linked_template_when_it_runs(executor: Executor) -> None:
    node = {"type": "Format", "inputs": {"template": ["3", 0], "a": "s"}}
    errors = show(executor, node, extra={"3": {"type": "String", "inputs": {"value": "{a.__class__}"}}})
    assert errors == [("1", "template", "invalid_value")]


def test_show_reports_values_of_any_type(executor: Executor) -> None:
    result = executor.run(workflow({"1": {"type": "MakeThing"}, "2": {"type": "Show", "inputs": {"value": ["1", 0]}}}))
    assert result.to_json()["nodes"]["2"]["outputs"] == {"value": {"$type": "Thing"}}
