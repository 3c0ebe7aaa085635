"""workflows/lora.json on the demo models through the API and the websocket, image served at the end."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from nodegraph import workflow as wf
from nodegraph.settings import Settings
from tests.server.conftest import MakeClient, connect, queue

LORA = json.loads((Path(__file__).parents[2] / "workflows" / "lora.json").read_text())


async def test_the_lora_workflow_runs_through_the_api(make_client: MakeClient, demo_settings: Settings) -> None:
    client = await make_client(settings=demo_settings)
    events = await connect(client, "client_id=editor")
    job_id = await queue(client, LORA, client_id="editor")
    done = await events.until(type="job_finished", job_id=job_id)
    assert done["status"] == "ok", done["errors"]
    progress = [(m["node_id"], m["step"], m["total"]) for m in events.of("progress")]
    assert progress and progress[-1] == ("3", 4, 4) and all(total == 4 for _, _, total in progress)
    saved = next(m for m in events.of("node_finished") if m["node_id"] == "4")
    assert saved["files"] == ["lora_00001_.png", "lora_00002_.png"] == done["files"]
    job = await (await client.get(f"/api/jobs/{job_id}")).json()
    assert job["files"] == done["files"] and job["nodes"]["4"]["files"] == done["files"]
    assert job["nodes"]["3"]["outputs"]["images"]["$type"] == "ImageBatch"
    response = await client.get(f"/api/outputs/{done['files'][0]}")
    assert response.status == 200 and response.headers["Content-Type"] == "image/png"
    body = await response.read()
    assert Image.open(io.BytesIO(body)).size == (64, 64)
    assert wf.loads(body) == LORA  # the served PNG carries its workflow; it imports and runs again
    imported = await (await client.post("/api/import", data=body)).json()
    assert imported == {"workflow": LORA}
