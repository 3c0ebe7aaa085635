"""Websocket fan-out: each connection gets its client's job events (or all of them).

Events come from the worker thread and are handed to the event loop with `call_soon_threadsafe`.
Each connection has a bounded queue and its own sender task, so a slow client never blocks the
worker or the other clients: when its queue is full, progress messages are dropped, and a client
that falls so far behind that other messages would be lost is disconnected (close code 1013,
"try again later"); it reconnects and reads the current state from `GET /api/jobs`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

QUEUE_SIZE = 512
DROPPABLE = frozenset({"progress"})


class Subscriber:
    def __init__(self, ws: web.WebSocketResponse, client_id: str, everything: bool) -> None:
        self.ws, self.client_id, self.everything = ws, client_id, everything
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self.overflowed = False
        self.closing: asyncio.Future[bool] | None = None

    def wants(self, client_id: str | None) -> bool:
        return self.everything or client_id == self.client_id

    def deliver(self, client_id: str | None, message: dict[str, Any]) -> None:
        """A published message for the job of `client_id`: offered if this connection wants it. A subclass may
        translate (ComfyUI's websocket: `nodegraph.server.comfy.ws`)."""
        if self.wants(client_id):
            self.offer(message)

    def offer(self, message: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            if message.get("type") not in DROPPABLE and not self.overflowed:
                self.overflowed = True
                self.closing = asyncio.ensure_future(self.ws.close(code=1013, message=b"too slow; reconnect"))

    async def send_forever(self) -> None:
        while True:
            message = await self.queue.get()
            await self.ws.send_json(message)


class Hub:
    def __init__(self) -> None:
        self._subscribers: set[Subscriber] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop that owns the connections; `publish_threadsafe` hands messages to it."""
        self._loop = loop

    def add(self, subscriber: Subscriber) -> None:
        self._subscribers.add(subscriber)

    def discard(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    async def serve(self, subscriber: Subscriber) -> None:
        """Keep `subscriber` connected until its websocket closes: messages go out as they come, what the client
        sends is read and dropped (reading keeps pings and the close handshake going)."""
        self.add(subscriber)
        sender = asyncio.ensure_future(subscriber.send_forever())
        try:
            async for _ in subscriber.ws:
                pass
        finally:
            self.discard(subscriber)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                await sender

    async def close_all(self) -> None:
        """Close every connection (server shutdown: 1001, going away)."""
        for subscriber in list(self._subscribers):
            await subscriber.ws.close(code=1001, message=b"server shutting down")

    def __len__(self) -> int:
        return len(self._subscribers)

    def publish(self, client_id: str | None, message: dict[str, Any]) -> None:
        """Send to the job's client and to every `all` connection; call on the loop's thread."""
        for subscriber in list(self._subscribers):
            subscriber.deliver(client_id, message)

    def publish_threadsafe(self, client_id: str | None, message: dict[str, Any]) -> None:
        """`publish` from any thread (the worker's); FIFO, so events arrive in the order sent."""
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown: nobody is listening
            self._loop.call_soon_threadsafe(self.publish, client_id, message)
