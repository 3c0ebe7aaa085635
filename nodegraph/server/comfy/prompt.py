"""ComfyUI's `POST /prompt` and `GET /prompt`: an API-format prompt queued as one of our jobs.

    curl -d '{"prompt": {...}, "client_id": "me"}' http://127.0.0.1:8188/prompt
    -> {"prompt_id": "…", "number": 3, "node_errors": {}, "warnings": []}

The prompt is lowered to our workflow (`workflow.lower_comfy_api`: ComfyUI's node ids are kept), validated as
any job is, stored and run by the one worker. Where ComfyUI is lenient, so is this route: an input the node type
does not declare (LoadImage's `upload`, a widget of a newer ComfyUI) is dropped, a literal of the wrong JSON
type is converted where ComfyUI converts it without loss (`"steps": 20.0`, `"seed": "5"`), and each is reported
in `warnings`, in the answer and in the stored workflow's `comfy.warnings`; our own format stays strict. A refusal
is ComfyUI's `{"error": {...}, "node_errors": {...}}` with status 400.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from aiohttp import web

from nodegraph import workflow as wf
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.server.api_jobs import collector_paused
from nodegraph.server.comfy.shapes import error_answer, validation_answer
from nodegraph.server.errors import ApiError, json_object, log_error, printable
from nodegraph.server.state import EXECUTOR, HUB, STORE, WORKER
from nodegraph.store import JobExists
from nodegraph.validate import Problem, validate

routes = web.RouteTableDef()
log = logging.getLogger("nodegraph.server")
MAX_CLIENT_ID = 200
PROMPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
INTEGER = re.compile(r"[+-]?[0-9]{1,18}")
NUMBER = re.compile(r"[+-]?([0-9]{1,300}(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,3})?")


class Refused(Exception):
    """A prompt refused with ComfyUI's error body."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["message"])
        self.body = body


def converted(kind: str, value: Any) -> Any:
    """A literal of the wrong JSON type as ComfyUI converts it (`int()`, `float()`, `str()`), where that loses
    nothing: 20.0 or "20" for an INT, "7.5" for a FLOAT, a number for a STRING. `value` itself otherwise."""
    if isinstance(value, bool) or kind not in ("INT", "FLOAT", "STRING"):
        return value
    if kind == "INT" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "INT" and isinstance(value, str) and INTEGER.fullmatch(value.strip()):
        return int(value)
    if kind == "FLOAT" and isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        return float(value)
    if kind == "STRING" and isinstance(value, (int, float)):
        return str(value)
    return value


def lenient(prompt: dict[str, Any], registry: Registry) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The prompt as ComfyUI would take it: inputs its node types do not declare dropped (renamed ones kept:
    validation says what to rename them to), literals of the wrong JSON type converted (`converted`); a warning
    for each."""
    kept: dict[str, Any] = {}
    warnings: list[dict[str, Any]] = []
    for node_id, node in prompt.items():
        cls = registry.get(node.get("class_type"))
        inputs = node.get("inputs")
        if cls is None or not isinstance(inputs, dict):
            kept[node_id] = node
            continue
        specs = {spec.name: spec for spec in cls.inputs}
        new: dict[str, Any] = {}
        for name, value in inputs.items():
            spec = specs.get(name)
            if spec is None and name not in cls.renamed_inputs:
                warnings.append({"node_id": str(node_id), "input": name, "code": "unknown_input_dropped",
                                 "message": f"{cls.type} has no input {name!r}: ignored, as ComfyUI does"})
                continue
            if spec is not None and not wf.is_link(value):
                value = converted(spec.type, value)
                if value is not inputs[name]:
                    warnings.append({"node_id": str(node_id), "input": name, "code": "value_converted",
                                     "message": f"{inputs[name]!r} taken as {value!r} ({spec.type}), as ComfyUI does"})
            new[name] = value
        kept[node_id] = {**node, "inputs": new} if new != inputs or len(new) != len(inputs) else node
    return kept, warnings


def _checked(prompt: dict[str, Any], executor: Executor
             ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """The prompt made lenient and lowered, its warnings, and ComfyUI's refusal of it (None when valid)."""
    kept, warnings = lenient(prompt, executor.registry)
    unhashable = [Problem(str(node_id), str(name), "bad_link", "a link is [node_id, output] with a string node id")
                  for node_id, node in kept.items() if isinstance(node.get("inputs"), dict)
                  for name, value in node["inputs"].items()
                  if wf.is_link(value) and isinstance(value[0], (dict, list))]
    if unhashable:  # which `lower_comfy_api` cannot look up
        return {}, warnings, validation_answer(unhashable, kept, executor.registry)
    workflow = wf.lower_comfy_api(kept)
    _, found = validate(workflow, executor.registry, executor.settings, executor.models)
    return workflow, warnings, validation_answer(found, kept, executor.registry) if found else None


def _text(body: dict[str, Any], name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise Refused(error_answer("invalid_prompt", f"{name!r} must be a string of 1 to {limit} characters"))
    return value


@routes.post("/prompt")
async def post_prompt(request: web.Request) -> web.Response:
    await request.read()  # the upload, however slow, before the pause
    with collector_paused():
        try:
            return await _queue_prompt(request)
        except ApiError as exc:  # an unreadable body: ComfyUI's shape too, for its clients
            body = error_answer(exc.code, str(exc))
            status = exc.status
        except Refused as exc:
            body, status = exc.body, 400
    log_error(request.method, request.raw_path, status, {"code": body["error"]["type"],
                                                         "message": body["error"]["message"]})
    return web.json_response(body, status=status)


async def _queue_prompt(request: web.Request) -> web.Response:
    body = await json_object(request)
    prompt = body.get("prompt")
    if not isinstance(prompt, dict) or not wf.is_comfy_api(prompt):
        raise Refused(error_answer("invalid_prompt", "'prompt' must be a prompt in ComfyUI's API format: "
                                   '{"node_id": {"class_type": ..., "inputs": {...}}, ...}'))
    extra_data = body.get("extra_data", {})
    if not isinstance(extra_data, dict):
        raise Refused(error_answer("invalid_prompt", "'extra_data' must be an object"))
    client_id = _text(body, "client_id", MAX_CLIENT_ID) or _text(extra_data, "client_id", MAX_CLIENT_ID)
    prompt_id = _text(body, "prompt_id", 128)
    if prompt_id is not None and not PROMPT_ID.fullmatch(prompt_id):
        raise Refused(error_answer("invalid_prompt", "'prompt_id' must be letters, digits and '_.:-' (a uuid)"))
    number = body.get("number")
    if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))):
        raise Refused(error_answer("invalid_prompt", "'number' must be a number"))
    executor = request.app[EXECUTOR]
    # Lowering and validation take a moment on a large graph (and list model folders): off the loop.
    workflow, warnings, refusal = await asyncio.to_thread(_checked, prompt, executor)
    if refusal is not None:
        raise Refused(refusal)
    if body.get("front"):
        warnings.append({"node_id": None, "input": None, "code": "front_ignored",
                         "message": "'front' is not supported: the prompt is queued at the back"})
    if client_id is not None:
        extra_data = {**extra_data, "client_id": client_id}  # where ComfyUI keeps it (its frontend reads it there)
    workflow["comfy"] = {"extra_data": extra_data, "warnings": warnings,
                         **({"number": number} if number is not None else {})}
    try:
        job = await asyncio.to_thread(request.app[STORE].add, workflow, client_id, None, prompt_id)
    except JobExists:
        raise Refused(error_answer("prompt_id_taken", f"a prompt with the id {prompt_id!r} exists already")) from None
    log.info("job %s queued (position %d, client %s, ComfyUI's /prompt)", job.id, job.position or 0,
             "-" if client_id is None else printable(client_id))
    asyncio.get_running_loop().call_soon(request.app[WORKER].wake)
    request.app[HUB].publish(client_id, {"type": "job_queued", "job_id": job.id, "position": job.position,
                                         "client_id": client_id})
    return web.json_response({"prompt_id": job.id, "number": number if number is not None else job.seq,
                              "node_errors": {}, "warnings": warnings})


@routes.get("/prompt")
async def get_prompt(request: web.Request) -> web.Response:
    counts = await asyncio.to_thread(request.app[STORE].counts)
    return web.json_response({"exec_info": {"queue_remaining": sum(counts.values())}})
