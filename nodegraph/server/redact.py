"""What a log line never holds: the server's token, in a query string (`?token=T`) or a header.

Every place that logs a request goes through here: the error lines (`errors.log_error` redacts the
target it prints) and aiohttp's access log, whose `%r`, `%{Authorization}i`, `%{Cookie}i` and
`%{Set-Cookie}o` atoms see a redacted request and response (`AccessLog`, installed on the app by
`create_app`, so every runner uses it, `nodegraph serve`'s and the tests' alike).
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import unquote_plus

from aiohttp import web
from aiohttp.web_log import AccessLogger
from multidict import CIMultiDict, CIMultiDictProxy

HIDDEN = "[redacted]"
SECRET_QUERY = "token"
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})


def redact_target(target: str) -> str:
    """A request target (path and query) with the value of every `token` query parameter hidden.

    The name is compared decoded and case-blind (`%74oken=`, `TOKEN=`): what a lenient reader would take.
    """
    path, mark, query = target.partition("?")
    if not mark:
        return target
    parts = []
    for part in query.split("&"):
        name, equals, _ = part.partition("=")
        hidden = unquote_plus(name).strip().lower() == SECRET_QUERY
        parts.append(f"{name}={HIDDEN}" if hidden and equals else part)
    return f"{path}?{'&'.join(parts)}"


def redact_headers(headers: Any) -> CIMultiDictProxy[str]:
    """Headers with the credentials' values (Authorization, Cookie, Set-Cookie) hidden."""
    copy: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        copy.add(name, HIDDEN if name.lower() in SECRET_HEADERS else value)
    return CIMultiDictProxy(copy)


class _Redacted:
    """A request or response as the access log reads it, its secrets hidden; the rest is the real one's."""

    def __init__(self, real: Any, request: bool) -> None:
        self._real = real
        self.headers = redact_headers(real.headers)
        if request:
            self.path_qs = redact_target(real.path_qs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class AccessLog(AccessLogger):
    """aiohttp's access log, in its own format, with the token hidden from every atom."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        super().log(cast(web.BaseRequest, _Redacted(request, True) if request is not None else None),
                    cast(web.StreamResponse, _Redacted(response, False)), time)
