"""ComfyUI's script examples' way, literally: urllib and websocket-client (blocking, in a thread) on a real port.

What basic_api_example.py and websockets_api_example.py do, written afresh: POST the prompt with urllib (no
Content-Type of JSON: urllib says form-urlencoded), read `/ws?clientId=` until `executing` with `node: None` for
the prompt, then `/history/{id}` and `/view` for each image.
"""

from __future__ import annotations

import asyncio
import io
import json
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import websocket
from PIL import Image

from nodegraph.settings import Settings
from tests.server.conftest import WAIT, MakeClient

TXT2IMG = json.loads((Path(__file__).parents[2] / "workflows" / "comfyui" / "txt2img_lora.json").read_text())


def run_like_the_examples(address: str, prompt: dict[str, Any]) -> dict[str, list[bytes]]:
    client_id = str(uuid.uuid4())
    ws = websocket.WebSocket()
    ws.connect(f"ws://{address}/ws?clientId={client_id}", timeout=WAIT)
    try:
        data = json.dumps({"prompt": prompt, "client_id": client_id}).encode("utf-8")
        with urllib.request.urlopen(urllib.request.Request(f"http://{address}/prompt", data=data)) as response:
            prompt_id = json.loads(response.read())["prompt_id"]
        while True:
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                if message["type"] == "executing" and message["data"]["node"] is None \
                        and message["data"]["prompt_id"] == prompt_id:
                    break
    finally:
        ws.close()
    with urllib.request.urlopen(f"http://{address}/history/{prompt_id}") as response:
        history = json.loads(response.read())[prompt_id]
    images: dict[str, list[bytes]] = {}
    for node_id, output in history["outputs"].items():
        for image in output.get("images", []):
            query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image["subfolder"],
                                            "type": image["type"]})
            with urllib.request.urlopen(f"http://{address}/view?{query}") as response:
                images.setdefault(node_id, []).append(response.read())
    return images


async def test_comfyuis_script_examples_work_as_written(make_client: MakeClient, demo_settings: Settings) -> None:
    client = await make_client(settings=demo_settings)
    address = f"{client.host}:{client.port}"
    prompt = json.loads(json.dumps(TXT2IMG))
    prompt["6"]["inputs"]["text"] = "masterpiece best quality man"  # as the example edits its prompt
    prompt["3"]["inputs"]["seed"] = 5
    images = await asyncio.to_thread(run_like_the_examples, address, prompt)
    assert list(images) == ["9"] and len(images["9"]) == 1
    image = Image.open(io.BytesIO(images["9"][0]))
    assert image.format == "PNG" and image.size == (64, 64)
