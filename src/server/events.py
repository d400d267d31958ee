"""Fan-out of live events (progress, song state, workers) to Server-Sent Events clients.

Each connected page gets a bounded queue; a page too slow to drain it loses the
oldest events rather than slowing the server (every event carries full state, so the
next one repairs the picture).
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator


class EventHub:
    def __init__(self, backlog: int = 256):
        self._clients: set[queue.Queue] = set()
        self._lock = threading.Lock()
        self._backlog = backlog

    def publish(self, kind: str, data: dict) -> None:
        message = f"event: {kind}\ndata: {json.dumps(data)}\n\n"
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            try:
                client.put_nowait(message)
            except queue.Full:
                try:
                    client.get_nowait()
                    client.put_nowait(message)
                except (queue.Empty, queue.Full):
                    pass

    def stream(self, keepalive_seconds: float = 15.0) -> Iterator[str]:
        client: queue.Queue = queue.Queue(self._backlog)
        with self._lock:
            self._clients.add(client)
        try:
            yield "retry: 2000\n\n"
            while True:
                try:
                    yield client.get(timeout=keepalive_seconds)
                except queue.Empty:
                    yield ": keep-alive\n\n"
        finally:
            with self._lock:
                self._clients.discard(client)
