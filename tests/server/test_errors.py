"""One error path: refusals, aiohttp's own errors and bugs all answer JSON, and each is logged as one line."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

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
