"""The HTTP edge's rules about who may ask what: origins, hosts, the operator, headers.

- **CORS** (flask-cors): pages on the origins in `CORS_ORIGINS` may call the API. By
  default that is any loopback origin on any port, so a page someone serves from
  another local port works; a deployment adds its own.
- **No cross-site state change.** A browser lets any page send a "simple" POST (a form,
  `text/plain`, multipart) to any site without asking, and CORS only hides the answer,
  it does not stop the request. So every state-changing request that a browser marks
  as coming from another origin (`Origin`, or `Sec-Fetch-Site: cross-site` where no
  `Origin` is sent) is refused unless that origin is allowed. Scripts and command-line
  clients send neither header and are not affected.
- **Host allow-list** (Flask's `TRUSTED_HOSTS`): loopback names always, plus
  `ALLOWED_HOSTS` and the address the server listens on. A loopback server that
  answered any `Host` could be reached from a web page through DNS rebinding.
- **The operator**: `/reset` deletes everything. Beyond loopback it needs
  `Authorization: Bearer $OPERATOR_TOKEN`, and is disabled when no token is set.
- **Security headers** on every answer: a CSP that fits the page (its own scripts,
  styles and media only), `nosniff`, no framing, no referrer.
"""

from __future__ import annotations

import hmac
import re
import socket
from collections.abc import Callable
from functools import wraps

from flask import Flask, Response, request
from flask_cors import CORS

from src.config import Settings
from src.server.api.errors import ApiError

LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1", "[::1]"]
LOOPBACK_ORIGIN = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]+)?$")
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "media-src 'self' blob:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def trusted_hosts(settings: Settings) -> list[str]:
    hosts = [*LOOPBACK_HOSTS, *_split(settings.allowed_hosts)]
    if settings.server_host not in ("0.0.0.0", "::", ""):
        hosts.append(settings.server_host)
    if settings.listens_beyond_loopback:
        hosts += [socket.gethostname(), socket.getfqdn()]
    return hosts


def allowed_origins(settings: Settings) -> list[str | re.Pattern]:
    return [LOOPBACK_ORIGIN, *_split(settings.cors_origins)]


def _origin_allowed(origin: str, allowed: list[str | re.Pattern]) -> bool:
    own = f"{request.scheme}://{request.host}"
    if origin == own:
        return True
    return any(o.fullmatch(origin) if isinstance(o, re.Pattern) else o == origin for o in allowed)


def install(app: Flask, settings: Settings) -> None:
    """Wire CORS, the host allow-list, the cross-site check and the headers into `app`."""
    origins = allowed_origins(settings)
    app.config["TRUSTED_HOSTS"] = trusted_hosts(settings)
    CORS(app, origins=origins, expose_headers=["Content-Disposition"], max_age=600)

    @app.before_request
    def refuse_cross_site_changes() -> None:
        if request.method not in STATE_CHANGING:
            return
        origin = request.headers.get("Origin")
        if origin is not None:
            if not _origin_allowed(origin, origins):
                raise ApiError(403, f"requests from the page at {origin[:100]!r} may not change anything here "
                                    "(add its origin to CORS_ORIGINS to allow it)")
        elif request.headers.get("Sec-Fetch-Site") == "cross-site":
            raise ApiError(403, "cross-site requests may not change anything here")

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response


def operator_only(settings_of: Callable[[], Settings]):
    """Decorator for operator actions: a bearer token beyond loopback (or whenever one is set)."""

    def decorate(view):
        @wraps(view)
        def guarded(*args, **kwargs):
            settings = settings_of()
            token = settings.operator_token
            if token:
                given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(given.encode(), token.encode()):
                    raise ApiError(403, "this operator action needs 'Authorization: Bearer <OPERATOR_TOKEN>'")
            elif settings.listens_beyond_loopback:
                raise ApiError(403, "operator actions are disabled: the server listens beyond loopback and "
                                    "no OPERATOR_TOKEN is set")
            return view(*args, **kwargs)

        return guarded

    return decorate

