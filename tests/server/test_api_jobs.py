"""The queue and history over HTTP: queue, run, list, cancel, interrupt, re-queue, page, delete."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from nodegraph.server import api_jobs
from nodegraph.server.state import STORE
from nodegraph.server.worker import Worker
from nodegraph.store import Job, StorageFull, Store
from nodegraph.validate import validate
from tests.server.conftest import WAIT, Client, connect, finished, queue, show, slow, state, wf

MATH = json.loads((Path(__file__).parents[2] / "workflows" / "math.json").read_text())


async def test_a_queued_workflow_runs_and_its_result_is_recorded(client: Client) -> None:
    job_id = await queue(client, MATH, client_id="me")
    job = await finished(client, job_id)
    assert job["status"] == "ok" and job["errors"] == [] and job["client_id"] == "me"
    assert job["workflow"] == MATH and job["files"] == []
    assert job["nodes"]["5"] == {"type": "Show", "status": "ran", "seconds": job["nodes"]["5"]["seconds"],
                                 "outputs": {"value": "(3 + 4.5)^2 = 56.25"}, "files": []}
    assert job["created"] <= job["started"] <= job["finished"]
    history = await (await client.get("/api/history")).json()
    assert [j["job_id"] for j in history["jobs"]] == [job_id] and history["next"] is None


async def test_the_executor_and_its_cache_persist_across_jobs(client: Client) -> None:
    first = await finished(client, await queue(client, MATH))
    second = await finished(client, await queue(client, MATH))
    assert {n["status"] for n in first["nodes"].values()} == {"ran"}
    assert {n["status"] for n in second["nodes"].values()} == {"cached"}


async def test_an_invalid_workflow_is_refused_with_every_problem(client: Client) -> None:
    bad = wf({"1": {"type": "Math", "inputs": {"a": "x", "op": "nope"}}, "2": {"type": "Nope"}})
    response = await client.post("/api/jobs", json={"workflow": bad})
    assert response.status == 400
    errors = (await response.json())["errors"]
    assert {(e["node_id"], e["code"]) for e in errors} >= {("1", "wrong_type"), ("1", "not_a_choice"),
                                                          ("2", "unknown_node_type")}
    assert (await (await client.get("/api/jobs")).json()) == {"running": [], "pending": []}


async def test_a_comfyui_api_workflow_is_accepted(client: Client) -> None:
    comfy = {"7": {"class_type": "Show", "inputs": {"value": "hi"}, "_meta": {"title": "t"}}}
    job = await finished(client, await queue(client, comfy))  # type: ignore[arg-type]
    assert job["status"] == "ok" and job["nodes"]["7"]["outputs"] == {"value": "hi"}


async def test_bad_bodies_are_json_errors(client: Client) -> None:
    for body, code in ((b"{", "invalid_json"), (b"[]", "invalid_body"), (b"{}", "invalid_body"),
                       (b'{"workflow": {}, "client_id": 5}', "invalid_body")):
        response = await client.post("/api/jobs", data=body)
        assert response.status == 400 and (await response.json())["errors"][0]["code"] == code
    response = await client.post("/api/jobs", json={"from_history": "nope"})
    assert response.status == 404 and (await response.json())["errors"][0]["code"] == "no_such_job"


async def test_pending_jobs_are_listed_in_run_order_and_cancelled_jobs_stay_in_history(client: Client) -> None:
    events = await connect(client, "client_id=me")
    running = await queue(client, slow(), client_id="me")
    await events.until(type="progress", job_id=running)
    waiting = [await queue(client, show(i), client_id="me") for i in range(3)]
    jobs = await (await client.get("/api/jobs")).json()
    assert [j["job_id"] for j in jobs["running"]] == [running]
    assert [(j["job_id"], j["position"]) for j in jobs["pending"]] == jobs_at(waiting)
    await events.until(type="job_queued", job_id=waiting[2])
    assert [(m["job_id"], m["position"]) for m in events.of("job_queued")] == [(running, 0), *jobs_at(waiting)]

    response = await client.delete(f"/api/jobs/{waiting[1]}")
    assert response.status == 200 and (await response.json())["status"] == "cancelled"
    await events.until(type="job_cancelled", job_id=waiting[1])
    after = await (await client.get("/api/jobs")).json()
    assert [(j["job_id"], j["position"]) for j in after["pending"]] == [(waiting[0], 0), (waiting[2], 1)]

    response = await client.delete(f"/api/jobs/{running}")
    assert response.status == 202
    done = await events.until(type="job_finished", job_id=running)
    assert done["status"] == "interrupted" and events.of("interrupted", running)
    assert (await (await client.get(f"/api/jobs/{running}")).json())["status"] == "interrupted"
    assert [(await finished(client, j))["status"] for j in waiting] == ["ok", "cancelled", "ok"]
    history = [j["job_id"] for j in (await (await client.get("/api/history")).json())["jobs"]]
    assert history == [waiting[2], waiting[0], running, waiting[1]]  # most recently finished first

    response = await client.delete(f"/api/jobs/{running}")
    assert response.status == 409 and (await response.json())["errors"][0]["code"] == "not_active"
    assert (await client.delete("/api/jobs/nope")).status == 404
    assert (await client.get("/api/jobs/nope")).status == 404


async def test_a_past_job_can_be_queued_again(client: Client) -> None:
    first = await queue(client, show("again"))
    await finished(client, first)
    response = await client.post("/api/jobs", json={"from_history": first, "client_id": "other"})
    assert response.status == 201
    second = (await response.json())["job_id"]
    job = await finished(client, second)
    assert second != first and job["workflow"] == show("again") and job["client_id"] == "other"


async def test_a_failing_node_is_recorded_with_its_error(client: Client) -> None:
    job = await finished(client, await queue(client, wf({"1": {"type": "Fail", "inputs": {}},
                                                         "2": {"type": "Show", "inputs": {"value": ["1", 0]}}})))
    assert job["status"] == "error" and job["nodes"]["1"]["status"] == "error"
    assert [(e["node_id"], e["code"]) for e in job["errors"]] == [("1", "test_failure")]


async def test_history_pages_and_deletes(client: Client) -> None:
    ids = [await queue(client, show(i)) for i in range(5)]
    await finished(client, ids[-1])
    seen: list[str] = []
    url = "/api/history?limit=2"
    while True:
        page = await (await client.get(url)).json()
        seen += [j["job_id"] for j in page["jobs"]]
        if page["next"] is None:
            break
        url = f"/api/history?limit=2&before={page['next']}"
    assert seen == ids[::-1]
    response = await client.delete(f"/api/history/{ids[0]}")
    assert response.status == 200 and (await response.json()) == {"deleted": ids[0]}
    assert (await client.get(f"/api/jobs/{ids[0]}")).status == 404
    assert (await client.delete(f"/api/history/{ids[0]}")).status == 404
    for query in ("limit=0", "limit=501", "limit=x", "before=y", f"before={2**63}", "before=-1", f"limit={2**64}"):
        response = await client.get(f"/api/history?{query}")
        assert response.status == 400 and (await response.json())["errors"][0]["code"] == "bad_query"


async def test_a_running_job_cannot_be_deleted_from_history(client: Client) -> None:
    events = await connect(client)
    running = await queue(client, slow(), client_id="me")
    await events.until(type="progress", job_id=running)
    response = await client.delete(f"/api/history/{running}")
    assert response.status == 409 and (await response.json())["errors"][0]["code"] == "not_finished"


def jobs_at(ids: list[str]) -> list[tuple[str, int]]:
    return list(zip(ids, range(len(ids)), strict=True))


async def test_the_largest_cursor_sqlite_holds_is_accepted(client: Client) -> None:
    job_id = await queue(client, show(1))
    await finished(client, job_id)
    page = await (await client.get(f"/api/history?before={2**63 - 1}")).json()
    assert [j["job_id"] for j in page["jobs"]] == [job_id]


async def test_a_client_id_that_is_not_unicode_text_queues_nothing(client: Client, tmp_path: Path) -> None:
    before = await state(client, tmp_path)
    body = '{"workflow": ' + json.dumps(show(1)) + ', "client_id": "editor-\\udc80"}'
    response = await client.post("/api/jobs", data=body)
    assert response.status == 400
    error = (await response.json())["errors"][0]
    assert error["code"] == "invalid_text" and "client_id" in error["message"]
    assert await state(client, tmp_path) == before


async def test_jobs_are_answered_off_the_event_loop(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # A deliberately slow answer (as a job with a huge workflow): other requests are answered meanwhile.
    job_id = await queue(client, show("big"))
    await finished(client, job_id)
    running = await queue(client, slow())  # so that /api/jobs lists one
    release, entered = threading.Event(), threading.Event()
    original = Job.to_json_text

    def slow_text(job: Job) -> str:
        entered.set()
        release.wait(WAIT)  # on the event loop, this would hold every other request back until WAIT
        return original(job)

    monkeypatch.setattr(Job, "to_json_text", slow_text)
    for path in (f"/api/jobs/{job_id}", "/api/history", "/api/jobs"):
        entered.clear()
        release.clear()
        reading = asyncio.ensure_future(client.get(path))
        await asyncio.to_thread(entered.wait, WAIT)
        assert (await client.get("/api/system")).status == 200
        assert not reading.done(), path  # /api/system was answered while the job was still being encoded
        release.set()
        response = await reading
        assert response.status == 200
        text = json.dumps(await response.json())
        big = '"workflow": {"format": "nodegraph/1", "nodes": {"1": {"type": "Show", "inputs": {"value": "big"}}}'
        assert big in text or f'"job_id": "{running}"' in text


async def test_the_server_logs_each_job_queued_started_and_finished(client: Client,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nodegraph.server")
    ok = await queue(client, show(1), client_id="me")
    failed = await queue(client, wf({"1": {"type": "Fail", "inputs": {}},
                                     "2": {"type": "Show", "inputs": {"value": ["1", 0]}}}))
    await finished(client, failed)
    await finished(client, ok)
    lines = [r.getMessage() for r in caplog.records if r.name == "nodegraph.server"]
    for job_id, status in ((ok, "ok"), (failed, "error")):
        mine = [line for line in lines if line.startswith(f"job {job_id} ")]
        assert [line.split()[2] for line in mine] == ["queued", "started", "finished:"], mine
        assert mine[2].startswith(f"job {job_id} finished: {status} in ") and mine[2].endswith(" s")
    assert f"job {ok} queued (position 0, client me)" in lines


async def test_queueing_pauses_the_collector_and_resumes_it_after_the_answer(client: Client,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def validating(*args: object) -> object:
        seen.append(gc.isenabled())
        return validate(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(api_jobs, "validate", validating)
    assert gc.isenabled()
    await finished(client, await queue(client, MATH))
    bad = await client.post("/api/jobs", json={"workflow": wf({"1": {"type": "Nope"}})})
    assert bad.status == 400
    await asyncio.sleep(0)
    assert seen == [False, False] and gc.isenabled()  # paused in both; resumed after the refusal too
    gc.disable()  # paused by someone else: theirs to resume
    try:
        await finished(client, await queue(client, MATH))
        await asyncio.sleep(0)
        assert not gc.isenabled()
    finally:
        gc.enable()


async def test_a_workflow_is_stored_as_the_client_sent_it(client: Client) -> None:
    sent = '{\n  "format": "nodegraph/1",\n  "nodes": {"1": {"type": "Show", "inputs": {"value": "café ✓"}}}\n}'
    response = await client.post("/api/jobs", data=f'{{"client_id": "me", "workflow": {sent}}}'.encode())
    assert response.status == 201
    job_id = (await response.json())["job_id"]
    job = await finished(client, job_id)
    assert job["status"] == "ok" and job["workflow"] == json.loads(sent)
    assert client.server.app[STORE].get(job_id).workflow_json == sent  # not encoded again
    again = await client.post("/api/jobs", json={"from_history": job_id})
    assert client.server.app[STORE].get((await again.json())["job_id"]).workflow_json == sent


class FullDisk:
    """The store's connection on a disk that may fill up: while `full`, every row written fails as SQLite fails
    when the disk (or the user's quota) is full."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real, self.full = real, False

    def execute(self, sql: str, *args: Any) -> Any:
        if self.full and sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_a_full_disk_is_507_storage_full_and_the_server_recovers_by_itself_losing_nothing(
        client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nodegraph.server")
    monkeypatch.setattr(Worker, "storage_retry", 0.05)
    store = client.server.app[STORE]
    disk = FullDisk(store._db)
    store._db = disk  # type: ignore[assignment]
    running = await queue(client, slow())
    while (await (await client.get(f"/api/jobs/{running}")).json())["status"] != "running":
        await asyncio.sleep(0.01)
    waiting = await queue(client, show(1))
    disk.full = True
    response = await client.post("/api/jobs", json={"workflow": show(2)})
    assert response.status == 507
    error = (await response.json())["errors"][0]
    assert error["code"] == "storage_full" and error["folder"] == "data" and "'data'" in error["message"]
    assert str(tmp_path) not in error["message"]
    assert (await client.delete(f"/api/jobs/{running}")).status == 202  # it stops, but cannot be recorded yet
    await asyncio.sleep(0.3)  # the worker tries to record it, again and again
    jobs = await (await client.get("/api/jobs")).json()  # the server still answers, and the queue is intact
    assert [j["job_id"] for j in jobs["running"]] == [running] and [j["job_id"] for j in jobs["pending"]] == [waiting]
    disk.full = False  # space is back: nothing to restart
    assert (await finished(client, running))["status"] == "interrupted"
    assert (await finished(client, waiting))["status"] == "ok"
    assert (await finished(client, await queue(client, show(3))))["status"] == "ok"
    lines = [r.getMessage() for r in caplog.records if r.name == "nodegraph.server"]
    assert len([line for line in lines if "no space left" in line and "jobs wait" in line]) == 1  # once an outage
    assert "storage is back: jobs run again" in lines
    assert not [r for r in caplog.records if r.exc_info]


async def test_the_server_starts_on_a_full_disk(make_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: Store) -> list[str]:
        raise StorageFull("data")

    monkeypatch.setattr(Store, "recover", full)  # a job cut off by a crash could not be marked
    client = await make_client()
    assert (await finished(client, await queue(client, show(1))))["status"] == "ok"
