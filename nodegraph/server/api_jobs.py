"""The queue and the history: `/api/jobs` and `/api/history`.

Jobs carry their workflows, which can be megabytes: answers are read from the store and built off
the event loop, with each workflow's stored text spliced in (`Job.to_json_text`), never re-encoded.
Queueing a large workflow pauses the garbage collector (`collector_paused`): its tens of thousands of
short-lived objects would otherwise set off collections that walk the whole process inside the request.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from nodegraph import workflow as wf
from nodegraph.server.errors import ApiError, int_query, json_members, printable, problems
from nodegraph.server.state import EXECUTOR, HUB, STORE, WORKER
from nodegraph.store import FINISHED, Job
from nodegraph.validate import validate

routes = web.RouteTableDef()
log = logging.getLogger("nodegraph.server")
MAX_CLIENT_ID = 200
HISTORY_LIMIT, HISTORY_MAX = 50, 500


async def _job(request: web.Request) -> Job:
    job = await asyncio.to_thread(request.app[STORE].get, request.match_info["job_id"])
    if job is None:
        raise ApiError(404, "no_such_job", f"no job {request.match_info['job_id'][:100]!r}")
    return job


async def jobs_reply(build: Callable[[], str], status: int = 200) -> web.Response:
    """A JSON answer whose text `build` makes in a worker thread, so the event loop never waits on it."""
    body = await asyncio.to_thread(lambda: build().encode("utf-8"))
    return web.Response(body=body, status=status, content_type="application/json", charset="utf-8")


def _list(jobs: list[Job]) -> str:
    return "[" + ", ".join(job.to_json_text() for job in jobs) + "]"


def _client_id(body: dict[str, Any]) -> str | None:
    client_id = body.get("client_id")
    if client_id is not None and (not isinstance(client_id, str) or not 0 < len(client_id) <= MAX_CLIENT_ID):
        raise ApiError(400, "invalid_body", f"'client_id' must be a string of 1 to {MAX_CLIENT_ID} characters")
    return client_id


_pauses = 0  # requests in `collector_paused` now (all on the event loop's thread)


@contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic garbage collection while a request parses, validates, stores and answers.

    Nothing is lost: objects freed by reference counting are freed at once, and the collections put off
    run at the next allocation after the last paused request ends, by then over the few objects still
    alive (the queued workflow) rather than the request's parse and validation garbage.
    """
    global _pauses
    if _pauses == 0 and not gc.isenabled():
        yield  # paused by someone else (a test, an embedding application): theirs to resume
        return
    _pauses += 1
    gc.disable()
    try:
        yield
    finally:
        # Resumed on the loop's next turn: after aiohttp has written this answer, so the put-off collection
        # does not delay it.
        asyncio.get_running_loop().call_soon(_resume)


def _resume() -> None:
    global _pauses
    _pauses -= 1
    if _pauses == 0:
        gc.enable()


@routes.post("/api/jobs")
async def queue_job(request: web.Request) -> web.Response:
    await request.read()  # the upload, however slow, before the pause (aiohttp keeps the bytes for json_members)
    with collector_paused():
        return await _queue_job(request)


async def _queue_job(request: web.Request) -> web.Response:
    body, texts = await json_members(request)
    client_id = _client_id(body)
    text = None
    if "from_history" in body:
        past = await asyncio.to_thread(request.app[STORE].get, str(body["from_history"]))
        if past is None:
            raise ApiError(404, "no_such_job", f"no job {str(body['from_history'])[:100]!r} in history")
        workflow, text = await asyncio.to_thread(lambda: past.workflow), past.workflow_json
    elif "workflow" in body:
        workflow = wf.from_json(body["workflow"])
        if workflow is body["workflow"]:  # not lowered from ComfyUI's API format: stored as it was sent
            text = texts["workflow"]
    else:
        raise ApiError(400, "invalid_body", "expected {\"workflow\": {...}} or {\"from_history\": job_id}")
    executor = request.app[EXECUTOR]
    # Validation can take a moment on a large graph (and lists model folders): off the loop.
    _, found = await asyncio.to_thread(validate, workflow, executor.registry, executor.settings, executor.models)
    if found:
        raise problems(400, found)
    job = await asyncio.to_thread(request.app[STORE].add, workflow, client_id, text)
    log.info("job %s queued (position %d, client %s)", job.id, job.position or 0,
             "-" if client_id is None else printable(client_id))
    # Woken on the loop's next turn, once this answer is written: the job's thread would hold the GIL meanwhile.
    asyncio.get_running_loop().call_soon(request.app[WORKER].wake)
    request.app[HUB].publish(client_id, {"type": "job_queued", "job_id": job.id, "position": job.position,
                                         "client_id": client_id})
    return web.json_response({"job_id": job.id, "position": job.position}, status=201)


@routes.get("/api/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    running, pending = await asyncio.to_thread(request.app[STORE].queue)
    return await jobs_reply(lambda: f'{{"running": {_list(running)}, "pending": {_list(pending)}}}')


@routes.get("/api/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    return await jobs_reply((await _job(request)).to_json_text)


@routes.delete("/api/jobs/{job_id}")
async def cancel_job(request: web.Request) -> web.Response:
    job = await _job(request)
    outcome = request.app[WORKER].cancel(job.id)
    if outcome is None:
        raise ApiError(409, "not_active", f"job {job.id} is {job.status}: only pending and running jobs stop")
    if outcome == "cancelled":
        request.app[HUB].publish(job.client_id, {"type": "job_cancelled", "job_id": job.id})
    # A running job stops at its next progress step or node; `job_finished` says when.
    latest = await asyncio.to_thread(request.app[STORE].get, job.id) or job
    return await jobs_reply(latest.to_json_text, status=200 if outcome == "cancelled" else 202)


@routes.get("/api/history")
async def history(request: web.Request) -> web.Response:
    limit = int_query(request, "limit", HISTORY_MAX, low=1)
    before = int_query(request, "before", 2**63 - 1)  # SQLite's integers are 64-bit
    jobs, cursor = await asyncio.to_thread(request.app[STORE].history, HISTORY_LIMIT if limit is None else limit,
                                           before)
    return await jobs_reply(lambda: f'{{"jobs": {_list(jobs)}, "next": {json.dumps(cursor)}}}')


@routes.delete("/api/history/{job_id}")
async def delete_history(request: web.Request) -> web.Response:
    job = await _job(request)
    if job.status not in FINISHED or not request.app[STORE].delete(job.id):
        raise ApiError(409, "not_finished", f"job {job.id} is {job.status}; cancel it first")
    return web.json_response({"deleted": job.id})
