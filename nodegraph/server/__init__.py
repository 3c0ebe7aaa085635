"""The HTTP/websocket server behind `nodegraph serve`: the API, the editor's files, the job worker.

    nodegraph serve --port 8188            # then open http://127.0.0.1:8188/

One module per concern: `state` (configuration and typed app keys), `security` (token, cross-site
and host checks, safe names), `errors` (JSON errors), `worker` (the thread that runs jobs off the
event loop), `hub` (websocket fan-out), one module per group of routes, `openapi` (the API
document) and `app` (wiring and the serve loop).
"""
