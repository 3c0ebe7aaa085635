"""The node contract: socket types, input and output specs, and the `Node` base class.

A node is a small typed class: a `type` name, a semver `version`, a category, a description,
declared inputs and outputs, and a `run` method that is a pure function of its inputs.
`Node.schema()` is the machine-readable description the editor and `nodegraph nodes --json` read.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from nodegraph.context import Context

# Types whose values can be written in a workflow file. Every other type name (MODEL, IMAGE,
# SCHEDULE, or one a node pack invents) is link-only: its values only come from other nodes.
LITERAL_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
ANY = "*"

Mode = Literal["literal", "link", "either"]
Choices = Sequence[str] | Callable[[Any], Sequence[str]]


class _Missing:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Missing()


@dataclass(frozen=True)
class Input:
    """One input socket or widget. `choices` may be a function of the settings (files in a folder)."""

    name: str
    type: str
    default: Any = REQUIRED
    optional: bool = False
    min: float | None = None
    max: float | None = None
    step: float | None = None
    multiline: bool = False
    choices: Choices | None = None
    mode: Mode | None = None  # None: "either" for literal types, "link" for the others
    description: str = ""

    @property
    def accepts(self) -> Mode:
        if self.mode is not None:
            return self.mode
        return "either" if self.type in LITERAL_TYPES or self.type == ANY else "link"

    @property
    def required(self) -> bool:
        return not self.optional and self.default is REQUIRED

    def resolve_choices(self, settings: Any) -> list[str]:
        if self.choices is None:
            return []
        choices = self.choices(settings) if callable(self.choices) else self.choices
        return list(choices)

    def schema(self, settings: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": self.name, "type": self.type, "accepts": self.accepts,
                                "required": self.required}
        if self.default is not REQUIRED:
            spec["default"] = self.default
        for key in ("min", "max", "step", "description"):
            if getattr(self, key) not in (None, ""):
                spec[key] = getattr(self, key)
        if self.type == "STRING":
            spec["multiline"] = self.multiline
        if self.type == "COMBO":
            spec["choices"] = self.resolve_choices(settings)
        return spec


@dataclass(frozen=True)
class Output:
    name: str
    type: str
    description: str = ""


@dataclass(frozen=True)
class Upstream:
    """What validation knows of the node feeding an input: its type, its literal inputs, and its own upstreams."""

    type: str
    literals: dict[str, Any]
    input: Callable[[str], Upstream | None]


class Node:
    """Base class of every node. Subclasses set the class attributes and implement `run`.

    `run(ctx, **inputs)` returns a dict keyed by output name. It must not keep state between
    calls: anything long-lived (a loaded pipeline) belongs to the model manager on `ctx`.
    """

    type: ClassVar[str]
    version: ClassVar[str]
    category: ClassVar[str] = "utility"
    description: ClassVar[str] = ""
    inputs: ClassVar[tuple[Input, ...]] = ()
    outputs: ClassVar[tuple[Output, ...]] = ()
    output_node: ClassVar[bool] = False
    # The input whose literal value every output is (the primitives: Int, String, …), so validation checks a
    # linked value as it checks one written in place (a model name from a String node, say).
    constant_input: ClassVar[str | None] = None
    # Inputs renamed since an earlier version: old name -> (new name, why), for a validation error that says
    # exactly what to change in a workflow that still uses the old name.
    renamed_inputs: ClassVar[dict[str, tuple[str, str]]] = {}

    def run(self, ctx: Context, **inputs: Any) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        """Node-specific validation of literal inputs: (input name, message) per problem."""
        return []

    @classmethod
    def check_upstream(cls, literals: dict[str, Any], upstream: Callable[[str], Upstream | None],
                       settings: Any) -> list[tuple[str | None, str, str]]:
        """Problems that show only with what feeds this node: (input name, code, message) per problem.

        `upstream(input_name)` is the node linked to that input (None for a literal or a bad link), so a
        LoRA loader can find the checkpoint its MODEL comes from. Nodes check again at run time.
        """
        return []

    @classmethod
    def check_resources(cls, literals: dict[str, Any], models: Any) -> list[tuple[str | None, str]]:
        """Literal inputs too large for the model manager's device: (input name, message) per problem.

        Reported with code `too_large`, with the literals that passed their own checks. Nodes check
        again at run time, where linked values and the real model are known.
        """
        return []

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        """The files this node reads for these inputs; their fingerprints join the cache key."""
        return []

    @classmethod
    def prepare_sweep(cls, input_name: str, values: list[Any], literals: dict[str, Any],
                      settings: Any) -> dict[str, Any]:
        """Literal overrides for this node in every job of a sweep over its input `input_name`.

        Called once per swept input before a sweep runs, after every job's workflow validated,
        with the swept `values` and the node's other literal inputs (defaults filled in). The
        returned literals are set on this node in every job (the swept value itself always wins)
        and validated like any other. E.g. HotswapLoRA sets its hot-swap target rank to the
        largest rank among the swept LoRA files, so no job has to re-prepare the pipeline.
        """
        return {}

    @classmethod
    def schema(cls, settings: Any = None) -> dict[str, Any]:
        return {
            "type": cls.type, "version": cls.version, "category": cls.category,
            "description": cls.description, "output_node": cls.output_node,
            "inputs": [i.schema(settings) for i in cls.inputs],
            "outputs": [{"name": o.name, "type": o.type} for o in cls.outputs],
        }


def link_compatible(source: str, target: str) -> bool:
    """Can an output of type `source` feed an input of type `target`?"""
    if source == target or ANY in (source, target):
        return True
    # Widening that users expect: an INT feeds a FLOAT, a STRING a COMBO (checked at run time).
    return (source, target) in {("INT", "FLOAT"), ("STRING", "COMBO"), ("COMBO", "STRING")}


def check_literal(spec: Input, value: Any, choices: Sequence[str] = ()) -> tuple[str, str] | None:
    """Check a literal against its input spec (and a COMBO's resolved choices).

    Returns (error code, message) when the value is wrong, None when it is right.
    """
    kind = spec.type
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return "wrong_type", f"expected an integer, got {describe(value)}"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "wrong_type", f"expected a number, got {describe(value)}"
        if not math.isfinite(value):
            return "out_of_range", f"expected a finite number, got {value}"
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            return "wrong_type", f"expected true or false, got {describe(value)}"
    elif kind in ("STRING", "COMBO"):
        if not isinstance(value, str):
            return "wrong_type", f"expected a string, got {describe(value)}"
        if kind == "COMBO":
            if value not in choices:
                return "not_a_choice", not_a_choice(value, choices)
    elif kind == ANY:
        if not (value is None or isinstance(value, (str, int, float, bool))):
            return "wrong_type", f"expected a plain value, got {describe(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return "out_of_range", f"expected a finite number, got {value}"
    if kind in ("INT", "FLOAT"):
        if spec.min is not None and value < spec.min:
            return "out_of_range", f"{value} is below the minimum {spec.min:g}"
        if spec.max is not None and value > spec.max:
            return "out_of_range", f"{value} is above the maximum {spec.max:g}"
    return None


SHOWN_CHOICES = 10


def not_a_choice(value: Any, choices: Sequence[str], fits: Callable[[str], bool] | None = None,
                 family: str = "") -> str:
    """The message for a value that is not among `choices`: the closest choice, and the choices.

    With `fits` (which choices suit the connected model, of `family`), those that fit come first and the
    suggestion is taken from them where one is close.
    """
    if fits is None:
        return f"{describe(value)} is not one of: {_listed(choices, SHOWN_CHOICES) or '(none available)'}" \
            + suggest(value, choices)
    fitting, others = [c for c in choices if fits(c)], [c for c in choices if not fits(c)]
    close = suggest(value, fitting) or suggest(value, others)
    parts = [f"this {family} model: {_listed(fitting, SHOWN_CHOICES) or '(none available)'}"]
    if others:
        parts.append(f"for other models: {_listed(others, max(SHOWN_CHOICES - len(fitting), 3))}")
    return f"{describe(value)} is not one of the choices{close + ' For' if close else '; for'} {'; '.join(parts)}"


def _listed(names: Sequence[str], limit: int) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def suggest(name: str, known: Sequence[str] | dict[str, Any]) -> str:
    """'; did you mean …?' with the closest of `known` (difflib), or '' when none is close."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name[:100], list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def describe(value: Any, limit: int = 60) -> str:
    """A short, safe description of a value for error messages (values may be 10 MB strings)."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "…")
    if isinstance(value, bool) or value is None:
        return "true" if value is True else "false" if value is False else "null"
    if isinstance(value, (int, float)):
        text = str(value)
        return f"number {text if len(text) <= limit else text[:limit] + '…'}"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    return type(value).__name__
