"""`nodegraph serve` as a real process: the ready line, refusals, and no job lost or run twice across kill -9."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nodegraph.cli import main
from nodegraph.store import SHUTDOWN_CODE, SHUTDOWN_MESSAGE, Store
from tests.server.conftest import WAIT, show, slow

ROOT = Path(__file__).parents[2]


class Server:
    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process, self.url = process, url

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=WAIT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def wait_for(self, path: str, done: Any) -> Any:
        """GET `path` until `done(body)` holds (bounded by WAIT)."""
        deadline = time.monotonic() + WAIT
        while True:
            status, body = self.api("GET", path)
            if status == 200 and done(body):
                return body
            assert time.monotonic() < deadline, f"{path}: {body}"
            time.sleep(0.02)


@contextmanager
def serving(tmp_path: Path, *extra: str) -> Iterator[Server]:
    command = [sys.executable, "-c", "from nodegraph.cli import main; raise SystemExit(main())", "serve",
               "--port", "0", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"),
               "--workflows-dir", str(tmp_path / "wf"), "--models-dir", str(tmp_path / "models"),
               "--nodes-dir", str(ROOT / "tests" / "packs"), *(extra or ("--no-warm-up",))]
    with open(tmp_path / "stderr.txt", "a") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=tmp_path,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("nodegraph: serving on http://127.0.0.1:"), (line, (tmp_path / "stderr.txt").read_text())
        yield Server(process, line.split(" on ", 1)[1].strip())
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()


def test_a_killed_server_loses_no_job_and_runs_none_twice(tmp_path: Path) -> None:
    with serving(tmp_path) as first:
        _, cut = first.api("POST", "/api/jobs", {"workflow": slow()})
        queued = [first.api("POST", "/api/jobs", {"workflow": show(i)})[1]["job_id"] for i in range(3)]
        first.wait_for("/api/jobs", lambda jobs: [j["job_id"] for j in jobs["running"]] == [cut["job_id"]])
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        killed_at = time.time()

    with serving(tmp_path) as second:
        jobs = [second.wait_for(f"/api/jobs/{job_id}", lambda job: job["status"] == "ok") for job_id in queued]
        assert all(job["started"] > killed_at for job in jobs)  # none ran in the killed process
        assert [job["started"] for job in jobs] == sorted(job["started"] for job in jobs)  # in queue order
        assert [job["nodes"]["1"]["outputs"]["value"] for job in jobs] == [0, 1, 2]
        _, was_running = second.api("GET", f"/api/jobs/{cut['job_id']}")
        assert was_running["status"] == "error" and was_running["started"] < killed_at
        assert was_running["errors"] == [{"node_id": None, "input": None, "code": SHUTDOWN_CODE,
                                          "message": SHUTDOWN_MESSAGE}]
        _, history = second.api("GET", "/api/history")
        ids = [job["job_id"] for job in history["jobs"]]
        assert sorted(ids) == sorted([cut["job_id"], *queued])  # each job once, none lost

        status, again = second.api("POST", "/api/jobs", {"from_history": cut["job_id"]})
        assert status == 201
        second.wait_for("/api/jobs", lambda jobs: [j["job_id"] for j in jobs["running"]] == [again["job_id"]])
        second.process.send_signal(signal.SIGTERM)  # a clean stop records the running job the same way
        assert second.process.wait(timeout=WAIT) == 0

    store = Store(tmp_path / "data")
    try:
        stopped = store.get(again["job_id"])
        assert stopped is not None and stopped.status == "error"
        assert [e["code"] for e in stopped.result["errors"]] == [SHUTDOWN_CODE]
        assert store.counts() == {"pending": 0, "running": 0}
    finally:
        store.close()


def test_once_listening_the_server_runs_the_packs_warm_up_in_the_background(tmp_path: Path) -> None:
    packs = tmp_path / "packs"
    packs.mkdir()
    marker = tmp_path / "warmed"
    (packs / "warm.py").write_text(
        "import time\nNODES = []\n"
        f"def WARM_UP():\n    time.sleep(0.5)\n    open({str(marker)!r}, 'w').write('done')\n")
    with serving(tmp_path, "--nodes-dir", str(packs)) as server:
        assert server.api("GET", "/api/system")[0] == 200  # answering while the warm-up still runs
        deadline = time.monotonic() + WAIT
        while not marker.exists():
            assert time.monotonic() < deadline, "the warm-up never ran"
            time.sleep(0.05)


def test_serving_beyond_loopback_needs_a_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0"]) == 1
    assert "without --token" in capsys.readouterr().err


def test_a_second_server_on_the_same_data_folder_is_refused(tmp_path: Path) -> None:
    with serving(tmp_path) as first:
        command = [sys.executable, "-c", "from nodegraph.cli import main; raise SystemExit(main())", "serve",
                   "--port", "0", "--data-dir", str(tmp_path / "data")]
        second = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=WAIT)
        assert second.returncode == 1 and "in use by another nodegraph process" in second.stderr
        assert first.api("GET", "/api/jobs")[0] == 200


def send(url: str, request: bytes) -> tuple[int, str, Any]:
    """Raw bytes to the server (what no client library sends); the answer's status, Content-Type, JSON body."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):  # error answers close the connection
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
    return int(status_line.split()[1]), headers.get("content-type", ""), json.loads(body)


UNPARSABLE = [  # refused by aiohttp's parser, before any route or middleware
    b"GARBAGE\r\n\r\n",
    b"GET /api/system HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n",
    b"POST /api/validate HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


def test_the_server_answers_what_aiohttp_cannot_parse_in_json_and_logs_to_stderr(tmp_path: Path) -> None:
    with serving(tmp_path) as server:
        for request in UNPARSABLE:
            status, content_type, body = send(server.url, request)
            assert status == 400 and content_type.startswith("application/json"), request
            assert body["errors"][0]["code"] == "bad_request" and body["errors"][0]["message"], request
        gzipped = (b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n"
                   b"\r\nnot gzip!")
        status, _, body = send(server.url, gzipped)
        assert status == 400 and body["errors"][0]["code"] == "unreadable_body"
        _, queued = server.api("POST", "/api/jobs", {"workflow": show(1), "client_id": "cli"})
        server.wait_for(f"/api/jobs/{queued['job_id']}", lambda job: job["status"] == "ok")
        assert server.api("GET", "/api/jobs/nope")[0] == 404
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=WAIT) == 0
    log = (tmp_path / "stderr.txt").read_text()
    job = queued["job_id"]
    for line in ("- (unparsable request) -> 400 bad_request: Invalid method encountered",
                 "- (unparsable request) -> 400 bad_request: Duplicate 'Host' header found",
                 "- (unparsable request) -> 400 bad_request: Invalid character in chunk size",
                 "POST /api/jobs -> 400 unreadable_body: Can not decode content-encoding: gzip",
                 f"job {job} queued (position 0, client cli)", f"job {job} started", f"job {job} finished: ok in ",
                 "GET /api/jobs/nope -> 404 no_such_job: no job 'nope'"):
        assert line in log, (line, log)
    assert "Traceback" not in log and len(log.splitlines()) == 8, log
