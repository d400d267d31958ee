"""/tasks: run one kind of work on one medium, follow it, fetch its outputs, cancel it."""

from __future__ import annotations

from flask import Blueprint, jsonify, request, send_file

from src.kinds.base import BadParams, NotApplicable
from src.messaging.schema import MAX_ID
from src.server.api.errors import ApiError
from src.server.api.jsonbody import read_json
from src.server.orchestrator import NotFound
from src.server.services import services
from src.server.store import Task
from src.server.views import task_view

bp = Blueprint("tasks", __name__)

MAX_BODY_BYTES = 64 * 1024


def _task_or_404(task_id: int) -> Task:
    task = services().store.task(task_id)
    if task is None:
        raise ApiError(404, f"no task with id {task_id}")
    return task


def _body() -> dict:
    body = read_json(MAX_BODY_BYTES, "the task", "a task", "the body is not JSON")
    if not isinstance(body, dict) or set(body) - {"kind", "media_id", "params"}:
        raise ApiError(400, 'the body is {"kind": str, "media_id": int, "params": {...}}')
    if not isinstance(body.get("kind"), str):
        raise ApiError(400, "kind must be the name of a kind (GET /kinds)")
    media_id = body.get("media_id")
    if not isinstance(media_id, int) or isinstance(media_id, bool) or media_id < 1:
        raise ApiError(400, "media_id must be a positive integer")
    if media_id > MAX_ID:  # SQLite's INTEGER cannot hold it (an OverflowError there), so no medium has it
        raise ApiError(404, f"no media with id {media_id}")
    if not isinstance(body.get("params", {}), dict):
        raise ApiError(400, "params must be a JSON object")
    return body


@bp.post("/tasks")
def create():
    body = _body()
    try:
        task = services().orchestrator.create_task(body["kind"], body["media_id"], body.get("params", {}))
    except KeyError as exc:
        raise ApiError(400, str(exc.args[0])) from None
    except BadParams as exc:
        raise ApiError(400, str(exc)) from None
    except NotFound as exc:
        raise ApiError(404, str(exc)) from None
    except NotApplicable as exc:
        raise ApiError(422, str(exc)) from None
    return jsonify({"task_id": task.id, "url": f"{request.url_root.rstrip('/')}/tasks/{task.id}"}), 202


@bp.get("/tasks")
def list_tasks():
    s = services()
    kind = request.args.get("kind") or None
    return jsonify([task_view(s.store, t, request.url_root, s.pipeline.running(t.id)) for t in s.store.tasks(kind)])


@bp.get("/tasks/<id:task_id>")
def one(task_id: int):
    s = services()
    return jsonify(task_view(s.store, _task_or_404(task_id), request.url_root, s.pipeline.running(task_id)))


@bp.get("/tasks/<id:task_id>/timeline")
def timeline(task_id: int):
    _task_or_404(task_id)
    return jsonify(services().store.attempts(task_id))


@bp.get("/tasks/<id:task_id>/workers")
def workers(task_id: int):
    """Per worker, what it did and does of this task (live); its address while it is alive."""
    s = services()
    _task_or_404(task_id)
    shares = s.store.shares(task_id)
    alive = {w["worker"]: w for w in s.collector.workers.snapshot()}
    for entry in shares["workers"]:
        found = alive.get(entry["worker"])
        entry.update(address=found["address"] if found else None, host=found["host"] if found else None,
                     alive=found is not None)
    return jsonify(shares)


@bp.get("/tasks/<id:task_id>/outputs/<name>")
def output(task_id: int, name: str):
    s = services()
    task = _task_or_404(task_id)
    if name not in {o.name for o in s.store.outputs(task_id)}:
        raise ApiError(404, f"task {task_id} has no output named {name[:40]!r}")
    if task.state != "done":
        raise ApiError(409, f"task {task_id} is {task.state}; its outputs are ready once it is done")
    found = s.pipeline.kind(task.kind).output(s.pipeline.view(task), name)
    return send_file(found.path, mimetype=found.mimetype, conditional=True, max_age=0,
                     download_name=f"task-{task_id}-{name}{found.path.suffix}",
                     as_attachment=request.args.get("download") == "1")


@bp.delete("/tasks/<id:task_id>")
def cancel(task_id: int):
    s = services()
    _task_or_404(task_id)
    s.orchestrator.cancel(task_id)
    return jsonify(task_view(s.store, s.store.task(task_id), request.url_root))
