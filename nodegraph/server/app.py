"""Wiring: the aiohttp application, its lifecycle, and the serve loop behind `nodegraph serve`.

    nodegraph serve --port 0 --data-dir /tmp/ng      # prints: nodegraph: serving on http://127.0.0.1:PORT

The app owns one executor (its cache and models persist across jobs), one store (SQLite in the
data folder) and one worker thread. On startup, jobs cut off by a previous crash are marked
(`Store.recover`) and pending ones run in order; on shutdown the running job is interrupted and
recorded as such, and websockets are closed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import replace

from aiohttp import web

from nodegraph.executor import Executor
from nodegraph.server import api_files, api_info, api_jobs, api_uploads, comfy, static, ws
from nodegraph.server.comfy import front
from nodegraph.server.errors import json_errors, json_protocol
from nodegraph.server.hub import Hub
from nodegraph.server.redact import AccessLog
from nodegraph.server.security import check_host, refuse_cross_site, require_token, security_headers
from nodegraph.server.state import CONFIG, EXECUTOR, HUB, STORE, WORKER, Runner, ServerConfig
from nodegraph.server.worker import Publish, Worker
from nodegraph.store import StorageFull, Store

READY = "nodegraph: serving on {url}"
log = logging.getLogger("nodegraph.server")


RunnerFactory = Callable[[Store, Publish], Runner]  # what runs jobs instead of the one-process Worker


def create_app(executor: Executor, config: ServerConfig, runner: RunnerFactory | None = None,
               warm_up: Callable[[], None] | None = None) -> web.Application:
    # json_errors is outermost so the host, token and cross-site refusals are JSON errors as well.
    app = web.Application(middlewares=[json_errors, check_host, require_token, refuse_cross_site],
                          client_max_size=config.max_body,
                          handler_args={"access_log_class": AccessLog})  # if an access log is kept: no token
    store = Store(config.data_dir)
    hub = Hub()
    app[CONFIG], app[EXECUTOR], app[STORE], app[HUB] = config, executor, store, hub
    publish = hub.publish_threadsafe
    app[WORKER] = runner(store, publish) if runner else Worker(store, executor, publish, warm_up)
    comfy_front = config.front_end == "comfyui"
    if comfy_front and config.front_end_dir is None:
        config = replace(config, front_end_dir=front.static_dir())  # FrontEndMissing names the install command
        app[CONFIG] = config
    taken = comfy.taken_over() if comfy_front else frozenset()
    for group in (api_jobs.routes, api_info.routes, api_files.routes, api_uploads.routes, ws.routes,
                  () if comfy_front else static.routes):
        for route in group:
            if isinstance(route, web.RouteDef) and (route.method, comfy.pattern(route.path)) not in taken:
                app.router.add_route(route.method, route.path, route.handler)
    # ComfyUI's API, beside ours (after ours: where a path is ours, it stays ours, unless its frontend is served)
    comfy.add_routes(app, comfy_front)
    if comfy_front:
        front.add_routes(app)
    app.on_response_prepare.append(security_headers)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_websockets)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    app[HUB].bind(asyncio.get_running_loop())
    try:
        app[STORE].recover()
    except StorageFull as exc:  # serve anyway: the cut-off job is marked at the next start with room to write
        log.error("%s (a job cut off by the last shutdown stays 'running' until then)", exc)
    app[WORKER].start()
    yield
    await asyncio.to_thread(app[WORKER].stop)
    app[STORE].close()


async def _close_websockets(app: web.Application) -> None:
    await app[HUB].close_all()


def serve(executor: Executor, config: ServerConfig, host: str, port: int, runner: RunnerFactory | None = None,
          warm_up: Callable[[], None] | None = None) -> int:
    """Serve until SIGINT or SIGTERM; prints the ready line (with the real port) to stdout. `warm_up` runs on
    the worker thread before its first job (see Worker).

    stderr gets a line per error answer and per job (queued, started, finished), with the time.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("nodegraph.server").setLevel(logging.INFO)
    asyncio.run(_serve(create_app(executor, config, runner, warm_up), host, port))
    return 0


async def _serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)  # stdout carries only the ready line
    await runner.setup()
    settle()
    listening = None
    try:
        sock = bind(host, port)
        listening = await listen(runner, sock)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if sock.family == socket.AF_INET6 else bound_host
        print(READY.format(url=f"http://{shown}:{bound_port}"), flush=True)
        app[WORKER].wake()  # listening: the worker may warm up now
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with suppress(NotImplementedError):  # no signal handlers on Windows' loop
                loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        # From here a second Ctrl-C stops at once (KeyboardInterrupt), as in `nodegraph run`.
        with suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGINT)
    finally:
        if listening is not None:
            listening.close()
        await runner.cleanup()


def settle() -> None:
    """Freeze what is alive once the server is set up (imported modules, the registry, the app): it lives as
    long as the process, and frozen, the collector's full passes no longer walk it — one set off by a large
    request takes milliseconds, not the ≈0.1 s a walk over every object of torch and diffusers takes."""
    gc.collect()
    gc.freeze()


async def listen(runner: web.AppRunner, sock: socket.socket) -> asyncio.Server:
    """Serve the set-up runner's app on `sock`, aiohttp's own refusals answered as JSON (`json_protocol`)."""
    assert runner.server is not None, "runner.setup() first"
    return await asyncio.get_running_loop().create_server(json_protocol(runner.server), sock=sock)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0 picks a free port), IPv4 or IPv6 as the host says."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock
