"""Browser tests of the editor: a real `nodegraph serve` on temporary folders, driven by Chromium.

    pytest tests/browser -q          # needs /usr/bin/chromium (apt-get install chromium) and
                                     # `npm ci --prefix web` (litegraph.js)

The server runs once per session (for every module) with the demo models; each test gets a fresh browser context
(empty localStorage: a first visit, which opens workflows/lora.json; `page` then clicks New for an empty
canvas) whose console errors, failed requests and requests to any other host fail the test. A screenshot of
every test's last state goes to tests/browser/artifacts/.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = Path(os.environ.get("NODEGRAPH_CHROMIUM", "/usr/bin/chromium"))
# The machines that run these tests have no network: keep Chromium from trying to reach one.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
START_TIMEOUT = 60
EXPECTED_REFUSALS = ("/api/jobs", "/api/import")  # a 400 here carries errors the editor shows


@dataclass
class Server:
    url: str
    output_dir: Path
    workflows_dir: Path
    models_dir: Path
    input_dir: Path

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: Any) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


@pytest.fixture(scope="session")
def server(demo_dir: Path, demo_input: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not (ROOT / "web/node_modules/litegraph.js/build/litegraph.core.js").is_file():
        pytest.fail("litegraph.js is not installed: run `npm ci --prefix web` first", pytrace=False)
    with serve(demo_dir, demo_input, tmp_path_factory.mktemp("serve")) as started:
        yield started


@contextmanager
def serve(demo_dir: Path, demo_input: Path, root: Path, *options: str) -> Iterator[Server]:
    """`nodegraph serve` on folders under `root` (workflows: a copy of ours) with `options`, until the end."""
    workflows = root / "workflows"
    shutil.copytree(ROOT / "workflows", workflows)
    command = [str(Path(sys.executable).with_name("nodegraph")), "serve", "--port", "0",
               "--models-dir", str(demo_dir), "--input-dir", str(demo_input), "--output-dir", str(root / "outputs"),
               "--data-dir", str(root / "data"), "--workflows-dir", str(workflows), *options]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def read() -> None:  # keeps the pipe drained while the server runs
        assert process.stdout is not None
        for line in process.stdout:
            log.append(line)
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"nodegraph serve did not start in {START_TIMEOUT} s:\n{''.join(log)}", pytrace=False)
            if line.startswith("nodegraph: serving on "):
                break
            if process.poll() is not None:
                pytest.fail(f"nodegraph serve exited:\n{''.join(log)}", pytrace=False)
        yield Server(line.split(" on ", 1)[1].strip(), root / "outputs", workflows, demo_dir, demo_input)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# Module scope, not session: Playwright's sync API keeps an event loop running in this thread while
# it is open, and the async server tests that run after this folder need the thread's loop free.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: install it with `apt-get install chromium` "
                    "(or point NODEGRAPH_CHROMIUM at a Chromium binary)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Watch:
    """What a page did that a working editor never does."""

    origin: str
    problems: list[str] = field(default_factory=list)

    def console(self, message: Any) -> None:
        # Chromium logs every 4xx answer; a refused job or import is expected and shown in the page.
        refused = message.text.startswith("Failed to load resource") and \
            message.location.get("url", "").endswith(EXPECTED_REFUSALS)
        if message.type == "error" and not refused:
            self.problems.append(f"console error: {message.text}")

    def request(self, request: Any) -> None:
        parts = urlsplit(request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and f"{parts.scheme.replace('ws', 'http')}://{parts.netloc}" \
                != self.origin:
            self.problems.append(f"request to another host: {request.url}")

    def failed(self, request: Any) -> None:
        self.problems.append(f"request failed: {request.url} ({request.failure})")

    def response(self, response: Any) -> None:
        if response.status >= 400 and not (response.status == 400 and response.url.endswith(EXPECTED_REFUSALS)):
            self.problems.append(f"HTTP {response.status}: {response.url}")


@contextmanager
def open_editor(browser: Any, server: Server, shot: str, blank: bool = True) -> Iterator[Any]:
    """The editor, loaded and connected, on a fresh browser context (a first visit).

    A first visit opens workflows/lora.json; `blank` starts from an empty canvas instead (New).
    """
    context = browser.new_context(viewport={"width": 1400, "height": 820})
    page = context.new_page()
    page.set_default_timeout(15_000)
    watch = Watch(server.url.rstrip("/"))
    page.on("console", watch.console)
    page.on("pageerror", lambda error: watch.problems.append(f"page error: {error}"))
    page.on("request", watch.request)
    page.on("requestfailed", watch.failed)
    page.on("response", watch.response)
    page.on("dialog", lambda dialog: dialog.accept())
    page.watch = watch
    page.messages = []  # every websocket message the page received, parsed
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: page.messages.append(json.loads(payload))))
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector("#status-conn[data-state=connected]")
    if blank:
        page.click("#btn-new")
        page.wait_for_function("() => !window.nodegraph.graph._nodes.length && !window.nodegraph.files.name")
    yield page
    page.screenshot(path=str(ARTIFACTS / f"{shot}.png"))
    context.close()
    assert not watch.problems, "\n".join(watch.problems)


@pytest.fixture
def page(browser: Any, server: Server, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The editor on an empty canvas (New after a first visit's default workflow)."""
    with open_editor(browser, server, request.node.name) as page:
        yield page
