"""Operator endpoints: /workers, /metrics, /health, /reset."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from src.server.api.security import operator_only

bp = Blueprint("operator", __name__)


def _services():
    return current_app.extensions["karaoke"]


@bp.get("/workers")
def workers():
    return jsonify(_services().collector.workers.snapshot())


@bp.get("/metrics")
def metrics():
    services = _services()
    counts = services.store.job_state_counts()
    busy = sum(1 for w in services.collector.workers.snapshot() if w["state"] == "busy")
    services.metrics.jobs_running.set(busy)
    services.metrics.jobs_queued.set(max(0, counts.get("queued", 0) + counts.get("pending", 0) - busy))
    services.metrics.jobs_total_done.set(counts.get("done", 0))
    return Response(generate_latest(services.metrics.registry), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/health")
def health():
    """200 while the broker is connected (503 otherwise); "degraded" with the reasons when workers are missing."""
    services = _services()
    broker_ok = services.broker.connected
    alive, configured = services.collector.workers.count(), services.settings.workers_configured
    reasons = [] if broker_ok else ["the broker is not connected"]
    if alive == 0:
        reasons.append("no worker is alive: the jobs queue has no consumer")
    elif alive < configured:
        reasons.append(f"{alive} of {configured} configured workers alive")
    body = {"status": "degraded" if reasons else "ok", "reasons": reasons, "broker": broker_ok,
            "workers": alive, "workers_configured": configured, "model": services.spec.name}
    return jsonify(body), 200 if broker_ok else 503


@bp.post("/reset")
@operator_only(lambda: _services().settings)
def reset():
    _services().orchestrator.reset()
    return jsonify({})
