"""One error path: refusals, aiohttp's own errors and bugs all answer JSON, and each is logged as one line."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.server.app import bind, create_app, listen
from nodegraph.server.state import ServerConfig
from nodegraph.settings import Settings
from tests.server.conftest import Client, show, state


async def test_a_body_that_cannot_be_decompressed_is_a_json_400(client: Client, tmp_path: Path) -> None:
    before = await state(client, tmp_path)
    for garbage in (b"not gzip at all", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03 not deflate"):
        response = await client.post("/api/jobs", data=garbage, headers={"Content-Encoding": "gzip",
                                                                         "Content-Type": "application/json"})
        assert response.status == 400 and response.content_type == "application/json"
        error = (await response.json())["errors"][0]
        assert error["code"] == "unreadable_body" and "gzip" in error["message"], error
    assert await state(client, tmp_path) == before
    body = gzip.compress(json.dumps({"workflow": show(1)}).encode())  # a real gzip body is read as usual
    response = await client.post("/api/validate", data=body, headers={"Content-Encoding": "gzip"})
    assert response.status == 200 and (await response.json())["ok"]


async def test_each_error_answer_is_logged_as_one_line(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nodegraph.server")
    await client.get("/api/jobs/nope")
    await client.post("/api/jobs", data=b"{")
    await client.get("/api/jobs/a%0d%0aFAKE%20LINE")  # a forged log line stays on its own line
    lines = [r.getMessage() for r in caplog.records if r.name == "nodegraph.server"]
    assert lines[0] == "GET /api/jobs/nope -> 404 no_such_job: no job 'nope'"
    assert lines[1].startswith("POST /api/jobs -> 400 invalid_json: the request body: malformed JSON")
    assert lines[2] == "GET /api/jobs/a%0D%0AFAKE%20LINE -> 404 no_such_job: no job 'a\\r\\nFAKE LINE'"
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert (await client.get("/api/system")).status == 200
    assert len([r for r in caplog.records if r.name == "nodegraph.server"]) == 3  # answers that are not errors: no line


@pytest.fixture
async def served(registry: Registry, settings: Settings, config: ServerConfig) -> AsyncIterator[tuple[str, int]]:
    """The app served as `nodegraph serve` serves it (aiohttp's runner, our protocol): (host, port)."""
    runner = web.AppRunner(create_app(Executor(registry, settings), config), access_log=None)
    await runner.setup()
    sock = bind("127.0.0.1", 0)
    server = await listen(runner, sock)
    try:
        yield sock.getsockname()[:2]
    finally:
        server.close()
        await runner.cleanup()


@pytest.mark.parametrize("path", ["/api/jobs", "/api/validate", "/api/import"])
async def test_a_client_that_hangs_up_mid_body_is_one_line_not_a_500(served: tuple[str, int], path: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    host, port = served
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 "Content-Length: 100000\r\n\r\n{\"workflow\": ".encode())
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is reading the body
    writer.transport.abort()  # a reset, as a client that dies mid-upload
    deadline = asyncio.get_running_loop().time() + 10
    while not [r for r in caplog.records if r.name == "nodegraph.server"]:
        assert asyncio.get_running_loop().time() < deadline, [r.getMessage() for r in caplog.records]
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # anything logged after the first line would show now
    ours = [r for r in caplog.records if r.name.startswith(("nodegraph", "aiohttp"))]
    assert [r.getMessage() for r in ours] == [f"POST {path}: the client disconnected mid-request"]
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in ours)
