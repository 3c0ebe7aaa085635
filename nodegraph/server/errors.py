"""JSON errors: every 4xx and 5xx answer is `{"errors": [{"code", "message", ...}]}`, never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from nodegraph import workflow as wf
from nodegraph.validate import Problem

log = logging.getLogger("nodegraph.server")

# aiohttp's own refusals (no such route, wrong method, body too large) get stable codes too.
_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 409: "conflict", 413: "body_too_large", 415: "unsupported_media_type"}


class ApiError(Exception):
    """A refusal with a status, a stable code and a message; `errors` replaces the single error."""

    def __init__(self, status: int, code: str, message: str, errors: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.status, self.code = status, code
        self.errors = list(errors) or [{"code": code, "message": message}]


def problems(status: int, found: Sequence[Problem]) -> ApiError:
    """An ApiError carrying validation problems (node_id, input, code, message each)."""
    return ApiError(status, found[0].code, found[0].message, [p.to_json() for p in found])


def error_response(status: int, errors: list[dict[str, Any]]) -> web.Response:
    return web.json_response({"errors": errors}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.errors)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects
        return error_response(exc.status, [{"code": _CODES.get(exc.status, "http_error"), "message": exc.reason}])
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(500, [{"code": "internal_error", "message": "internal server error (see the log)"}])


async def json_body(request: web.Request) -> Any:
    """The request's body as JSON, or a 400 `invalid_json` (the size limit gives 413 before this)."""
    raw = await request.read()
    try:
        return wf.parse(raw)
    except wf.WorkflowError as exc:
        raise ApiError(400, exc.code, f"the request body: {exc}") from None


async def json_object(request: web.Request) -> dict[str, Any]:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the request body must be a JSON object")
    return body
