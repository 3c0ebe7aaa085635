"""A node pack for the tests: a file reader, a slow node, a failing node, a MODEL-typed pair."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output


class ReadText(Node):
    type = "ReadText"
    version = "1.0.0"
    category = "test"
    inputs = (Input("path", "STRING"),)
    outputs = (Output("text", "STRING"),)

    @classmethod
    def files(cls, inputs: dict[str, Any], settings: Any) -> list[Path]:
        return [Path(inputs["path"])]

    def run(self, ctx: Context, path: str) -> dict[str, Any]:
        return {"text": Path(path).read_text()}


class Slow(Node):
    """Counts to `steps`, reporting progress; cancellable between steps. Touches `marker` (a path) first."""

    type = "Slow"
    version = "1.0.0"
    category = "test"
    inputs = (Input("steps", "INT", default=5, min=1, max=10_000), Input("delay", "FLOAT", default=0.0),
              Input("marker", "STRING", default=""))
    outputs = (Output("value", "INT"),)

    def run(self, ctx: Context, steps: int, delay: float, marker: str) -> dict[str, Any]:
        if marker:
            Path(marker).touch()
        for i in range(steps):
            time.sleep(delay)
            ctx.progress(i + 1, steps)
        return {"value": steps}


class Fail(Node):
    type = "Fail"
    version = "1.0.0"
    category = "test"
    inputs = (Input("value", "FLOAT", default=0.0), Input("expected", "BOOLEAN", default=True))
    outputs = (Output("value", "FLOAT"),)

    def run(self, ctx: Context, value: float, expected: bool) -> dict[str, Any]:
        if expected:
            raise NodeFailure("this node always fails", "value", "test_failure")
        raise RuntimeError("unexpected")


class MakeThing(Node):
    type = "MakeThing"
    version = "1.0.0"
    category = "test"
    inputs = (Input("name", "STRING", default="thing"),)
    outputs = (Output("thing", "THING"),)

    def run(self, ctx: Context, name: str) -> dict[str, Any]:
        return {"thing": Thing(name)}


class UseThing(Node):
    type = "UseThing"
    version = "1.0.0"
    category = "test"
    inputs = (Input("thing", "THING"), Input("choice", "COMBO", default="a", choices=("a", "b")))
    outputs = (Output("name", "STRING"),)
    output_node = True

    def run(self, ctx: Context, thing: Thing, choice: str) -> dict[str, Any]:
        return {"name": f"{thing.name}-{choice}"}


class Thing:
    def __init__(self, name: str) -> None:
        self.name = name


NODES = [ReadText, Slow, Fail, MakeThing, UseThing]
