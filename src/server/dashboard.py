"""The operations dashboard's figures, and the thread that pushes them to the pages watching.

One state answers "is the farm healthy right now": every worker (online, or offline since
it missed two heart-beats) with its recent CPU and memory, the broker's queues per kind
(QueueMonitor), and per kind over the last WINDOW_SECONDS the throughput (jobs and media
seconds per second) and latency (p50/p95 from request to done, from the store). It is
built once per TICK_SECONDS and pushed on the `dashboard` topic of the event hub, only
while a dashboard page listens, so N open dashboards cost one computation a tick, not N
polls; every push carries the whole state, so a page that missed one is repaired by the
next. The history it carries is bounded: HISTORY_POINTS per worker, BUCKETS per kind.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from src.server.events import EventHub
from src.server.presence import WorkerRegistry
from src.server.queues import QueueMonitor
from src.server.store import Store

TOPIC = "dashboard"
TICK_SECONDS = 2.0
WINDOW_SECONDS = 300.0
BUCKETS = 20  # the throughput sparkline: WINDOW_SECONDS in BUCKETS bars
QUEUE_HISTORY = 150  # queue depth samples per kind (one per queue poll: 5 s → 12.5 minutes)


def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile (the value below which `share` of them lie); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


class Dashboard:
    def __init__(self, store: Store, workers: WorkerRegistry, queues: QueueMonitor, events: EventHub,
                 kinds: list[str]):
        self.store, self.workers, self.queues, self.events, self.kinds = store, workers, queues, events, kinds
        self._depths: dict[str, deque] = {}
        self._last_poll: float | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="dashboard", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()

    def _loop(self) -> None:
        while not self._stopping.wait(TICK_SECONDS):
            self._record_depths()
            if self.events.listeners(TOPIC):
                self.events.publish(TOPIC, self.state(), topic=TOPIC)

    def _record_depths(self) -> None:
        """Keep one depth sample per kind per queue poll, watched or not, so a page opened later has history."""
        snapshot = self.queues.snapshot()
        if snapshot["updated_at"] is None or snapshot["updated_at"] == self._last_poll:
            return
        self._last_poll = snapshot["updated_at"]
        depth: dict[str, int] = {}
        for q in snapshot["queues"]:
            if q["role"] == "jobs":
                depth[q["kind"]] = depth.get(q["kind"], 0) + q["messages"]
        for kind in set(depth) | set(self._depths):
            self._depths.setdefault(kind, deque(maxlen=QUEUE_HISTORY)).append(
                (round(self._last_poll, 1), depth.get(kind, 0)))

    def state(self) -> dict:
        now = time.time()
        queues = self.queues.snapshot()
        return {
            "at": now,
            "window_seconds": WINDOW_SECONDS,
            "workers": self.workers.history(),
            "queues": {**queues, "history": {kind: [list(p) for p in points] for kind, points in self._depths.items()}},
            "kinds": self._kinds(now),
        }

    def _kinds(self, now: float) -> dict[str, dict]:
        since = now - WINDOW_SECONDS
        width = WINDOW_SECONDS / BUCKETS
        figures = {kind: {"tasks_done": 0, "tasks_failed": 0, "jobs_done": 0, "media_seconds": 0.0,
                          "latencies": [], "jobs": [0] * BUCKETS, "media": [0.0] * BUCKETS} for kind in self.kinds}
        for row in self.store.finished_since(since):
            f = figures.get(row["kind"])
            if f is None:
                continue
            if row["state"] != "done":
                f["tasks_failed"] += row["state"] == "failed"
                continue
            f["tasks_done"] += 1
            f["media_seconds"] += row["duration"] or 0.0
            bucket = min(BUCKETS - 1, int((row["finished_at"] - since) // width))
            f["media"][bucket] += row["duration"] or 0.0
            if row["started_at"] is not None:
                f["latencies"].append(row["finished_at"] - row["started_at"])
        for row in self.store.jobs_done_since(since):
            f = figures.get(row["kind"])
            if f is not None:
                f["jobs_done"] += 1
                f["jobs"][min(BUCKETS - 1, int((row["done_at"] - since) // width))] += 1
        result = {}
        for kind, f in figures.items():
            p50, p95 = percentile(f["latencies"], 0.50), percentile(f["latencies"], 0.95)
            result[kind] = {
                "tasks_done": f["tasks_done"], "tasks_failed": f["tasks_failed"], "jobs_done": f["jobs_done"],
                "jobs_per_second": round(f["jobs_done"] / WINDOW_SECONDS, 4),
                "media_seconds_per_second": round(f["media_seconds"] / WINDOW_SECONDS, 4),
                "latency_p50": round(p50, 2) if p50 is not None else None,
                "latency_p95": round(p95, 2) if p95 is not None else None,
                "bucket_seconds": width,
                "jobs_per_bucket": f["jobs"],
                "media_seconds_per_bucket": [round(m, 2) for m in f["media"]],
            }
        return result
