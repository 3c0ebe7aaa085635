"""ComfyUI's jobs API, which its newer frontend reads for the queue and history panels.

    GET /jobs?status=in_progress,pending&limit=200&offset=0
        {"jobs": [{id, status, create_time, execution_start_time, execution_end_time, preview_output,
                   outputs_count, previewable_outputs_count, execution_error, workflow_id, priority}],
         "pagination": {offset, limit, total, has_more}}
    GET /jobs/{job_id}    one job, with its outputs (as in ComfyUI's history) and workflow

Statuses are ComfyUI's: pending, in_progress, completed, failed, cancelled (an interrupted job is cancelled).
Newest first; times in milliseconds (`create_time` the frontend's `extra_data.create_time` where it sent one;
`workflow_id` its `extra_pnginfo.workflow.id`). `/api/jobs` is ours unless the server runs `--front-end comfyui`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from nodegraph.registry import Registry
from nodegraph.server.comfy.shapes import api_prompt, execution_error, history_entry, meta, ms
from nodegraph.server.errors import ApiError, int_query
from nodegraph.server.state import EXECUTOR, STORE
from nodegraph.store import FINISHED, Job, Store

routes = web.RouteTableDef()
STATUSES = {"pending": "pending", "running": "in_progress", "ok": "completed", "error": "failed",
            "interrupted": "cancelled", "cancelled": "cancelled"}
ACTIVE, DONE = frozenset({"pending", "in_progress"}), frozenset({"completed", "failed", "cancelled"})
MAX_LIMIT = 1000


def _time(seconds: float | None) -> int | None:
    return None if seconds is None else ms(seconds)


def job_summary(job: Job, registry: Registry) -> dict[str, Any]:
    status = STATUSES.get(job.status, "failed")
    outputs = history_entry(job, registry)["outputs"] if job.status in FINISHED else {}
    previews = [{**image, "nodeId": node_id, "mediaType": "images"}
                for node_id, found in outputs.items() for image in found.get("images", [])]
    errors = job.result.get("errors", [])
    error = None
    if status == "failed" and errors:
        error = execution_error(job.id, errors[0], job.workflow, job.finished)
        error["node_id"], error["node_type"] = str(error["node_id"] or ""), str(error["node_type"] or "")
    extra = meta(job).get("extra_data", {})
    created = extra.get("create_time") if isinstance(extra, dict) else None  # the frontend's clock, as ComfyUI
    pnginfo = extra.get("extra_pnginfo") if isinstance(extra, dict) else None
    graph = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    workflow_id = graph.get("id") if isinstance(graph, dict) else None
    return {"id": job.id, "status": status,
            "create_time": created if isinstance(created, int) and not isinstance(created, bool) else ms(job.created),
            "execution_start_time": _time(job.started), "execution_end_time": _time(job.finished),
            "preview_output": previews[0] if previews else None,
            "outputs_count": sum(len(found.get("images", [])) for found in outputs.values()),
            "previewable_outputs_count": len(previews), "execution_error": error,
            "workflow_id": workflow_id if isinstance(workflow_id, str) else None,
            "priority": meta(job).get("number", job.seq)}


def job_detail(job: Job, registry: Registry) -> dict[str, Any]:
    entry = history_entry(job, registry) if job.status in FINISHED else None
    return {**job_summary(job, registry), "outputs": entry["outputs"] if entry else {},
            "workflow": {"prompt": api_prompt(job.workflow, registry),
                         "extra_data": meta(job).get("extra_data", {})},
            "update_time": ms(job.finished or job.started or job.created),
            "execution_status": entry["status"] if entry else None}


def list_jobs(store: Store, registry: Registry, wanted: frozenset[str], limit: int, offset: int
              ) -> dict[str, Any]:
    found: list[Job] = []
    if wanted & ACTIVE:
        running, pending = store.queue()
        found += [job for job in [*reversed(pending), *running] if STATUSES[job.status] in wanted]
    more = False
    if wanted & DONE:
        # Finished jobs are read only as far as this page reaches: `total` counts up to it (`has_more` says more).
        done, cursor = store.history(offset + limit + 1)
        found += [job for job in done if STATUSES.get(job.status) in wanted]
        more = cursor is not None
    page = found[offset:offset + limit]
    more = more or len(found) > offset + limit
    return {"jobs": [job_summary(job, registry) for job in page],
            "pagination": {"offset": offset, "limit": limit, "total": len(found), "has_more": more}}


@routes.get("/jobs")
async def get_jobs(request: web.Request) -> web.Response:
    statuses = [s for s in request.query.get("status", "").split(",") if s]
    unknown = [s for s in statuses if s not in ACTIVE | DONE]
    if unknown:
        raise ApiError(400, "bad_query", f"unknown status {unknown[0][:50]!r}; statuses: "
                                         f"{', '.join(sorted(ACTIVE | DONE))}")
    wanted = frozenset(statuses) or ACTIVE | DONE
    limit = int_query(request, "limit", MAX_LIMIT, default=200) or 0
    offset = int_query(request, "offset", 2**31, default=0) or 0
    answer = await asyncio.to_thread(list_jobs, request.app[STORE], request.app[EXECUTOR].registry, wanted,
                                     limit, offset)
    return web.json_response(answer)


@routes.get("/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    job = await asyncio.to_thread(request.app[STORE].get, request.match_info["job_id"])
    if job is None:
        raise ApiError(404, "no_such_job", f"no job {request.match_info['job_id'][:100]!r}")
    return web.json_response(await asyncio.to_thread(job_detail, job, request.app[EXECUTOR].registry))
