"""What sits between the socket and the Flask app: the WSGI server and two small layers.

The server is waitress, not Werkzeug's development server. Waitress reads each request
on its event loop and buffers the body (in memory, then a temporary file) before a
thread runs the app, so a slow or stalled upload holds a connection, not a thread;
connections are bounded (`connection_limit`) and closed after `channel_timeout` seconds
of silence. The app runs on `SERVER_THREADS` threads; a live page's event stream
holds one of them for as long as it is open, which is why `SSE_MAX_CLIENTS` is kept
below it (see `events.EventHub`).

The layers, applied to `app.wsgi_app` so that the test client sees them too:
- one path, with or without a trailing slash (`/music/` is `/music`), as other
  people's clients for the course contract use both;
- `X-Forwarded-*` honoured only from `TRUSTED_PROXIES` proxies in front (Werkzeug's
  ProxyFix), so absolute links name the host the client used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flask import Flask
from waitress import create_server as waitress_server
from waitress.server import BaseWSGIServer
from werkzeug.middleware.proxy_fix import ProxyFix

from src.config import Settings

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


def one_slash_form(wsgi_app: WSGIApp) -> WSGIApp:
    """Serve `/x/` as `/x`, without a redirect (a redirected POST loses its body in some clients)."""

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if len(path) > 1 and path.endswith("/"):
            environ["PATH_INFO"] = path.rstrip("/") or "/"
        return wsgi_app(environ, start_response)

    return app


def install(app: Flask, settings: Settings) -> None:
    app.wsgi_app = one_slash_form(app.wsgi_app)
    if settings.trusted_proxies > 0:
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n, x_port=n, x_prefix=n)


def create_server(app: Flask, settings: Settings) -> BaseWSGIServer:
    """The production server for `app`, bound and ready to `run()` (and to `close()` in tests)."""
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" is our SSE cap's business
    return waitress_server(
        app,
        host=settings.server_host,
        port=settings.server_port,
        threads=settings.server_threads,
        connection_limit=200,
        channel_timeout=60,
        # The app refuses bodies above MAX_UPLOAD_MB itself, with a JSON error; waitress
        # only has to stop reading a body long before it could fill the disk.
        max_request_body_size=2 * settings.max_upload_mb * 1024 * 1024 + (1 << 20),
        ident="karaoke",
        asyncore_use_poll=True,
    )


def serve(app: Flask, settings: Settings) -> None:
    """Serve `app` in the foreground until interrupted."""
    create_server(app, settings).run()
