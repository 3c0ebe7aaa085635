"""Utility nodes that need no models: primitives, arithmetic, text formatting and Show.

They let graphs be built, run and tested without torch, and feed widgets of other nodes.
"""

from __future__ import annotations

import math
import operator
import re
import string
from collections.abc import Callable
from typing import Any

from nodegraph.context import Context, NodeFailure
from nodegraph.schema import ANY, Input, Node, Output


def _primitive(name: str, kind: str, noun: str, default: Any, **spec: Any) -> type[Node]:
    def run(self: Node, ctx: Context, value: Any) -> dict[str, Any]:
        return {"value": float(value) if kind == "FLOAT" else value}

    return type(
        name,
        (Node,),
        {
            "type": name,
            "version": "1.0.0",
            "category": "primitives",
            "__module__": __name__,
            "description": f"{noun}, to feed the inputs of several nodes at once.",
            "inputs": (Input("value", kind, default=default, mode="literal", **spec),),
            "constant_input": "value",
            "outputs": (Output("value", kind),),
            "run": run,
        },
    )


Int = _primitive("Int", "INT", "An integer", 0, min=-(2**63), max=2**63 - 1)
Float = _primitive("Float", "FLOAT", "A number", 0.0)
String = _primitive("String", "STRING", "A text", "", multiline=True)
Boolean = _primitive("Boolean", "BOOLEAN", "A true/false value", False)

OPERATIONS: dict[str, Callable[[float, float], Any]] = {
    "add": operator.add,
    "subtract": operator.sub,
    "multiply": operator.mul,
    "divide": operator.truediv,
    "power": operator.pow,
    "min": min,
    "max": max,
}


class Math(Node):
    type = "Math"
    version = "1.0.0"
    description = "Arithmetic on two numbers."
    inputs = (
        Input("a", "FLOAT", default=0.0),
        Input("b", "FLOAT", default=0.0),
        Input("op", "COMBO", default="add", choices=tuple(OPERATIONS)),
    )
    outputs = (Output("result", "FLOAT"),)

    def run(self, ctx: Context, a: float, b: float, op: str) -> dict[str, Any]:
        try:
            result = OPERATIONS[op](float(a), float(b))
        except ZeroDivisionError:
            raise NodeFailure(f"cannot {op} {a:g} by zero", "b", "division_by_zero") from None
        except OverflowError:
            raise NodeFailure(f"{a:g} {op} {b:g} is too large for a FLOAT", None, "overflow") from None
        if isinstance(result, complex):
            raise NodeFailure(f"{a:g} {op} {b:g} is not a real number", None, "not_real")
        if not math.isfinite(result):
            raise NodeFailure(f"{a:g} {op} {b:g} is too large for a FLOAT", None, "overflow")
        return {"result": float(result)}


# Format specs users need ("{a:.2f}", "{b:>4}") with widths capped, so a template cannot ask
# for a gigabyte of padding.
_FORMAT_SPEC = re.compile(r"^(.?[<>=^])?[+\- ]?#?0?\d{0,3}[,_]?(\.\d{1,2})?[bcdeEfFgGnosxX%]?$")
_FIELDS = ("a", "b", "c")


def template_problems(template: str) -> list[str]:
    """Why a Format template is unsafe or wrong; only {a}, {b} and {c} are ever substituted."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return [f"the template is malformed: {exc} (write {{{{ and }}}} for literal braces)"]
    problems = []
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in _FIELDS:
            problems.append(f"{{{field[:40]}}} is not a placeholder; use {{a}}, {{b}} or {{c}}")
        elif conversion or (spec and not _FORMAT_SPEC.match(spec)):
            problems.append(f"{{{field}}}: unsupported format {spec[:40]!r}")
    return problems


class Format(Node):
    type = "Format"
    version = "1.0.0"
    description = "Text from a template: {a}, {b} and {c} are replaced by the optional inputs."
    inputs = (
        Input("template", "STRING", default="{a}", multiline=True),
        *(Input(name, ANY, optional=True) for name in _FIELDS),
    )
    outputs = (Output("text", "STRING"),)

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        return [("template", p) for p in template_problems(literals.get("template", ""))]

    def run(self, ctx: Context, template: str, **values: Any) -> dict[str, Any]:
        problems = template_problems(template)
        if problems:
            raise NodeFailure("; ".join(problems), "template", "invalid_value")
        filled = {name: "" if values.get(name) is None else values[name] for name in _FIELDS}
        try:
            return {"text": template.format(**filled)}
        except (ValueError, TypeError) as exc:
            raise NodeFailure(f"cannot format the template: {exc}", "template") from None


class Show(Node):
    type = "Show"
    version = "1.0.0"
    description = "Shows a value of any type in the run's result and on the node in the editor."
    inputs = (Input("value", ANY),)
    outputs = (Output("value", ANY),)
    output_node = True

    def run(self, ctx: Context, value: Any) -> dict[str, Any]:
        return {"value": value}


NODES: list[type[Node]] = [Int, Float, String, Boolean, Math, Format, Show]
