"""JSON errors: every 4xx and 5xx answer is `{"errors": [{"code", "message", ...}]}`, never a traceback.

One path for every failure: `json_errors` (the outermost middleware) turns refusals, aiohttp's
own errors and bugs into JSON answers, and `json_protocol` does the same for what aiohttp refuses
before any middleware runs (a garbled request line, a duplicate Host, a broken chunked body).
Each error answer is logged as one line: `POST /api/jobs -> 400 invalid_json: ...`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError

from nodegraph import workflow as wf
from nodegraph.server.redact import redact_target
from nodegraph.store import StorageFull, storage_full
from nodegraph.validate import Problem

log = logging.getLogger("nodegraph.server")
LARGE_BODY = 64 * 1024
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection; never seen by a client
_INTERNAL = {"code": "internal_error", "message": "internal server error (see the log)"}

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
    close = False
    crash: BaseException | None = None
    try:
        return await handler(request)
    except ApiError as exc:
        status, errors = exc.status, exc.errors
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects
        status, errors = exc.status, [{"code": _CODES.get(exc.status, "http_error"), "message": exc.reason}]
    except (RequestPayloadError, HttpProcessingError) as exc:
        # aiohttp could not read the body (bad gzip, broken chunks): the connection is out of step.
        status, errors, close = 400, [{"code": "unreadable_body", "message": _reason(exc)}], True
    except StorageFull as exc:  # the server stays up; the same request succeeds once there is space again
        status, errors = 507, [{"code": "storage_full", "message": str(exc), "folder": exc.folder}]
    except OSError as exc:  # ConnectionError included
        if isinstance(exc, ConnectionError) and _hung_up(request):
            return _client_gone(request)
        status, errors, crash = _os_error(exc)
    except Exception as exc:
        status, errors, crash = 500, [_INTERNAL], exc
    log_error(request.method, request.raw_path, status, errors[0], crash)
    response = error_response(status, errors)
    if close:
        response.force_close()
    return response


def _os_error(exc: OSError) -> tuple[int, list[dict[str, Any]], BaseException | None]:
    """A full disk somewhere unnamed (the message would show an absolute path: it is not repeated), else a bug."""
    if storage_full(exc):
        return 507, [{"code": "storage_full", "message": "no space left on the disk: free some space and retry"}], None
    return 500, [_INTERNAL], exc


def _hung_up(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _client_gone(request: web.Request) -> web.Response:
    """The client went away mid-request (mid-body, most often): one line, no traceback, nothing to answer."""
    log.info("%s %s: the client disconnected mid-request", printable(request.method),
             printable(redact_target(request.raw_path)))
    response = error_response(CLIENT_GONE, [{"code": "client_disconnected", "message": "client disconnected"}])
    response.force_close()
    return response  # aiohttp's attempt to write it fails quietly (its access log records the status)


def json_protocol(server: web.Server) -> Callable[[], web.RequestHandler]:
    """The protocol factory to listen with: aiohttp's, with its own refusals answered as JSON too.

    aiohttp answers a request it cannot parse in plain text, before routing (so no middleware
    sees it); its `handle_error` is the one hook, and only `nodegraph serve` listens through this.
    """

    def protocol() -> web.RequestHandler:
        handler = server()
        # aiohttp builds the handler from the app's settings; only its class is changed, to one
        # that differs in `handle_error` alone (no new fields: the slots stay the same).
        handler.__class__ = _JsonErrorsHandler
        return handler

    return protocol


class _JsonErrorsHandler(web.RequestHandler):
    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp does: an answer has begun, only closing is left
            raise ConnectionError("the response is partly sent; cannot send an error")
        if status >= 500:
            error = _INTERNAL
        else:
            error = {"code": _CODES.get(status, "bad_request"), "message": _reason(exc) if exc else message or ""}
        # The request line is what could not be read: there is no method or path to show.
        log_error("-", "(unparsable request)", status, error, exc if status >= 500 else None)
        response = error_response(status, [error])
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # After answering a body it could not read, aiohttp reads the rest to keep the connection,
        # meets the same error again and logs a traceback; the answer's own line says it all.
        if not isinstance(kwargs.get("exc_info"), (RequestPayloadError, HttpProcessingError)):
            super().log_exception(*args, **kwargs)


def _reason(exc: BaseException) -> str:
    """aiohttp's own message, first line ('Can not decode content-encoding: gzip'), without its status."""
    cause = exc.__cause__ if isinstance(exc, RequestPayloadError) and exc.__cause__ else exc
    text = cause.message if isinstance(cause, HttpProcessingError) else str(cause)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:300] or "unreadable request"


def log_error(method: str, path: str, status: int, error: dict[str, Any], crash: BaseException | None = None) -> None:
    """One line per error answer, like a server's error log (a 500 adds its traceback); a token in the query is
    hidden (`redact`)."""
    log.log(logging.ERROR if status >= 500 else logging.INFO, "%s %s -> %d %s: %s", printable(method),
            printable(redact_target(path)), status, error.get("code"), printable(str(error.get("message", ""))),
            exc_info=crash)


def printable(text: str, limit: int = 300) -> str:
    """Request text made safe for a log line: control characters and lone surrogates escaped, cut short."""
    text = text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m[0]):02x}", text)


async def json_body(request: web.Request) -> Any:
    """The request's body as JSON, or a 400 `invalid_json` (the size limit gives 413 before this).

    A large body is parsed and checked (`wf.parse`) in a thread, so the event loop keeps answering.
    """
    return (await _parsed(request))[0]


async def json_object(request: web.Request) -> dict[str, Any]:
    return (await json_members(request))[0]


async def json_members(request: web.Request) -> tuple[dict[str, Any], dict[str, str]]:
    """The request's body as a JSON object, and each member's value as the text it was sent as."""
    body, texts = await _parsed(request)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the request body must be a JSON object")
    return body, texts


async def _parsed(request: web.Request) -> tuple[Any, dict[str, str]]:
    raw = await request.read()
    try:
        return await asyncio.to_thread(wf.parse_members, raw) if len(raw) > LARGE_BODY else wf.parse_members(raw)
    except wf.WorkflowError as exc:
        error = {**exc.to_json(), "message": f"the request body: {exc}"}
        raise ApiError(400, exc.code, error["message"], [error]) from None


def int_query(request: web.Request, name: str, high: int, low: int = 0, default: int | None = None) -> int | None:
    """The query parameter `name` as an integer from `low` to `high` (`default` when absent), else 400 `bad_query`."""
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(400, "bad_query", f"{name!r} must be an integer from {low} to {high}")
    return value
