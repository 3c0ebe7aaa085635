"""ComfyUI's websocket, `/ws?clientId=ID`: our event stream as ComfyUI's messages, per client.

On connect: `{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": N}}, "sid": ID}}`. For each
of the client's prompts (and, as in ComfyUI, every prompt queued without a client id): `execution_start`,
`execution_cached`, `executing` {node}, `progress` {value, max}, `executed` {node, output: {images}},
`execution_success` | `execution_error` | `execution_interrupted`, then `executing` with `node: null`. Every
ComfyUI connection gets `status` whenever the queue changes. Node ids are the prompt's own (`lower_comfy_api`
keeps them). The hub's delivery (bounded queue, progress dropped for slow clients) is shared with `/api/ws`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web

from nodegraph.server.comfy.shapes import execution_error, images
from nodegraph.server.errors import ApiError
from nodegraph.server.hub import Subscriber
from nodegraph.server.state import HUB, STORE

MAX_CLIENT_ID = 200
QUEUE_CHANGES = frozenset({"job_queued", "job_cancelled", "job_finished"})


def _now() -> int:
    return int(time.time() * 1000)


class ComfySubscriber(Subscriber):
    """A ComfyUI connection: every published message is translated, none passed on as it is."""

    def __init__(self, ws: web.WebSocketResponse, client_id: str, queue_remaining: Callable[[], int]) -> None:
        super().__init__(ws, client_id, everything=False)
        self.queue_remaining = queue_remaining
        self.failed: set[str] = set()  # prompts whose execution_error was sent (a node's error)

    def status(self, sid: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}
        if sid is not None:
            data["sid"] = sid
        return {"type": "status", "data": data}

    def deliver(self, client_id: str | None, message: dict[str, Any]) -> None:
        if client_id is None or client_id == self.client_id:
            for kind, data in translate(message, self.failed):
                self.offer({"type": kind, "data": data})
        if message.get("type") in QUEUE_CHANGES:
            self.offer(self.status())


def translate(message: dict[str, Any], failed: set[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """ComfyUI's messages (type, data) for one of ours; `failed`: the prompts whose error was sent already."""
    kind, prompt_id = message.get("type"), message.get("job_id")
    node = message.get("node_id")
    if kind == "job_started":
        yield "execution_start", {"prompt_id": prompt_id, "timestamp": _now()}
    elif kind == "node_cached":
        yield "execution_cached", {"nodes": [node], "prompt_id": prompt_id, "timestamp": _now()}
    elif kind == "node_started":
        yield "executing", {"node": node, "display_node": node, "prompt_id": prompt_id}
    elif kind == "progress":
        yield "progress", {"value": message.get("step"), "max": message.get("total"), "prompt_id": prompt_id,
                           "node": node}
    elif kind == "node_finished":
        found = images(message.get("files", []))
        if found:
            yield "executed", {"node": node, "display_node": node, "output": {"images": found},
                               "prompt_id": prompt_id}
    elif kind == "node_error":
        failed.add(str(prompt_id))
        yield "execution_error", execution_error(str(prompt_id), message, None)
    elif kind == "interrupted":
        yield "execution_interrupted", {"prompt_id": prompt_id, "node_id": node, "node_type": None,
                                        "executed": [], "timestamp": _now()}
    elif kind == "job_finished":
        status, errors = message.get("status"), message.get("errors") or []
        if status == "ok":
            yield "execution_success", {"prompt_id": prompt_id, "timestamp": _now()}
        elif status == "error" and errors and str(prompt_id) not in failed:  # failed before any node ran
            yield "execution_error", execution_error(str(prompt_id), errors[0], None)
        failed.discard(str(prompt_id))
        yield "executing", {"node": None, "display_node": None, "prompt_id": prompt_id}


async def websocket(request: web.Request) -> web.WebSocketResponse:
    client_id = request.query.get("clientId") or uuid.uuid4().hex
    if len(client_id) > MAX_CLIENT_ID:
        raise ApiError(400, "bad_query", f"'clientId' is longer than {MAX_CLIENT_ID} characters")
    store = request.app[STORE]
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024)
    await ws.prepare(request)
    subscriber = ComfySubscriber(ws, client_id, lambda: sum(store.counts().values()))
    subscriber.offer(subscriber.status(sid=client_id))
    await request.app[HUB].serve(subscriber)  # ComfyUI's clients may send feature flags: nothing here depends on them
    return ws
