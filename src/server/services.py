"""The server's services, built once by the app factory, and how a request reaches them."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from src.config import Settings
from src.messaging.broker import Broker
from src.server.collector import Collector
from src.server.dashboard import Dashboard
from src.server.events import EventHub
from src.server.files import Storage
from src.server.metrics import Metrics
from src.server.orchestrator import Orchestrator
from src.server.pipeline import Pipeline
from src.server.queues import QueueMonitor
from src.server.store import Store
from src.server.watch import Watcher

EXTENSION = "media-service"


@dataclass
class Services:
    settings: Settings
    files: Storage
    store: Store
    broker: Broker
    events: EventHub
    metrics: Metrics
    pipeline: Pipeline
    orchestrator: Orchestrator
    collector: Collector
    queues: QueueMonitor
    dashboard: Dashboard
    started: bool = False
    watcher: Watcher | None = None  # built and started by start(): an app that only answers HTTP has none

    def start(self) -> None:
        """Connect to the broker and start the pipeline's threads (the factory does not)."""
        self.watcher = Watcher(self.pipeline, self.orchestrator)  # checks WATCH_TASK before connecting
        self.pipeline.data.start()  # the data endpoint: workers fetch inputs and store results there
        self.collector.start()  # registers subscriptions; connect() applies them
        self.broker.connect()
        self.collector.ask_presence()
        self.orchestrator.start()
        self.watcher.start()
        self.queues.start()
        self.dashboard.start()
        self.started = True

    def close(self) -> None:
        if self.started:
            self.watcher.stop()
            self.queues.stop()
            self.dashboard.stop()
            self.orchestrator.stop()
            self.collector.stop()
            self.broker.close()
            self.pipeline.data.stop()
        self.store.close()
        self.pipeline.cache.close()


def services() -> Services:
    """The services of the app handling the current request."""
    return current_app.extensions[EXTENSION]
