"""Typed events: everything the executor does is observable as one of these.

The CLI turns them into progress bars and a summary table, the server into websocket messages,
the store into history. `to_json()` gives the wire form: the fields plus a `type` tag.
Events are plain (not frozen) dataclasses: one is built per node per run, and frozen ones cost
three times as much to build. Sinks must not change them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


@dataclass
class Event:
    type: ClassVar[str] = "event"
    job_id: str

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


@dataclass
class JobStarted(Event):
    type: ClassVar[str] = "job_started"
    nodes: list[str] = field(default_factory=list)  # the planned nodes, in execution order


@dataclass
class NodeStarted(Event):
    type: ClassVar[str] = "node_started"
    node_id: str = ""
    node_type: str = ""


@dataclass
class NodeCached(Event):
    type: ClassVar[str] = "node_cached"
    node_id: str = ""
    node_type: str = ""


@dataclass
class Progress(Event):
    type: ClassVar[str] = "progress"
    node_id: str = ""
    step: int = 0
    total: int = 0
    preview: str | None = None  # a file name in the temp folder, when the node made one


@dataclass
class NodeInfo(Event):
    """Something a node wants the user to know (a compile, a model load) with its duration."""

    type: ClassVar[str] = "node_info"
    node_id: str = ""
    kind: str = ""
    message: str = ""
    seconds: float | None = None


@dataclass
class NodeFinished(Event):
    type: ClassVar[str] = "node_finished"
    node_id: str = ""
    node_type: str = ""
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)  # the files the node wrote (ctx.add_file), as recorded


@dataclass
class NodeError(Event):
    type: ClassVar[str] = "node_error"
    node_id: str = ""
    node_type: str = ""
    input: str | None = None
    code: str = ""
    message: str = ""


@dataclass
class Interrupted(Event):
    type: ClassVar[str] = "interrupted"
    node_id: str | None = None


@dataclass
class JobFinished(Event):
    type: ClassVar[str] = "job_finished"
    status: str = "ok"  # ok | error | interrupted | invalid
    seconds: float = 0.0


EventSink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The default sink."""
