"""The web page (static files from web/) and its live event stream."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

from src.server.api.errors import ApiError
from src.server.events import PAGE, TooManyListeners
from src.server.services import services

WEB_DIR = Path(__file__).resolve().parents[3] / "web"

bp = Blueprint("web", __name__)


@bp.get("/")
def index():
    return send_from_directory(WEB_DIR, "index.html", max_age=0)


@bp.get("/favicon.ico")
def favicon():
    """Browsers ask for it on every page that names no icon (the API docs, a raw JSON answer)."""
    return send_from_directory(WEB_DIR, "favicon.svg", max_age=86400, mimetype="image/svg+xml")


@bp.get("/web/<path:name>")
def asset(name: str):
    return send_from_directory(WEB_DIR, name, max_age=0)


def event_stream(topic: str = PAGE) -> Response:
    """One page's Server-Sent Events on `topic` (503 when every slot is taken)."""
    try:
        stream = services().events.stream(topic=topic)
    except TooManyListeners as exc:
        raise ApiError(503, f"{exc}; try again later") from None
    return Response(stream, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@bp.get("/events")
def events():
    return event_stream()
