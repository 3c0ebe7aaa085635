"""`GET /api/ws?client_id=X[&all=1]`: the websocket of job events.

The first message is `{"type": "hello", "client_id", "queue": {"pending", "running"}}`; then the
executor's events for this client's jobs (or every job with `all=1`), as `event.to_json()`, plus
the server's `job_queued`, `job_cancelled` and `job_finished`. A connection without a `client_id`
gets a fresh one (in `hello`); each connection has its own. With `clientId` (ComfyUI's spelling) instead, the
connection speaks ComfyUI's messages (`nodegraph.server.comfy.ws`).
"""

from __future__ import annotations

import uuid

from aiohttp import web

from nodegraph.server.comfy import ws as comfy_ws
from nodegraph.server.errors import ApiError
from nodegraph.server.hub import Subscriber
from nodegraph.server.state import HUB, STORE

routes = web.RouteTableDef()
MAX_CLIENT_ID = 200


@routes.get("/api/ws")
async def websocket(request: web.Request) -> web.WebSocketResponse:
    if "clientId" in request.query and "client_id" not in request.query:
        return await comfy_ws.websocket(request)  # ComfyUI's frontend, at /api/ws: ComfyUI's messages
    client_id = request.query.get("client_id") or uuid.uuid4().hex
    if len(client_id) > MAX_CLIENT_ID:
        raise ApiError(400, "bad_query", f"'client_id' is longer than {MAX_CLIENT_ID} characters")
    everything = request.query.get("all", "") in ("1", "true")
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024)
    await ws.prepare(request)
    subscriber = Subscriber(ws, client_id, everything)
    subscriber.offer({"type": "hello", "client_id": client_id, "queue": request.app[STORE].counts()})
    await request.app[HUB].serve(subscriber)
    return ws
