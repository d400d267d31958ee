"""The operations dashboard: its page, its state as JSON, and its live stream (see src/server/dashboard.py)."""

from __future__ import annotations

from flask import Blueprint, jsonify, send_from_directory

from src.server.api.web import WEB_DIR, event_stream
from src.server.dashboard import TOPIC
from src.server.services import services

bp = Blueprint("dashboard", __name__)


@bp.get("/dashboard")
def page():
    return send_from_directory(WEB_DIR, "dashboard.html", max_age=0)


@bp.get("/dashboard/state")
def state():
    return jsonify(services().dashboard.state())


@bp.get("/dashboard/events")
def events():
    """The state pushed every few seconds while this page listens (one SSE slot, as the main page's)."""
    response = event_stream(TOPIC)
    s = services()
    s.events.publish(TOPIC, s.dashboard.state(), topic=TOPIC)  # the first picture at once, not a tick later
    return response
