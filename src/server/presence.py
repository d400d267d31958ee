"""The live list of workers, built from the presence messages they publish.

Workers announce themselves on the presence topic every heart-beat interval and at
every job start and end, so a worker on another host appears with no configuration.
One not heard from for two heart-beat intervals is dropped, and its running attempts
are closed as 'lost' on the song timelines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from src.messaging.schema import PresenceMessage


class WorkerRegistry:
    def __init__(self, heartbeat_ms: int, on_job_started: Callable[[str, int, float], None],
                 on_worker_gone: Callable[[str], None]):
        self.expiry_seconds = 2 * heartbeat_ms / 1000
        self._workers: dict[str, tuple[PresenceMessage, float]] = {}
        self._lock = threading.Lock()
        self._on_job_started = on_job_started
        self._on_worker_gone = on_worker_gone

    def update(self, presence: PresenceMessage) -> None:
        with self._lock:
            previous = self._workers.get(presence.worker)
            if presence.state == "leaving":
                self._workers.pop(presence.worker, None)
            else:
                self._workers[presence.worker] = (presence, time.time())
        new_job = presence.job_id is not None and (previous is None or previous[0].job_id != presence.job_id)
        if new_job and presence.state == "busy":
            self._on_job_started(presence.worker, presence.job_id, presence.sent_at)

    def expire(self) -> list[str]:
        """Drop workers not heard from in two heart-beat intervals; returns their names."""
        now = time.time()
        with self._lock:
            gone = [name for name, (_, seen) in self._workers.items() if now - seen > self.expiry_seconds]
            for name in gone:
                del self._workers[name]
        for name in gone:
            self._on_worker_gone(name)
        return gone

    def clear(self) -> None:
        with self._lock:
            self._workers.clear()

    def snapshot(self) -> list[dict]:
        now = time.time()
        with self._lock:
            entries = list(self._workers.values())
        return [
            {
                "worker": p.worker, "host": p.host, "address": p.address, "pid": p.pid, "state": p.state,
                "job_id": p.job_id, "music_id": p.music_id, "jobs_done": p.jobs_done,
                "mean_job_seconds": p.mean_job_seconds, "model": p.model,
                "last_heartbeat_age": round(now - seen, 2),
                "heartbeat_seconds": self.expiry_seconds / 2,  # the page marks a worker stale past this
            }
            for p, seen in sorted(entries, key=lambda e: e[0].worker)
        ]
