"""ComfyUI's queue and history: `/queue`, `/interrupt`, `/history`, over our store and worker.

    GET  /queue                 {"queue_running": [item], "queue_pending": [item]}, item: [number, id, prompt, ...]
    POST /queue                 {"delete": [prompt_id, ...]} or {"clear": true}: pending prompts leave the queue
    POST /interrupt             {} (the running prompt) or {"prompt_id": id} (only if that one runs)
    GET  /history[?max_items=N] {prompt_id: entry}, oldest first; at most HISTORY_MAX
    GET  /history/{prompt_id}   {prompt_id: entry}, or {} when there is no such finished prompt
    POST /history               {"delete": [prompt_id, ...]} or {"clear": true}

As in ComfyUI, a prompt deleted from the queue is gone (not kept in history as cancelled).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from nodegraph.server.comfy.shapes import history_entry, queue_item
from nodegraph.server.errors import ApiError, int_query, json_object
from nodegraph.server.state import EXECUTOR, HUB, STORE, WORKER
from nodegraph.store import FINISHED, Store

routes = web.RouteTableDef()
HISTORY_MAX = 1000
MAX_IDS = 10_000


async def optional_body(request: web.Request) -> dict[str, Any]:
    """The JSON body; an empty one is `{}` (ComfyUI's clients post `/interrupt` without one)."""
    if not await request.read():
        return {}
    return await json_object(request)


def _ids(body: dict[str, Any]) -> list[str]:
    ids = body.get("delete", [])
    if not isinstance(ids, list) or len(ids) > MAX_IDS or not all(isinstance(i, str) for i in ids):
        raise ApiError(400, "invalid_body", f"'delete' must be a list of at most {MAX_IDS} prompt ids")
    return ids


@routes.get("/queue")
async def get_queue(request: web.Request) -> web.Response:
    registry = request.app[EXECUTOR].registry
    running, pending = await asyncio.to_thread(request.app[STORE].queue)
    return web.json_response(await asyncio.to_thread(lambda: {
        "queue_running": [queue_item(job, registry) for job in running],
        "queue_pending": [queue_item(job, registry) for job in pending]}))


@routes.post("/queue")
async def post_queue(request: web.Request) -> web.Response:
    body = await optional_body(request)
    store, worker = request.app[STORE], request.app[WORKER]
    ids = _ids(body)
    if body.get("clear"):
        _, pending = await asyncio.to_thread(store.queue)
        ids = [*ids, *(job.id for job in pending)]
    deleted = []
    for job_id in ids:
        job = await asyncio.to_thread(store.get, job_id)
        if job is None or job.status != "pending":
            continue  # ComfyUI deletes pending prompts only; a running one is stopped with /interrupt
        if worker.cancel(job_id) == "cancelled":
            await asyncio.to_thread(store.delete, job_id)
            deleted.append(job_id)
            request.app[HUB].publish(job.client_id, {"type": "job_cancelled", "job_id": job_id})
    return web.json_response({"deleted": deleted})


@routes.post("/interrupt")
async def interrupt(request: web.Request) -> web.Response:
    body = await optional_body(request)
    wanted = body.get("prompt_id")
    if wanted is not None and not isinstance(wanted, str):
        raise ApiError(400, "invalid_body", "'prompt_id' must be a string")
    running, _ = await asyncio.to_thread(request.app[STORE].queue)
    interrupted = [job.id for job in running if wanted in (None, job.id)
                   and request.app[WORKER].cancel(job.id) == "interrupting"]
    return web.json_response({"interrupted": interrupted})


def _history(store: Store, limit: int) -> list[Any]:
    jobs, _ = store.history(limit)
    return list(reversed(jobs))  # ComfyUI's history is oldest first


@routes.get("/history")
async def get_history(request: web.Request) -> web.Response:
    limit = int_query(request, "max_items", HISTORY_MAX, default=HISTORY_MAX) or 0
    registry = request.app[EXECUTOR].registry
    jobs = await asyncio.to_thread(_history, request.app[STORE], limit) if limit else []
    return web.json_response(await asyncio.to_thread(lambda: {job.id: history_entry(job, registry) for job in jobs}))


@routes.get("/history/{prompt_id}")
async def get_history_entry(request: web.Request) -> web.Response:
    job = await asyncio.to_thread(request.app[STORE].get, request.match_info["prompt_id"])
    if job is None or job.status not in FINISHED:
        return web.json_response({})  # as ComfyUI: not (yet) in history
    return web.json_response({job.id: history_entry(job, request.app[EXECUTOR].registry)})


@routes.post("/history")
async def post_history(request: web.Request) -> web.Response:
    body = await optional_body(request)
    store = request.app[STORE]
    ids = _ids(body)
    if body.get("clear"):
        ids = [*ids, *(job.id for job in await asyncio.to_thread(_history, store, 2**31))]
    deleted = [job_id for job_id in ids if await asyncio.to_thread(store.delete, job_id)]
    return web.json_response({"deleted": deleted})
