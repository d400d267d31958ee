"""The server's services, built once by the app factory, and how a request reaches them."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from src.config import Settings
from src.messaging.broker import Broker
from src.server.collector import Collector
from src.server.events import EventHub
from src.server.files import Storage
from src.server.metrics import Metrics
from src.server.orchestrator import Orchestrator
from src.server.pipeline import Pipeline
from src.server.store import Store

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
    started: bool = False

    def start(self) -> None:
        """Connect to the broker and start the pipeline's threads (the factory does not)."""
        self.collector.start()  # registers subscriptions; connect() applies them
        self.broker.connect()
        self.orchestrator.start()
        self.started = True

    def close(self) -> None:
        if self.started:
            self.orchestrator.stop()
            self.collector.stop()
            self.broker.close()
        self.store.close()


def services() -> Services:
    """The services of the app handling the current request."""
    return current_app.extensions[EXTENSION]
