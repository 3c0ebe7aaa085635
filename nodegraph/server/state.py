"""What the handlers share: the server's configuration and the typed application keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from nodegraph.executor import Executor
from nodegraph.server.hub import Hub
from nodegraph.server.worker import Worker
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


CONFIG = web.AppKey("config", ServerConfig)
EXECUTOR = web.AppKey("executor", Executor)
STORE = web.AppKey("store", Store)
WORKER = web.AppKey("worker", Worker)
HUB = web.AppKey("hub", Hub)
