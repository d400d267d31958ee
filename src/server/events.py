"""Fan-out of live events (progress, song state, workers) to Server-Sent Events clients.

Each open page holds a server thread for as long as it listens, so the number of
listeners is capped (`SSE_MAX_CLIENTS`); one more is told to come back later (503).
Each listener has a backlog bounded in bytes: a page too slow to drain it loses the
oldest events rather than growing the server (every event carries full state, so the
next one repairs the picture). A listener hears one topic: the main page `page`, the
operations dashboard `dashboard`, so neither receives what only the other shows.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator


class TooManyListeners(RuntimeError):
    """Every SSE slot is taken."""


PAGE = "page"


class _Listener:
    def __init__(self, max_bytes: int, topic: str):
        self.topic = topic
        self.pending: deque[str] = deque()
        self.size = 0
        self.max_bytes = max_bytes
        self.ready = threading.Condition()

    def put(self, message: str) -> None:
        with self.ready:
            self.pending.append(message)
            self.size += len(message)
            while self.size > self.max_bytes and len(self.pending) > 1:
                self.size -= len(self.pending.popleft())
            self.ready.notify()

    def get(self, timeout: float) -> str | None:
        with self.ready:
            if not self.pending and not self.ready.wait(timeout):
                return None
            message = self.pending.popleft()
            self.size -= len(message)
            return message


class EventHub:
    def __init__(self, max_clients: int = 24, backlog_bytes: int = 1 << 20):
        self._clients: set[_Listener] = set()
        self._lock = threading.Lock()
        self.max_clients = max_clients
        self._backlog_bytes = backlog_bytes

    def publish(self, kind: str, data: dict, topic: str = PAGE) -> None:
        message = f"event: {kind}\ndata: {json.dumps(data)}\n\n"
        with self._lock:
            clients = [c for c in self._clients if c.topic == topic]
        for client in clients:
            client.put(message)

    def listeners(self, topic: str | None = None) -> int:
        """Pages listening (to `topic`, or to any)."""
        with self._lock:
            return sum(1 for c in self._clients if topic is None or c.topic == topic)

    def stream(self, keepalive_seconds: float = 15.0, topic: str = PAGE) -> Iterator[str]:
        """The event stream of one page; TooManyListeners (raised at once) when every slot is taken."""
        client = _Listener(self._backlog_bytes, topic)
        with self._lock:
            if len(self._clients) >= self.max_clients:
                raise TooManyListeners(f"{self.max_clients} pages are listening already (SSE_MAX_CLIENTS)")
            self._clients.add(client)
        return _Stream(self, client, keepalive_seconds)

    def _leave(self, client: _Listener) -> None:
        with self._lock:
            self._clients.discard(client)


class _Stream:
    """One page's stream. A class, not a generator, so that `close()` (which the WSGI server
    calls when the page goes away) frees the slot even if the stream never started."""

    def __init__(self, hub: EventHub, client: _Listener, keepalive_seconds: float):
        self._hub, self._client, self._keepalive = hub, client, keepalive_seconds
        self._started = False

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> str:
        if not self._started:
            self._started = True
            return "retry: 2000\n\n"
        message = self._client.get(self._keepalive)
        return message if message is not None else ": keep-alive\n\n"

    def close(self) -> None:
        self._hub._leave(self._client)
