"""The websocket: each connection gets its own client's events (or all), in order; slow clients never block."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from nodegraph.server.hub import QUEUE_SIZE, Hub, Subscriber
from tests.server.conftest import Client, connect, queue, show, slow


async def test_each_connection_gets_its_own_clients_events_and_all_gets_everything(client: Client) -> None:
    alice, bob, everyone = (await connect(client, "client_id=alice"), await connect(client, "client_id=bob"),
                            await connect(client, "all=1"))
    a = await queue(client, show("a"), client_id="alice")
    b = await queue(client, show("b"), client_id="bob")
    await alice.until(type="job_finished", job_id=a)
    await bob.until(type="job_finished", job_id=b)
    await everyone.until(type="job_finished", job_id=b)
    assert {m.get("job_id") for m in alice.seen} == {a} and {m.get("job_id") for m in bob.seen} == {b}
    assert [m["type"] for m in alice.seen] == ["job_queued", "job_started", "node_started", "node_finished",
                                              "job_finished"]
    assert alice.seen[0] == {"type": "job_queued", "job_id": a, "position": 0, "client_id": "alice"}
    assert alice.seen[-1] == {"type": "job_finished", "job_id": a, "status": "ok", "files": [], "errors": []}
    assert alice.seen[3]["files"] == [] and alice.seen[3]["node_id"] == "1"
    assert [m for m in everyone.seen if m["job_id"] == a] == alice.seen  # interleaved with bob's, same order
    assert [m for m in everyone.seen if m["job_id"] == b] == bob.seen


async def test_a_connection_without_a_client_id_gets_a_fresh_one(client: Client) -> None:
    ids = set()
    for _ in range(2):
        ws = await client.ws_connect("/api/ws")
        hello = await ws.receive_json()
        assert hello["type"] == "hello" and hello["queue"] == {"pending": 0, "running": 0}
        ids.add(hello["client_id"])
    assert len(ids) == 2


async def test_progress_events_carry_step_and_total(client: Client) -> None:
    events = await connect(client, "client_id=me")
    job = await queue(client, slow(steps=3, delay=0), client_id="me")
    await events.until(type="job_finished", job_id=job)
    assert [(m["step"], m["total"]) for m in events.of("progress")] == [(1, 3), (2, 3), (3, 3)]


class StuckSocket:
    """A websocket whose client never reads: every send waits forever."""

    def __init__(self) -> None:
        self.closed_with: int | None = None

    async def send_json(self, data: Any) -> None:
        await asyncio.Event().wait()

    async def close(self, code: int = 1000, message: bytes = b"") -> bool:
        self.closed_with = code
        return True


async def test_a_slow_client_loses_progress_then_its_connection_but_never_blocks_the_sender() -> None:
    hub = Hub()
    hub.bind(asyncio.get_running_loop())
    stuck = StuckSocket()
    subscriber = Subscriber(stuck, "slow", everything=False)  # type: ignore[arg-type]
    hub.add(subscriber)
    sender = asyncio.ensure_future(subscriber.send_forever())

    def worker() -> None:  # publishes from another thread, like the job worker
        for step in range(QUEUE_SIZE * 3):
            hub.publish_threadsafe("slow", {"type": "progress", "step": step})

    thread = threading.Thread(target=worker)
    thread.start()
    await asyncio.to_thread(thread.join)  # returns: publishing never waited on the client
    await asyncio.sleep(0)  # let the loop run the handed-over callbacks
    while subscriber.queue.qsize() < QUEUE_SIZE - 1:
        await asyncio.sleep(0.001)
    assert stuck.closed_with is None
    hub.publish("slow", {"type": "node_finished"})
    hub.publish("slow", {"type": "job_finished"})
    await asyncio.sleep(0)
    assert stuck.closed_with == 1013
    sender.cancel()
