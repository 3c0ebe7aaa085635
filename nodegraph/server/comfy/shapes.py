"""ComfyUI's JSON shapes built from our jobs: queue items, history entries, images, error answers.

A prompt queued through `POST /prompt` is stored as one of our workflows (ComfyUI's node ids kept as ours) with
what ComfyUI keeps beside it under `"comfy"`: `{"number", "extra_data", "warnings"}`. A queue item is ComfyUI's
list `[number, prompt_id, prompt, extra_data, outputs_to_execute]`; the prompt is rebuilt in the API format from
the stored nodes, so a job queued through our own API shows in ComfyUI's queue and history too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from nodegraph.registry import Registry
from nodegraph.store import Job
from nodegraph.validate import Problem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
TEMP_FOLDER = ".temp"  # Settings.temp_dir, relative to the output folder: ComfyUI's type "temp"


def meta(job: Job) -> dict[str, Any]:
    """What `POST /prompt` kept beside the workflow (empty for a job queued through our own API)."""
    workflow = job.workflow
    found = workflow.get("comfy") if isinstance(workflow, dict) else None
    return found if isinstance(found, dict) else {}


def api_prompt(workflow: Any, registry: Registry) -> dict[str, Any]:
    """Our workflow in ComfyUI's API format: `{id: {"inputs", "class_type", "_meta": {"title"}}}`, a link to an
    output by name given as its index, as ComfyUI's links are."""
    found = workflow.get("nodes") if isinstance(workflow, dict) else None
    nodes: dict[str, Any] = found if isinstance(found, dict) else {}
    prompt: dict[str, Any] = {}
    for node_id, node in nodes.items():
        if not isinstance(node, dict):
            continue
        inputs = node.get("inputs", {})
        if isinstance(inputs, dict):
            inputs = {name: _indexed(value, nodes, registry) for name, value in inputs.items()}
        prompt[node_id] = {"inputs": inputs, "class_type": node.get("type"),
                           "_meta": {"title": node.get("title", node.get("type"))}}
    return prompt


def _indexed(value: Any, nodes: dict[str, Any], registry: Registry) -> Any:
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], str) and isinstance(value[0], str)):
        return value
    source = nodes.get(value[0])
    cls = registry.get(source.get("type")) if isinstance(source, dict) else None
    names = [output.name for output in cls.outputs] if cls is not None else []
    return [value[0], names.index(value[1])] if value[1] in names else value


def output_nodes(workflow: Any, registry: Registry) -> list[str]:
    nodes = workflow.get("nodes") if isinstance(workflow, dict) else None
    return [node_id for node_id, node in (nodes or {}).items()
            if isinstance(node, dict) and getattr(registry.get(node.get("type")), "output_node", False)]


def queue_item(job: Job, registry: Registry) -> list[Any]:
    extra = meta(job)
    return [extra.get("number", job.seq), job.id, api_prompt(job.workflow, registry), extra.get("extra_data", {}),
            output_nodes(job.workflow, registry)]


def image(name: str) -> dict[str, str] | None:
    """A file named relative to the output folder as ComfyUI's `{filename, subfolder, type}`; None for a file
    that is not an image there."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or path.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    parts = path.parts
    kind = "temp" if parts[0] == TEMP_FOLDER else "output"
    folder = parts[1:-1] if kind == "temp" else parts[:-1]
    return {"filename": parts[-1], "subfolder": "/".join(folder), "type": kind}


def images(files: Sequence[str]) -> list[dict[str, str]]:
    return [found for found in map(image, files) if found is not None]


def ms(seconds: float | None) -> int:
    return int((seconds if seconds is not None else time.time()) * 1000)


def history_entry(job: Job, registry: Registry) -> dict[str, Any]:
    """A finished job as ComfyUI's history entry: prompt, outputs (images per node), status, meta."""
    outputs: dict[str, Any] = {}
    for node_id, node in job.result.get("nodes", {}).items():
        found = images(node.get("files", []))
        if found:
            outputs[node_id] = {"images": found}
    messages: list[list[Any]] = []
    if job.started is not None:
        messages.append(["execution_start", {"prompt_id": job.id, "timestamp": ms(job.started)}])
        cached = [n for n, node in job.result.get("nodes", {}).items() if node.get("status") == "cached"]
        messages.append(["execution_cached", {"nodes": cached, "prompt_id": job.id, "timestamp": ms(job.started)}])
    errors = job.result.get("errors", [])
    if job.status == "ok":
        messages.append(["execution_success", {"prompt_id": job.id, "timestamp": ms(job.finished)}])
    elif job.status == "interrupted":
        messages.append(["execution_interrupted", {"prompt_id": job.id, "node_id": None, "node_type": None,
                                                   "executed": list(outputs), "timestamp": ms(job.finished)}])
    elif errors:
        messages.append(["execution_error", execution_error(job.id, errors[0], job.workflow, job.finished)])
    nodes = job.workflow.get("nodes", {}) if isinstance(job.workflow, dict) else {}
    return {"prompt": queue_item(job, registry), "outputs": outputs,
            "status": {"status_str": "success" if job.status == "ok" else "error",
                       "completed": job.status == "ok", "messages": messages},
            "meta": {node_id: {"node_id": node_id, "display_node": node_id, "parent_node": None,
                               "real_node_id": node_id}
                     for node_id in outputs if node_id in nodes}}


def execution_error(prompt_id: str, error: dict[str, Any], workflow: Any, when: float | None = None
                    ) -> dict[str, Any]:
    """ComfyUI's `execution_error` data from one of our problems (node_id, input, code, message)."""
    node_id = error.get("node_id")
    nodes = workflow.get("nodes", {}) if isinstance(workflow, dict) else {}
    node = nodes.get(node_id) if isinstance(node_id, str) else None
    node_type = error.get("node_type") or (node.get("type") if isinstance(node, dict) else None)
    return {"prompt_id": prompt_id, "node_id": node_id, "node_type": node_type,
            "executed": [], "exception_message": error.get("message", ""),
            "exception_type": error.get("code", ""), "traceback": [], "current_inputs": {},
            "current_outputs": {}, "timestamp": ms(when)}


def error_answer(kind: str, message: str, details: str = "", node_errors: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """ComfyUI's refusal of a prompt: `{"error": {type, message, details, extra_info}, "node_errors": {...}}`."""
    return {"error": {"type": kind, "message": message, "details": details, "extra_info": {}},
            "node_errors": node_errors or {}}


def validation_answer(found: Sequence[Problem], prompt: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """Our validation problems in ComfyUI's shape: those of a node under `node_errors` by the prompt's node id,
    each with the output nodes that depend on it; those of the whole prompt as the `error`."""
    node_errors: dict[str, Any] = {}
    consumers = _consumers(prompt)
    for problem in found:
        if problem.node_id is None or problem.node_id not in prompt:
            continue
        entry = node_errors.get(problem.node_id)
        if entry is None:
            entry = node_errors[problem.node_id] = {
                "errors": [], "dependent_outputs": _dependent_outputs(problem.node_id, prompt, consumers, registry),
                "class_type": prompt[problem.node_id].get("class_type")}
        entry["errors"].append({"type": problem.code, "message": problem.message,
                                "details": f"{problem.input}: {problem.message}" if problem.input else problem.message,
                                "extra_info": {"input_name": problem.input} if problem.input else {}})
    general = [p for p in found if p.node_id is None or p.node_id not in prompt]
    if general and not node_errors:
        first = general[0]
        kind = "prompt_no_outputs" if first.code == "no_output_node" else first.code
        return error_answer(kind, first.message, "; ".join(p.message for p in general[1:]))
    details = "; ".join(str(p) for p in found[:20])
    return error_answer("prompt_outputs_failed_validation", "Prompt outputs failed validation", details, node_errors)


def _consumers(prompt: dict[str, Any]) -> dict[str, list[str]]:
    """Per node id, the nodes linked to one of its outputs."""
    consumers: dict[str, list[str]] = {}
    for target, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        for value in inputs.values() if isinstance(inputs, dict) else ():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                consumers.setdefault(value[0], []).append(target)
    return consumers


def _dependent_outputs(node_id: str, prompt: dict[str, Any], consumers: dict[str, list[str]],
                       registry: Registry) -> list[str]:
    """The output nodes that `node_id` feeds, directly or not (itself when it is one)."""
    seen, stack = {node_id}, [node_id]
    while stack:
        for target in consumers.get(stack.pop(), []):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    found = [n for n in seen if n in prompt and isinstance(prompt[n], dict)
             and getattr(registry.get(prompt[n].get("class_type")), "output_node", False)]
    if len(found) < 2:
        return found
    order = list(prompt)  # the prompt's order, for a stable answer (output nodes are few: index() is cheap)
    return sorted(found, key=order.index)
