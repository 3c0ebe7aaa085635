"""The queue and the history: `/api/jobs` and `/api/history`."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from nodegraph import workflow as wf
from nodegraph.server.errors import ApiError, json_object, problems
from nodegraph.server.state import EXECUTOR, HUB, STORE, WORKER
from nodegraph.store import FINISHED, Job
from nodegraph.validate import validate

routes = web.RouteTableDef()
MAX_CLIENT_ID = 200
HISTORY_LIMIT, HISTORY_MAX = 50, 500


def _job(request: web.Request) -> Job:
    job = request.app[STORE].get(request.match_info["job_id"])
    if job is None:
        raise ApiError(404, "no_such_job", f"no job {request.match_info['job_id'][:100]!r}")
    return job


def _client_id(body: dict[str, Any]) -> str | None:
    client_id = body.get("client_id")
    if client_id is not None and (not isinstance(client_id, str) or not 0 < len(client_id) <= MAX_CLIENT_ID):
        raise ApiError(400, "invalid_body", f"'client_id' must be a string of 1 to {MAX_CLIENT_ID} characters")
    return client_id


@routes.post("/api/jobs")
async def queue_job(request: web.Request) -> web.Response:
    body = await json_object(request)
    client_id = _client_id(body)
    if "from_history" in body:
        past = request.app[STORE].get(str(body["from_history"]))
        if past is None:
            raise ApiError(404, "no_such_job", f"no job {str(body['from_history'])[:100]!r} in history")
        workflow = past.workflow
    elif "workflow" in body:
        workflow = wf.from_json(body["workflow"])
    else:
        raise ApiError(400, "invalid_body", "expected {\"workflow\": {...}} or {\"from_history\": job_id}")
    executor = request.app[EXECUTOR]
    # Validation can take a moment on a large graph (and lists model folders): off the loop.
    _, found = await asyncio.to_thread(validate, workflow, executor.registry, executor.settings)
    if found:
        raise problems(400, found)
    job = request.app[STORE].add(workflow, client_id)
    request.app[WORKER].wake()
    request.app[HUB].publish(client_id, {"type": "job_queued", "job_id": job.id, "position": job.position,
                                         "client_id": client_id})
    return web.json_response({"job_id": job.id, "position": job.position}, status=201)


@routes.get("/api/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    running, pending = request.app[STORE].queue()
    return web.json_response({"running": [j.to_json() for j in running], "pending": [j.to_json() for j in pending]})


@routes.get("/api/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    return web.json_response(_job(request).to_json())


@routes.delete("/api/jobs/{job_id}")
async def cancel_job(request: web.Request) -> web.Response:
    job = _job(request)
    outcome = request.app[WORKER].cancel(job.id)
    if outcome is None:
        raise ApiError(409, "not_active", f"job {job.id} is {job.status}: only pending and running jobs stop")
    if outcome == "cancelled":
        request.app[HUB].publish(job.client_id, {"type": "job_cancelled", "job_id": job.id})
    # A running job stops at its next progress step or node; `job_finished` says when.
    latest = request.app[STORE].get(job.id) or job
    return web.json_response(latest.to_json(), status=200 if outcome == "cancelled" else 202)


@routes.get("/api/history")
async def history(request: web.Request) -> web.Response:
    limit = _int_query(request, "limit", HISTORY_LIMIT)
    before = _int_query(request, "before", None)
    if limit is None or not 1 <= limit <= HISTORY_MAX:
        raise ApiError(400, "bad_query", f"'limit' must be 1 to {HISTORY_MAX}")
    jobs, cursor = request.app[STORE].history(limit, before)
    return web.json_response({"jobs": [j.to_json() for j in jobs], "next": cursor})


@routes.delete("/api/history/{job_id}")
async def delete_history(request: web.Request) -> web.Response:
    job = _job(request)
    if job.status not in FINISHED or not request.app[STORE].delete(job.id):
        raise ApiError(409, "not_finished", f"job {job.id} is {job.status}; cancel it first")
    return web.json_response({"deleted": job.id})


def _int_query(request: web.Request, name: str, default: int | None) -> int | None:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, "bad_query", f"{name!r} must be an integer") from None
