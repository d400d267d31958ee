"""The server: HTTP API and web page, orchestration of jobs, collection of results.

`create_app` is the app factory. It reads nothing itself: it is handed `Settings`
(or loads them once), builds the services below, and wires them into a Flask app with
one blueprint per resource.

    HTTP (api/) → Orchestrator → broker → workers → broker → Collector → merge → storage
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from flask import Flask

from src import config
from src.config import Settings
from src.messaging.broker import Broker
from src.separation.model import ModelSpec, load_spec
from src.server.collector import Collector
from src.server.events import EventHub
from src.server.files import SongFiles
from src.server.metrics import Metrics
from src.server.orchestrator import Orchestrator
from src.server.store import Store

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s"


@dataclass
class Services:
    settings: Settings
    files: SongFiles
    store: Store
    spec: ModelSpec
    broker: Broker
    events: EventHub
    metrics: Metrics
    orchestrator: Orchestrator
    collector: Collector

    def close(self) -> None:
        self.orchestrator.stop()
        self.collector.stop()
        self.broker.close()
        self.store.close()


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or config.load()
    files = SongFiles(settings.storage_dir)
    store = Store(files.database)
    spec = load_spec(settings.model, settings.model_repo, settings.model_segment or None)
    broker = Broker(settings, client_name=f"server-{socket.gethostname()}-{os.getpid()}")
    events, metrics = EventHub(settings.sse_max_clients), Metrics()
    services = Services(
        settings, files, store, spec, broker, events, metrics,
        Orchestrator(settings, store, files, spec, broker, events, metrics),
        Collector(settings, store, files, spec, broker, events, metrics),
    )
    services.orchestrator.workers_alive = services.collector.workers.count  # job deadlines share the work out
    services.collector.start()  # registers subscriptions; connect() applies them
    broker.connect()
    services.orchestrator.start()

    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_mb * 1024 * 1024
    app.extensions["karaoke"] = services

    from src.server import wsgi
    from src.server.api import converters, docs, errors, jobs, music, operator, security, web

    wsgi.install(app, settings)
    security.install(app, settings)
    errors.register(app)
    converters.register(app)
    for blueprint in (music.bp, jobs.bp, operator.bp, web.bp, docs.bp):
        app.register_blueprint(blueprint)
    return app


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("stomp").setLevel(logging.WARNING)
