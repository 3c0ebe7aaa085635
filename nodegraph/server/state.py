"""What the handlers share: the server's configuration and the typed application keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from nodegraph.executor import Executor
from nodegraph.server.hub import Hub
from nodegraph.store import Store

MAX_BODY = 32 * 1024 * 1024  # workflows and PNGs to import; larger bodies get 413
WEB_DIR = Path(__file__).resolve().parents[2] / "web"  # the editor, beside the package (editable install)


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    workflows_dir: Path
    token: str | None = None
    web_dir: Path = WEB_DIR
    max_body: int = MAX_BODY
    front_end: str = "nodegraph"  # or "comfyui": ComfyUI's frontend, and its shapes where our paths collide
    front_end_dir: Path | None = None  # ComfyUI's frontend files (comfy.front.static_dir), for "comfyui"


class Runner(Protocol):
    """What runs the queued jobs: the one-process `worker.Worker`, or a Ray pool (`nodegraph.scale.pool`)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def wake(self) -> None: ...
    def cancel(self, job_id: str) -> str | None: ...
    def free(self) -> bool: ...
    def workers(self) -> list[dict[str, Any]] | None: ...


CONFIG = web.AppKey("config", ServerConfig)
EXECUTOR = web.AppKey("executor", Executor)
STORE = web.AppKey("store", Store)
WORKER = web.AppKey("worker", Runner)
HUB = web.AppKey("hub", Hub)
