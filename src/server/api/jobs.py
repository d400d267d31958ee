"""/job: the jobs (one chunk of one task each, of any kind) and what they cost."""

from __future__ import annotations

from flask import Blueprint, jsonify

from src.server.api.errors import ApiError
from src.server.services import services
from src.server.views import job_view

bp = Blueprint("jobs", __name__)


@bp.get("/job")
def list_jobs():
    return jsonify(services().store.job_ids())


@bp.get("/job/<id:job_id>")
def job(job_id: int):
    store = services().store
    found = store.job(job_id)
    if found is None:
        raise ApiError(404, f"no job with id {job_id}")
    return jsonify(job_view(store, found))
