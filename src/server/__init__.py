"""The server: HTTP API and web page, orchestration of jobs, collection of results.

`create_app` is the app factory. It reads nothing itself: it is handed `Settings`
(or loads them once), builds the services below and wires them into a Flask app with
one blueprint per resource. It starts nothing: `services.start()` connects to the broker
and starts the pipeline (`python -m src.server` and the tests that need it do), so an
app that only answers HTTP needs no broker.

    HTTP (api/) → Orchestrator → broker → workers → broker → Collector → kind's check and merge → storage

Job kinds plug in below the pipeline (src/kinds): the server knows them only by name.
"""

from __future__ import annotations

import os
import socket

from flask import Flask

from src import config
from src.config import Settings
from src.kinds import registry
from src.messaging.broker import Broker
from src.server import quota, views
from src.server.cache import ResultCache, Verification
from src.server.collector import Collector
from src.server.dashboard import Dashboard
from src.server.dataplane import DataPlane
from src.server.events import EventHub
from src.server.files import Storage
from src.server.metrics import Metrics
from src.server.orchestrator import Orchestrator
from src.server.pipeline import Pipeline
from src.server.queues import QueueMonitor
from src.server.services import EXTENSION, Services
from src.server.store import Store


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or config.load()
    files = Storage(settings.storage_dir)
    quota.refuse_links(settings.storage_dir, skip=[settings.watch_dir])  # users drop links there; never followed
    store = Store(files.database)
    broker = Broker(settings, client_name=f"server-{socket.gethostname()}-{os.getpid()}")
    events, metrics = EventHub(settings.sse_max_clients), Metrics()
    results_cache = ResultCache(files.cache, settings.cache_mb, Verification.of(settings))
    pipeline = Pipeline(settings, store, files, broker, metrics, results_cache)
    pipeline.changed = lambda task_id: views.announce(events, pipeline, task_id)
    pipeline.data = DataPlane(settings, store, pipeline.kind)  # job inputs and results travel there, not on the broker
    collector = Collector(pipeline, on_workers=lambda workers: events.publish("workers", {"workers": workers}))
    pipeline.workers_alive = collector.workers.count  # job deadlines share the work out
    pipeline.offering = collector.workers.offering  # jobs need a worker that serves their route
    pipeline.live_offers = collector.workers.offers
    queues = QueueMonitor(settings)
    services = Services(settings, files, store, broker, events, metrics, pipeline, Orchestrator(pipeline), collector,
                        queues, Dashboard(store, collector.workers, queues, events, registry.names()))

    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_mb * 1024 * 1024
    app.extensions[EXTENSION] = services

    from src.server import wsgi
    from src.server.api import (
        converters,
        dashboard,
        docs,
        errors,
        jobs,
        kinds,
        media,
        music,
        operator,
        security,
        tasks,
        web,
    )

    wsgi.install(app, settings)
    security.install(app, settings)
    errors.register(app)
    converters.register(app)
    for blueprint in (music.bp, jobs.bp, media.bp, tasks.bp, kinds.bp, operator.bp, dashboard.bp, web.bp, docs.bp):
        app.register_blueprint(blueprint)
    return app

