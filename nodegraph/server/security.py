"""Security defaults: the token, cross-site and host checks, safe file names, response headers.

- With a token, every route needs it: `Authorization: Bearer T`, or the cookie that `GET /?token=T`
  sets (HttpOnly, SameSite=Strict) so the browser editor needs nothing special.
- Mutating routes and the websocket refuse cross-site requests: an `Origin` that is not this
  server (`null` included) or `Sec-Fetch-Site` other than same-origin/none. Requests without an
  `Origin` (curl, scripts) pass: a browser always sends one on these requests.
- Without a token the server only answers to loopback host names, so a DNS-rebinding page
  (evil.example resolving to 127.0.0.1) cannot reach it through the victim's browser.
- The Host header is parsed strictly (a name or IP and a port, nothing else: no `user@`, no
  `%00`), and a request with two Host or two Origin headers is refused: proxies and checks may
  each read a different one.
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
MAX_PART_BYTES, MAX_NAME_BYTES = 255, 1024  # a file name, and a whole relative path, on common file systems
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_HOST = re.compile(r"(?P<name>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


def host_name(host: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]:port`); None when it is anything else."""
    match = _HOST.fullmatch(host)
    return match.group("name") if match else None


@web.middleware
async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    for header in (hdrs.HOST, hdrs.ORIGIN):
        if len(request.headers.getall(header, ())) > 1:
            raise ApiError(400, "duplicate_header", f"more than one {header} header")
    name = host_name(request.host)
    if name is None:
        raise ApiError(400, "bad_host", f"the Host header {request.host[:100]!r} is not a host name and port")
    if request.app[CONFIG].token is None and not is_loopback(name):
        raise ApiError(403, "bad_host", "this server answers to loopback host names only "
                                        "(start it with --token to serve other names)")
    return await handler(request)


def _same_token(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[CONFIG].token
    if token is None:
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


def content_security_policy(host: str) -> str:
    """For the editor's HTML: only this server's scripts, styles, images and websocket.

    The websocket is named explicitly: older browsers do not count ws: as 'self'. A Host header
    that is not a plain host name is left out rather than written into the policy.
    """
    websocket = f" ws://{host} wss://{host}" if _HOST.fullmatch(host) else ""
    return ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            f"connect-src 'self'{websocket}; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")


def confined(folder: Path, name: str) -> Path:
    """`folder/name` when `name` is a safe relative name whose real path stays inside `folder`.

    Refuses absolute names, `..`, empty parts, backslashes and NUL, names the file system cannot
    hold (a part over 255 bytes, lone surrogates), and symlinks that lead out. The folder itself
    may be a symlink (an outputs folder on another disk).
    """
    parts = name.split("/")
    if not name or "\0" in name or "\\" in name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ApiError(400, "bad_name", f"{name[:200]!r} is not a safe relative file name")
    try:
        sizes = [len(part.encode("utf-8")) for part in parts]
    except UnicodeEncodeError:
        raise ApiError(400, "bad_name", f"{name[:200]!r} is not valid Unicode") from None
    if max(sizes) > MAX_PART_BYTES or sum(sizes) + len(parts) > MAX_NAME_BYTES:
        raise ApiError(400, "bad_name", f"{name[:60]!r}… is too long (at most {MAX_PART_BYTES} bytes a part, "
                                        f"{MAX_NAME_BYTES} in all)")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, path]) != root:
        raise ApiError(403, "outside_folder", f"{name[:200]!r} leads outside its folder")
    return Path(path)
