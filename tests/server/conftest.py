"""Fixtures for the server: an app on temporary data, output and workflow folders, with the test pack.

`client` is aiohttp's test client on that app (worker thread started, stopped after the test);
`Events` reads a websocket until a message matches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientWebSocketResponse, web
from aiohttp.test_utils import TestClient

from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.server.app import create_app
from nodegraph.server.state import ServerConfig
from nodegraph.settings import Settings

WAIT = 60.0  # generous: only reached when something is broken
Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(data_dir=tmp_path / "data", workflows_dir=tmp_path / "workflows")


@pytest.fixture
def make_client(aiohttp_client: Any, registry: Registry, settings: Settings, config: ServerConfig) -> MakeClient:
    """A test client on a fresh app; keyword arguments replace fields of the config or settings."""

    async def make(settings: Settings = settings, **changes: Any) -> Client:
        app = create_app(Executor(registry, settings), ServerConfig(**{**config.__dict__, **changes}))
        client: Client = await aiohttp_client(app)
        return client

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


def wf(nodes: dict[str, Any]) -> dict[str, Any]:
    return {"format": "nodegraph/1", "nodes": nodes, "ui": {}}


def slow(steps: int = 10_000, delay: float = 0.01) -> dict[str, Any]:
    """A job that runs until it is interrupted (or for a long while)."""
    return wf({"1": {"type": "Slow", "inputs": {"steps": steps, "delay": delay}},
               "2": {"type": "Show", "inputs": {"value": ["1", "value"]}}})


def show(value: Any) -> dict[str, Any]:
    return wf({"1": {"type": "Show", "inputs": {"value": value}}})


async def queue(client: Client, workflow: dict[str, Any], client_id: str | None = None) -> str:
    body: dict[str, Any] = {"workflow": workflow}
    if client_id is not None:
        body["client_id"] = client_id
    response = await client.post("/api/jobs", json=body)
    assert response.status == 201, await response.text()
    job_id: str = (await response.json())["job_id"]
    return job_id


async def finished(client: Client, job_id: str) -> dict[str, Any]:
    """The job once it has finished (polls the API; bounded by WAIT)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        job: dict[str, Any] = await (await client.get(f"/api/jobs/{job_id}")).json()
        if job["status"] not in ("pending", "running"):
            return job
        assert loop.time() < deadline, f"job {job_id} is still {job['status']}"
        await asyncio.sleep(0.01)


class Events:
    """A websocket's messages, read until one matches; every message read is kept in `seen`."""

    def __init__(self, ws: ClientWebSocketResponse) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []

    async def until(self, **match: Any) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            while True:
                message: dict[str, Any] = await self.ws.receive_json()
                self.seen.append(message)
                if all(message.get(k) == v for k, v in match.items()):
                    return message

        return await asyncio.wait_for(read(), WAIT)

    def of(self, kind: str, job_id: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self.seen if m["type"] == kind and (job_id is None or m.get("job_id") == job_id)]


async def connect(client: Client, query: str = "client_id=me", **kwargs: Any) -> Events:
    events = Events(await client.ws_connect(f"/api/ws?{query}", **kwargs))
    await events.until(type="hello")
    events.seen.clear()
    return events


async def state(client: Client, tmp_path: Path) -> tuple[list[str], Any, Any]:
    """What a refused request must leave as it was: the files (outside the store's folder), queue, history."""
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                   if p.relative_to(tmp_path).parts[0] != "data")
    return files, await (await client.get("/api/jobs")).json(), await (await client.get("/api/history")).json()


async def raw(host: str, port: int, request: bytes) -> tuple[int, str, bytes]:
    """Send bytes as they are (what no client library sends); the answer's status, Content-Type and body.

    `request` should say `Connection: close`; the answer is read until the server closes.
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
    return int(status_line.split()[1]), headers.get("content-type", ""), body
