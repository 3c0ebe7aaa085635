"""Security defaults: the token, cross-site and host checks, safe file names, response headers.

- With a token, every route needs it: `Authorization: Bearer T`, or the cookie that `GET /?token=T`
  sets (HttpOnly, SameSite=Strict) so the browser editor needs nothing special.
- Mutating routes and the websocket refuse cross-site requests: an `Origin` that is not this
  server (`null` included) or `Sec-Fetch-Site` other than same-origin/none. Requests without an
  `Origin` (curl, scripts) pass: a browser always sends one on these requests.
- Without a token the server only answers to loopback host names, so a DNS-rebinding page
  (evil.example resolving to 127.0.0.1) cannot reach it through the victim's browser.
- File names from requests are checked and resolved inside their folder (`confined`).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from yarl import URL

from nodegraph.server.errors import ApiError
from nodegraph.server.state import CONFIG

COOKIE = "nodegraph_token"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host: str) -> str:
    try:
        return URL(f"//{host}").host or ""
    except ValueError:
        return ""


def _same_token(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[CONFIG].token
    if token is None:
        if not is_loopback(_host_name(request.host)):
            raise ApiError(403, "bad_host", "this server answers to loopback host names only "
                                            "(start it with --token to serve other names)")
        return await handler(request)
    if request.method == "GET" and request.path == "/" and "token" in request.query:
        if not _same_token(request.query["token"], token):
            raise ApiError(401, "unauthorized", "wrong token")
        redirect = web.HTTPFound("/")
        redirect.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
        raise redirect
    scheme, _, bearer = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    given = bearer.strip() if scheme.lower() == "bearer" else request.cookies.get(COOKIE)
    if not _same_token(given, token):
        raise ApiError(401, "unauthorized", "this server needs its token: open /?token=TOKEN in the browser "
                                            "once, or send the header 'Authorization: Bearer TOKEN'")
    return await handler(request)


@web.middleware
async def refuse_cross_site(request: web.Request, handler: Handler) -> web.StreamResponse:
    websocket = request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
    if request.method in MUTATING or websocket:
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            raise ApiError(403, "cross_site", f"cross-site request refused (Sec-Fetch-Site: {site})")
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not same_origin(origin, request.host, request.scheme):
            raise ApiError(403, "cross_site", f"cross-site request refused (Origin: {origin})")
    return await handler(request)


def same_origin(origin: str, host: str, scheme: str) -> bool:
    """Whether a browser's Origin header names this server (`null` and garbage never do)."""
    try:
        theirs, ours = URL(origin), URL(f"{scheme}://{host}")
    except ValueError:
        return False
    if not theirs.is_absolute() or theirs.scheme not in ("http", "https") or theirs.path not in ("", "/"):
        return False
    # A websocket's Origin is the page's (http) while the upgrade request itself is also http, so
    # schemes compare directly; default ports are filled in by yarl.
    return (theirs.scheme, (theirs.host or "").lower(), theirs.port) == (ours.scheme, (ours.host or "").lower(),
                                                                        ours.port)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response: no MIME sniffing, no framing, no referrer leaks."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")


_HOST_SOURCE = re.compile(r"[A-Za-z0-9.\-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?")


def content_security_policy(host: str) -> str:
    """For the editor's HTML: only this server's scripts, styles, images and websocket.

    The websocket is named explicitly: older browsers do not count ws: as 'self'. A Host header
    that is not a plain host name is left out rather than written into the policy.
    """
    websocket = f" ws://{host} wss://{host}" if _HOST_SOURCE.fullmatch(host) else ""
    return ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            f"connect-src 'self'{websocket}; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")


def confined(folder: Path, name: str) -> Path:
    """`folder/name` when `name` is a safe relative name whose real path stays inside `folder`.

    Refuses absolute names, `..`, empty parts, backslashes and NUL, and symlinks that lead out.
    The folder itself may be a symlink (an outputs folder on another disk).
    """
    parts = name.split("/")
    if not name or "\0" in name or "\\" in name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ApiError(400, "bad_name", f"{name[:200]!r} is not a safe relative file name")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, path]) != root:
        raise ApiError(403, "outside_folder", f"{name[:200]!r} leads outside its folder")
    return Path(path)
