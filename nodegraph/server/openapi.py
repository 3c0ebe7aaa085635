"""The API as an OpenAPI 3 document, written by hand (`GET /api/openapi.json`).

A test checks that every route of the app is described here and that nothing here is missing
from the app. Every 4xx/5xx answer is an `Errors` object (507 `storage_full`: the disk under a folder is full).
"""

from __future__ import annotations

from typing import Any

from nodegraph.server import comfy


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"$ref": "#/components/responses/Errors"} for status in statuses}


def _op(summary: str, responses: dict[str, Any], body: dict[str, Any] | None = None,
        params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_OBJECT = {"type": "object"}
_WORKFLOW_BODY = {"application/json": {"schema": {"type": "object", "properties": {"workflow": _ref("Workflow")},
                                                  "required": ["workflow"]}}}
_JOB_ID = _path_param("job_id", "a job id")
_WORKFLOW_NAME = _path_param("name", "a file name ([A-Za-z0-9][A-Za-z0-9 _.-]*.json), "
                                      "in folders joined by '/' (comfyui/a.json)")

_SCHEMAS: dict[str, Any] = {
    "Workflow": {"type": "object", "description": "a nodegraph/1 workflow (ComfyUI's API format is accepted "
                                                  "where a workflow is sent)",
                 "properties": {"format": {"const": "nodegraph/1"}, "nodes": _OBJECT, "ui": _OBJECT}},
    "Problem": {"type": "object", "required": ["code", "message"], "properties": {
        "node_id": {"type": ["string", "null"]}, "input": {"type": ["string", "null"]},
        "code": {"type": "string"}, "message": {"type": "string"}}},
    "Errors": {"type": "object", "required": ["errors"],
               "properties": {"errors": {"type": "array", "items": _ref("Problem")}}},
    "Job": {"type": "object", "required": ["job_id", "status", "nodes", "files", "errors", "workflow"], "properties": {
        "job_id": {"type": "string"},
        "status": {"enum": ["pending", "running", "ok", "error", "interrupted", "cancelled"]},
        "client_id": {"type": ["string", "null"]},
        "created": {"type": "number"}, "started": {"type": ["number", "null"]},
        "finished": {"type": ["number", "null"]},
        "position": {"type": "integer", "description": "pending jobs only; 0 runs next"},
        "nodes": {"type": "object", "additionalProperties": {"type": "object", "properties": {
            "type": {"type": "string"}, "status": {"enum": ["ran", "cached", "error", "interrupted"]},
            "seconds": {"type": "number"}, "outputs": _OBJECT,
            "files": {"type": "array", "items": {"type": "string"}}}}},
        "files": {"type": "array", "items": {"type": "string"}, "description": "relative to the output folder"},
        "errors": {"type": "array", "items": _ref("Problem")},
        "workflow": _ref("Workflow")}},
}

_PATHS: dict[str, Any] = {
    "/": {"get": _op("the editor (web/index.html)", {"200": {"description": "HTML"}, **_errors(401, 404)})},
    "/web/{name}": {"get": _op("the editor's static files", {"200": {"description": "a file"},
                                                              **_errors(400, 401, 403, 404)},
                               params=[_path_param("name", "a path inside web/")])},
    "/api/openapi.json": {"get": _op("this document", {"200": _json(_OBJECT)})},
    "/api/nodes": {"get": _op("the node catalog (as `nodegraph nodes --json`), choices current",
                              {"200": _json({"type": "object", "properties": {"nodes": _OBJECT}})})},
    "/api/models/{kind}": {"get": _op("the model files of one kind", {
        "200": _json({"type": "object", "properties": {"kind": {"type": "string"},
                                                       "files": {"type": "array", "items": {"type": "string"}}}}),
        **_errors(404)}, params=[_path_param("kind", "checkpoints or loras")])},
    "/api/validate": {"post": _op("validate a workflow", {
        "200": _json({"type": "object", "properties": {"ok": {"type": "boolean"},
                                                       "errors": {"type": "array", "items": _ref("Problem")}}}),
        **_errors(400, 403, 413)}, body=_WORKFLOW_BODY)},
    "/api/jobs": {
        "post": _op("queue a workflow, or a past job's workflow again", {
            "201": _json({"type": "object", "properties": {"job_id": {"type": "string"},
                                                           "position": {"type": "integer"}}}, "queued"),
            **_errors(400, 403, 404, 413, 507)},
            body={"application/json": {"schema": {"type": "object", "properties": {
                "workflow": _ref("Workflow"), "from_history": {"type": "string"},
                "client_id": {"type": "string"}}}}}),
        "get": _op("the running and pending jobs (pending in run order)", {"200": _json({
            "type": "object", "properties": {"running": {"type": "array", "items": _ref("Job")},
                                             "pending": {"type": "array", "items": _ref("Job")}}})})},
    "/api/jobs/{job_id}": {
        "get": _op("one job", {"200": _json(_ref("Job")), **_errors(404)}, params=[_JOB_ID]),
        "delete": _op("cancel a pending job (200) or interrupt the running one (202)", {
            "200": _json(_ref("Job"), "cancelled"), "202": _json(_ref("Job"), "interrupting"),
            **_errors(403, 404, 409, 507)}, params=[_JOB_ID])},
    "/api/history": {"get": _op("finished jobs, most recently finished first", {
        "200": _json({"type": "object", "properties": {"jobs": {"type": "array", "items": _ref("Job")},
                                                       "next": {"type": ["integer", "null"]}}}),
        **_errors(400)}, params=[_query("limit", "1 to 500, default 50", {"type": "integer"}),
                                 _query("before", "the `next` cursor of the previous page", {"type": "integer"})])},
    "/api/history/{job_id}": {"delete": _op("delete a finished job from history", {
        "200": _json({"type": "object", "properties": {"deleted": {"type": "string"}}}),
        **_errors(403, 404, 409, 507)}, params=[_JOB_ID])},
    "/api/outputs/{name}": {"get": _op("a generated image (also .temp/ previews)", {
        "200": {"description": "the image", "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        **_errors(400, 403, 404)}, params=[_path_param("name", "relative to the output folder")])},
    "/api/workflows": {"get": _op("the saved workflows' names", {"200": _json({
        "type": "object", "properties": {"workflows": {"type": "array", "items": {"type": "string"}}}})})},
    "/api/workflows/{name}": {
        "get": _op("a saved workflow (the file itself)", {"200": _json(_ref("Workflow")), **_errors(400, 403, 404)},
                   params=[_WORKFLOW_NAME]),
        "put": _op("save a workflow (atomically); 201 when new", {
            "200": _json(_OBJECT, "replaced"), "201": _json(_OBJECT, "created"), **_errors(400, 403, 413)},
            body={"application/json": {"schema": _ref("Workflow")}}, params=[_WORKFLOW_NAME]),
        "delete": _op("delete a saved workflow", {"200": _json(_OBJECT), **_errors(400, 403, 404)},
                      params=[_WORKFLOW_NAME])},
    "/api/import": {"post": _op("a workflow from a file: nodegraph or ComfyUI API JSON, or a SaveImage PNG", {
        "200": _json({"type": "object", "properties": {"workflow": _ref("Workflow")}}), **_errors(400, 403, 413)},
        body={"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}})},
    "/api/upload/image": {"post": _op(
        "store an image in the input folder (for LoadImage); an existing name gets ' (1)' unless overwrite", {
            "200": _json({"type": "object", "required": ["name", "subfolder", "type"], "properties": {
                "name": {"type": "string"}, "subfolder": {"type": "string"}, "type": {"const": "input"}}}),
            **_errors(400, 403, 409, 413, 507)},
        body={"multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "description": "the file (PNG, JPEG, WebP, GIF, BMP, "
                                                                              "TIFF)"},
            "subfolder": {"type": "string", "description": "a folder inside the input folder"},
            "overwrite": {"type": "string", "description": "'true' or '1' replaces a file of that name"},
            "type": {"const": "input"}}}}})},
    "/api/free": {"post": _op("unload models and clear the output cache (after the running job, if any)", {
        "200": _json({"type": "object", "properties": {"freed": {"type": "boolean"},
                                                       "deferred": {"type": "boolean"}}}), **_errors(403)})},
    "/api/system": {"get": _op("versions, models, queue and cache", {"200": _json({"type": "object", "properties": {
        "versions": _OBJECT, "models": _OBJECT, "queue": _OBJECT, "cache": _OBJECT,
        "workers": {"type": "array", "items": _OBJECT},
        "model_folders": {"type": "object", "properties": {"truncated": {
            "type": "array", "description": "models folders whose latest listing stopped at a bound",
            "items": {"type": "object", "properties": {"code": {"const": "listing_truncated"},
                                                       "folder": {"type": "string"},
                                                       "reason": {"type": "string"}}}}}}}})})},
    "/api/ws": {"get": _op("websocket of job events (JSON messages, each with a `type`)", {
        "101": {"description": "switching protocols"}, **_errors(400, 401, 403)}, params=[
        _query("client_id", "this connection's client id (made up when absent)", {"type": "string"}),
        _query("all", "1: every job's events", {"type": "string"})])},
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "nodegraph", "version": "1",
                 "description": "Queue, run and inspect node-graph workflows. Mutating requests and the websocket "
                                "refuse cross-site origins; with --token every request needs "
                                "'Authorization: Bearer TOKEN' or the cookie set by GET /?token=TOKEN."},
        "paths": {**_PATHS, **comfy.paths()},
        "components": {"schemas": _SCHEMAS, "responses": {"Errors": _json(_ref("Errors"), "an error")},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                           "cookie": {"type": "apiKey", "in": "cookie", "name": "nodegraph_token"}}},
    }
