"""ComfyUI's own frontend (comfyui-frontend-package) boots against `nodegraph serve --front-end comfyui`.

    pytest tests/browser/test_comfy_front.py -q      # needs pip install -e ".[comfyui]" (in the test extra)

It must load without a page error and without a request answered 404 (a route it needs that we lack), read
/object_info, and open its websocket. The files it reads that a user has not written yet (`OPTIONAL`) are 404,
as ComfyUI answers.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import ARTIFACTS, Server, serve

pytestmark = pytest.mark.skipif(importlib.util.find_spec("comfyui_frontend_package") is None,
                                reason='ComfyUI\'s frontend is not installed: pip install -e ".[comfyui]"')
# Files a user has not written yet (their stylesheet, their saved templates): 404, as ComfyUI answers.
OPTIONAL = ("/user.css", "/api/userdata/user.css", "/api/userdata/comfy.templates.json")


@pytest.fixture(scope="module")
def comfy_server(demo_dir: Path, demo_input: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(demo_dir, demo_input, tmp_path_factory.mktemp("comfy-front"), "--front-end", "comfyui") as started:
        yield started


def test_comfyuis_frontend_boots_and_reads_object_info(browser: Any, comfy_server: Server) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 820})
    page = context.new_page()
    problems: list[str] = []
    requested: list[str] = []
    sockets: list[str] = []
    origin = comfy_server.url.rstrip("/")

    def response(answer: Any) -> None:
        path = answer.url[len(origin):].split("?")[0]
        if answer.status >= 400 and not (answer.status == 404 and path in OPTIONAL):
            problems.append(f"HTTP {answer.status}: {answer.url}")

    def console(message: Any) -> None:
        if message.type == "error" and "404" in message.text and \
                not message.location.get("url", "").split("?")[0].endswith(OPTIONAL):
            problems.append(f"console error: {message.text} ({message.location.get('url')})")

    page.on("response", response)
    page.on("console", console)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("request", lambda request: requested.append(request.url[len(origin):].split("?")[0]))
    page.on("websocket", lambda ws: ws.on("framereceived", lambda frame: sockets.append(str(frame))))
    page.goto(comfy_server.url + "/")
    page.wait_for_function("() => window.app && window.app.graph && document.querySelector('canvas')",
                           timeout=60_000)
    page.wait_for_timeout(3000)  # the requests it makes once booted (queue, history, settings)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "comfy_front.png"))
    context.close()
    assert not problems, "\n".join(problems)
    assert "/api/object_info" in requested, requested
    assert any('"type": "status"' in frame and '"sid"' in frame for frame in sockets), sockets[:3]
