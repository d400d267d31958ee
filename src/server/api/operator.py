"""Operator endpoints: /workers, /metrics, /health, /reset."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from src.server.api.security import operator_only
from src.server.presence import MAX_NAMES_PER_LOGIN
from src.server.services import services

bp = Blueprint("operator", __name__)


@bp.get("/workers")
def workers():
    return jsonify(services().collector.workers.snapshot())


@bp.get("/metrics")
def metrics():
    """Prometheus text: the pipeline's counters, and per worker (offline ones included, with up 0)
    and per queue the figures of this moment (see src/server/metrics.py for the labels)."""
    s = services()
    counts = s.store.job_state_counts()
    workers = s.collector.workers.snapshot(offline=True)
    busy = sum(1 for w in workers if w["online"] and w["state"] == "busy")
    s.metrics.jobs_running.set(busy)
    s.metrics.jobs_queued.set(max(0, counts.get("queued", 0) + counts.get("pending", 0) - busy))
    s.metrics.jobs_total_done.set(counts.get("done", 0))
    return Response(s.metrics.exposition(workers, s.queues.snapshot()), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/health")
def health():
    """200 while the broker is connected (503 otherwise); "degraded" with the reasons when workers are missing."""
    s = services()
    broker_ok = s.broker.connected
    alive, configured = s.collector.workers.count(), s.settings.workers_configured
    reasons = [] if broker_ok else ["the broker is not connected"]
    if alive == 0:
        reasons.append("no worker is alive: the jobs queue has no consumer")
    elif alive < configured:
        reasons.append(f"{alive} of {configured} configured workers alive")
    turned_away = s.collector.workers.full()
    if turned_away:
        reasons.append(f"the worker registry is full: new workers of broker login(s) {', '.join(turned_away[:10])} "
                       f"found no room (each login holds at most {MAX_NAMES_PER_LOGIN})")
    body = {"status": "degraded" if reasons else "ok", "reasons": reasons, "broker": broker_ok,
            "workers": alive, "workers_configured": configured, "model": s.settings.model,
            "broker_node": s.broker.node, "registry_full": turned_away}
    return jsonify(body), 200 if broker_ok else 503


@bp.post("/reset")
@operator_only(lambda: services().settings)
def reset():
    s = services()
    s.orchestrator.reset()
    s.events.publish("reset", {})
    return jsonify({})
