"""/kinds: the job kinds this deployment runs, with their parameters (what a client may ask)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from src.kinds import registry
from src.server.services import services

bp = Blueprint("kinds", __name__)


@bp.get("/kinds")
def list_kinds():
    pipeline = services().pipeline
    return jsonify([pipeline.kind(name).describe() for name in registry.names()])
