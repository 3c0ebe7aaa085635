"""Security defaults: cross-site refusals, the token (header and cookie), host names, body limits, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from aiohttp import WSServerHandshakeError

from nodegraph.server.errors import ApiError
from nodegraph.server.redact import redact_target
from nodegraph.server.security import confined, content_security_policy, host_name, is_loopback, same_origin
from tests.server.conftest import Client, MakeClient, connect, raw, show, state

MUTATING = [("post", "/api/jobs"), ("post", "/api/validate"), ("post", "/api/import"), ("post", "/api/free"),
            ("put", "/api/workflows/x.json"), ("delete", "/api/workflows/x.json"), ("delete", "/api/jobs/x"),
            ("delete", "/api/history/x")]
CROSS_SITE = [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://127.0.0.1:1"},
              {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Origin": "garbage"}]


async def test_mutating_routes_refuse_cross_site_requests(client: Client) -> None:
    for method, path in MUTATING:
        for headers in CROSS_SITE:
            response = await client.request(method, path, json={"workflow": show(1)}, headers=headers)
            assert response.status == 403, (method, path, headers)
            assert (await response.json())["errors"][0]["code"] == "cross_site"
    assert (await (await client.get("/api/jobs")).json())["pending"] == []


async def test_same_origin_and_scripts_without_origin_are_allowed(client: Client) -> None:
    origin = f"http://127.0.0.1:{client.port}"
    for headers in ({}, {"Origin": origin}, {"Origin": origin, "Sec-Fetch-Site": "same-origin"},
                    {"Sec-Fetch-Site": "none"}):
        response = await client.post("/api/validate", json={"workflow": show(1)}, headers=headers)
        assert response.status == 200, headers
    assert (await client.get("/api/nodes", headers={"Origin": "http://evil.example"})).status == 200  # reads: CORS


@pytest.mark.parametrize("headers", CROSS_SITE[:4])
async def test_the_websocket_refuses_cross_site_connections(client: Client, headers: dict[str, str]) -> None:
    with pytest.raises(WSServerHandshakeError) as caught:
        await client.ws_connect("/api/ws?client_id=x", headers=headers)
    assert caught.value.status == 403
    await connect(client, headers={"Origin": f"http://127.0.0.1:{client.port}"})


async def test_with_a_token_every_route_needs_it(make_client: MakeClient) -> None:
    client = await make_client(token="s3cret")
    for method, path in [("get", "/"), ("get", "/web/index.html"), ("get", "/api/nodes"), ("get", "/api/ws"),
                         ("get", "/api/outputs/a.png"), ("get", "/api/openapi.json"), *MUTATING]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = await client.request(method, path, headers=headers)
            assert response.status == 401, (method, path, headers)
            assert (await response.json())["errors"][0]["code"] == "unauthorized"
    response = await client.get("/api/nodes", headers={"Authorization": "Bearer s3cret"})
    assert response.status == 200
    await connect(client, headers={"Authorization": "Bearer s3cret"})


async def test_the_token_in_the_address_sets_a_strict_cookie_for_the_browser(make_client: MakeClient) -> None:
    client = await make_client(token="s3cret")
    assert (await client.get("/?token=wrong", allow_redirects=False)).status == 401
    response = await client.get("/?token=s3cret", allow_redirects=False)
    assert response.status == 302 and response.headers["Location"] == "/"
    cookie = response.cookies["nodegraph_token"]
    assert cookie.value == "s3cret" and cookie["httponly"] and cookie["samesite"] == "Strict"
    assert (await client.get("/api/nodes")).status == 200  # the client's cookie jar now holds it
    await connect(client)


async def test_the_token_never_reaches_a_log_line(make_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)  # aiohttp's access log (aiohttp.access) as well as ours
    client = await make_client(token="s3cret")
    for path in ("/api/nodes?token=s3cret", "/api/jobs/x?a=1&token=s3cret", "/api/nodes?%74oken=s3cret",
                 "/?token=s3cret", "/?token=s3cretX"):
        await client.get(path, allow_redirects=False)
    await client.get("/api/jobs/nope", headers={"Authorization": "Bearer s3cret"})
    await client.get("/api/jobs/nope", headers={"Cookie": "nodegraph_token=s3cret"})
    await client.post("/api/jobs?token=s3cret", json={"workflow": show(1)}, headers={"Authorization": "Bearer s3cret"})
    lines = [record.getMessage() for record in caplog.records]
    assert any("/api/nodes?token=[redacted] -> 401" in line for line in lines), lines
    assert not [line for line in lines if "s3cret" in line]
    assert any(r.name == "aiohttp.access" and "[redacted]" in r.getMessage() for r in caplog.records)
    # aiohttp's access log, with a format that prints the credentials' headers and the cookie set
    from nodegraph.server.redact import AccessLog

    class Request:
        method, path_qs, version, remote = "GET", "/?token=s3cret", type("V", (), {"major": 1, "minor": 1}), "::1"
        headers = {"Authorization": "Bearer s3cret", "Cookie": "nodegraph_token=s3cret", "User-Agent": "t"}

    class Response:
        status, body_length, headers = 302, 0, {"Set-Cookie": "nodegraph_token=s3cret"}

    access = logging.getLogger("test.access")
    AccessLog(access, '"%r" %{Authorization}i %{Cookie}i %{Set-Cookie}o %{User-Agent}i').log(
        Request(), Response(), 0.1)  # type: ignore[arg-type]
    line = [r.getMessage() for r in caplog.records if r.name == "test.access"][0]
    assert line == '"GET /?token=[redacted] HTTP/1.1" [redacted] [redacted] [redacted] t'


def test_only_the_token_parameter_is_redacted() -> None:
    assert redact_target("/a?x=1&token=T&y=2") == "/a?x=1&token=[redacted]&y=2"
    assert redact_target("/a?TOKEN=T&tokens=2&token") == "/a?TOKEN=[redacted]&tokens=2&token"
    assert redact_target("/a/token=T") == "/a/token=T"


async def test_without_a_token_only_loopback_host_names_are_answered(client: Client) -> None:
    # A DNS-rebinding page reaches 127.0.0.1 under its own name; the Host header gives it away.
    for host in ("evil.example", "evil.example:80", "10.0.0.1"):
        response = await client.get("/api/nodes", headers={"Host": host})
        assert response.status == 403 and (await response.json())["errors"][0]["code"] == "bad_host"
    for host in ("localhost:8188", "127.0.0.1", "[::1]:8188"):
        assert (await client.get("/api/openapi.json", headers={"Host": host})).status == 200


async def test_bodies_over_the_limit_are_refused(make_client: MakeClient) -> None:
    client = await make_client(max_body=1024)
    response = await client.post("/api/import", data=b"x" * 2048)
    assert response.status == 413 and (await response.json())["errors"][0]["code"] == "body_too_large"


async def test_every_refusal_is_a_json_error(client: Client) -> None:
    for method, path, status in [("get", "/api/nope", 404), ("patch", "/api/jobs", 405), ("get", "/api/jobs/x", 404)]:
        response = await client.request(method, path)
        assert response.status == status and response.content_type == "application/json"
        assert set((await response.json())["errors"][0]) >= {"code", "message"}


async def test_the_editor_html_gets_a_strict_content_security_policy(make_client: MakeClient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    web = tmp_path / "web"
    (web / "lib").mkdir(parents=True)
    (web / "index.html").write_text("<!doctype html><title>x</title>")
    (web / "lib" / "app.js").write_text("1")
    (web / "secret.py").write_text("x")
    client = await make_client(web_dir=web)
    response = await client.get("/")
    assert response.status == 200 and response.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src 'self';" in policy and "unsafe" not in policy
    response = await client.get("/web/lib/app.js")
    assert response.status == 200 and response.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert (await client.get("/web/secret.py")).status == 403
    assert (await client.get("/web/..%2F..%2Fetc%2Fpasswd")).status == 400
    empty = await make_client(web_dir=tmp_path / "none", data_dir=tmp_path / "other-data")
    assert (await empty.get("/")).status == 404


def test_names_are_confined_to_their_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "in").mkdir()
    assert confined(tmp_path / "in", "a/b.png") == (tmp_path / "in" / "a" / "b.png").resolve()
    for name in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "a\\b", "a\0b", "./a"):
        with pytest.raises(Exception, match="safe relative"):
            confined(tmp_path / "in", name)
    for name in ("a" * 256, "é" * 128, "a/" * 600 + "x", "x\udc80.png"):  # too long in bytes; not Unicode
        with pytest.raises(ApiError) as refused:
            confined(tmp_path / "in", name)
        assert refused.value.status == 400 and refused.value.code == "bad_name"
    assert confined(tmp_path / "in", "a" * 255).name == "a" * 255


async def test_two_origin_headers_are_refused_whichever_comes_first(client: Client, tmp_path: Path) -> None:
    # Ours first and a foreign one second was accepted: one check read the first, a browser may mean the other.
    before = await state(client, tmp_path)
    ours = f"http://127.0.0.1:{client.port}"
    body = json.dumps({"workflow": show(1)}).encode()
    for first, second in ((ours, "http://evil.example"), ("http://evil.example", ours), (ours, ours)):
        request = (f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1:{client.port}\r\nOrigin: {first}\r\n"
                   f"Origin: {second}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                   "Connection: close\r\n\r\n").encode() + body
        status, content_type, answer = await raw(client.host, client.port, request)
        assert status == 400 and content_type.startswith("application/json")
        assert json.loads(answer)["errors"][0]["code"] == "duplicate_header"
    assert await state(client, tmp_path) == before


@pytest.mark.parametrize("token", [None, "s3cret"])
async def test_host_headers_are_parsed_strictly(make_client: MakeClient, token: str | None) -> None:
    client = await make_client(token=token)
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    for host in (f"evil.example:{client.port}@127.0.0.1", "evil.example%00.localhost", "127.0.0.1:80:80",
                 "localhost/x", "[::1", "a b.localhost", "localhost:99999999"):
        response = await client.get("/api/system", headers={"Host": host, **auth})
        assert response.status == 400, host
        assert (await response.json())["errors"][0]["code"] == "bad_host"


def test_host_names() -> None:
    assert host_name("localhost:8188") == "localhost" and host_name("[::1]:80") == "[::1]"
    assert host_name("127.0.0.1") == "127.0.0.1"
    assert host_name("evil.example:1@127.0.0.1") is None and host_name("x%00.localhost") is None


def test_origin_and_host_rules() -> None:
    assert same_origin("http://localhost:8188", "localhost:8188", "http")
    assert same_origin("http://LOCALHOST", "localhost:80", "http")
    assert not same_origin("https://localhost:8188", "localhost:8188", "http")
    assert not same_origin("null", "localhost:8188", "http")
    assert not same_origin("http://localhost:8188/path", "localhost:8188", "http")
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]", "app.localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.2", "example.com", "::", "localhost.evil.com"]))


def test_the_policy_names_the_websocket_only_for_plain_host_names() -> None:
    assert "connect-src 'self' ws://127.0.0.1:8188 wss://127.0.0.1:8188;" in content_security_policy("127.0.0.1:8188")
    assert "ws://[::1]:80 " in content_security_policy("[::1]:80")
    assert "connect-src 'self';" in content_security_policy("x; script-src *")
