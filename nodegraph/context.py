"""What a running node can reach: progress, cancellation, settings, the model manager, files."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodegraph.events import EventSink, NodeInfo, Progress, ignore
from nodegraph.settings import Settings


class Interrupted(Exception):
    """Raised inside a node when the job was cancelled; the executor ends the run cleanly."""


class NodeFailure(Exception):
    """An expected failure a node reports to the user (bad file, division by zero).

    The message is shown as is, with the node id; `input` names the input at fault, if any.
    """

    def __init__(self, message: str, input: str | None = None, code: str = "node_error") -> None:
        super().__init__(message)
        self.input = input
        self.code = code


class CancelToken:
    """Cooperative cancellation: set from any thread, checked by the executor and by nodes."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class Context:
    job_id: str
    node_id: str
    settings: Settings
    models: Any = None  # the model manager, for nodes that need live models
    emit: EventSink = ignore
    cancel_token: CancelToken = field(default_factory=CancelToken)
    files: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    workflow: dict[str, Any] = field(default_factory=dict)  # the workflow being run, to embed in outputs
    # Releases unused models and cached outputs: a node's last resort before giving up on out-of-memory.
    free_memory: Callable[[], None] = lambda: None

    def check_cancelled(self) -> None:
        if self.cancel_token.cancelled:
            raise Interrupted(f"node {self.node_id} was interrupted")

    def progress(self, step: int, total: int, preview: str | None = None) -> None:
        """Report step `step` of `total`; also the place where long nodes get cancelled."""
        self.emit(Progress(self.job_id, self.node_id, step, total, preview))
        self.check_cancelled()

    def info(self, kind: str, message: str, seconds: float | None = None) -> None:
        self.emit(NodeInfo(self.job_id, self.node_id, kind, message, seconds))

    def add_file(self, path: Path) -> None:
        """Record a file this node wrote; it is listed in the run's result."""
        self.files.append(str(path))

    def needs_file(self, path: Path) -> None:
        """Record a file this node's outputs refer to (not listed): once it is gone (a cleanup removed it), a
        cached output is not reused, and the node runs again."""
        self.needs.append(str(path))

    @property
    def output_dir(self) -> Path:
        return self.settings.output_dir
