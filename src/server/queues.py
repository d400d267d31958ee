"""Queue depths, rates and consumers, read from RabbitMQ itself (the management HTTP API).

The server knows what it published and what came back, but only the broker knows how
many messages wait in each queue, how many are out with a consumer, and who consumes:
the figures an operator needs to see a backlog forming. `QueueMonitor` polls
`GET /api/queues/{vhost}` every few seconds on a thread of its own (so a slow or absent
broker never delays a request), keeps the deployment's queues (its QUEUE_PREFIX), and
answers the last snapshot. It logs in with the server's broker login, which `make broker`
tags `management` (the API of the virtual hosts it may use, nothing more); the login never
leaves the server: the dashboard gets the figures, not the credentials. With several
URLs (a cluster's nodes) it tries them in order and stays on the first that answers. A URL
may carry its own login (`http://user:password@host:15672`); it is taken out of the URL before
use, so what the dashboard shows (the source, an error) never holds a password.
"""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from src.config import Settings

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0
TIMEOUT_SECONDS = 3.0
COLUMNS = ",".join((
    "name", "messages", "messages_ready", "messages_unacknowledged", "consumers", "type", "members",
    "message_stats.publish_details.rate", "message_stats.deliver_get_details.rate",
    "message_stats.ack_details.rate", "message_stats.redeliver_details.rate",
))


def without_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """The URL with any user and password taken out, and that login (None when it had none)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), (parts.username or "", parts.password or "")


def _rate(stats: dict, name: str) -> float:
    return round(float((stats.get(f"{name}_details") or {}).get("rate", 0.0)), 3)


class QueueMonitor:
    def __init__(self, settings: Settings):
        # [(shown url, login)]: a URL's own login, else the server's broker login
        self.urls = [(shown, own or settings.server_login)
                     for shown, own in map(without_credentials, settings.management_urls)]
        self.prefix = settings.queue_prefix
        self.vhost = settings.broker_vhost  # the deployment's own: its login sees no other (make broker)
        self._session = requests.Session()
        self._snapshot: dict = {"source": None, "error": "not read yet", "updated_at": None, "queues": []}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="queue-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def snapshot(self) -> dict:
        """{"source": url or None, "error": why there are no figures or None, "updated_at", "queues": [...]}."""
        with self._lock:
            return dict(self._snapshot)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self.poll()
            self._stopping.wait(POLL_SECONDS)

    def poll(self) -> dict:
        """Read the queues once (from the first URL that answers) and keep the result."""
        errors = []
        for entry in list(self.urls):
            url, login = entry
            try:
                response = self._session.get(f"{url}/api/queues/{quote(self.vhost, safe='')}", auth=login,
                                             params={"columns": COLUMNS}, timeout=TIMEOUT_SECONDS)
                if response.status_code == 401:
                    raise RuntimeError("the broker refused the server's login (401): it needs the 'management' "
                                       "tag, which `make broker` gives it")
                response.raise_for_status()
                # not the connections' own subscription queues ({p}.sub.{login}.*): transient, and named after logins
                queues = [self._queue(q) for q in response.json() if q.get("name", "").startswith(f"{self.prefix}.")
                          and not q["name"].startswith(f"{self.prefix}.sub.")]
            except (requests.RequestException, RuntimeError, ValueError) as exc:
                errors.append(f"{url}: {exc}")
                continue
            if entry != self.urls[0]:  # stay on the node that answers
                self.urls.remove(entry)
                self.urls.insert(0, entry)
            snapshot = {"source": url, "error": None, "updated_at": time.time(),
                        "queues": sorted(queues, key=lambda q: q["name"])}
            break
        else:
            snapshot = {**self.snapshot(), "error": "; ".join(errors)[:500]}
            log.debug("management API unreadable: %s", snapshot["error"])
        with self._lock:
            self._snapshot = snapshot
        return snapshot

    def _queue(self, raw: dict) -> dict:
        name = raw["name"]
        role, kind, route = self._role(name)
        stats = raw.get("message_stats") or {}
        return {
            "name": name, "role": role, "kind": kind, "route": route,
            "messages": int(raw.get("messages") or 0),
            "ready": int(raw.get("messages_ready") or 0),
            "unacked": int(raw.get("messages_unacknowledged") or 0),
            "consumers": int(raw.get("consumers") or 0),
            "type": raw.get("type"),
            "members": len(raw.get("members") or []) or None,  # quorum queues: the nodes holding a replica
            "publish_rate": _rate(stats, "publish"),
            "deliver_rate": _rate(stats, "deliver_get"),
            "ack_rate": _rate(stats, "ack"),
            "redeliver_rate": _rate(stats, "redeliver"),
        }

    def _role(self, name: str) -> tuple[str, str | None, str | None]:
        """'jobs' with its kind and route, 'results', 'dead', or 'other'."""
        rest = name[len(self.prefix) + 1:]
        if rest.startswith("jobs."):
            kind, _, route = rest[len("jobs."):].partition(".")
            return "jobs", kind, route or None
        return (rest if rest in ("results", "dead") else "other"), None, None
