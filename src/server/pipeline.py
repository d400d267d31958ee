"""What the orchestrator and the collector share: settings, store, files, broker, metrics,
the kinds this server runs, and the one way a change of a task is made known.

`changed(task_id)` is how the pipeline says "this task's state moved"; the app factory
points it at the presentation (views.announce), so nothing in the pipeline calls up into
HTTP or the page.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from src.config import Settings
from src.kinds import registry
from src.kinds.base import JobView, Kind, Media, TaskView
from src.messaging.broker import Broker
from src.server.cache import ResultCache
from src.server.files import Storage
from src.server.metrics import Metrics
from src.server.store import Job, MediaRow, Store, Task

if TYPE_CHECKING:
    from src.server.dataplane import DataPlane


def media_of(row: MediaRow, path: Path) -> Media:
    probe = row.probe
    return Media(row.id, row.name, path, row.size, row.duration, probe.get("video"), probe.get("audio"),
                 probe.get("tags", {}))


@dataclass
class Pipeline:
    settings: Settings
    store: Store
    files: Storage
    broker: Broker
    metrics: Metrics
    cache: ResultCache
    changed: Callable[[int], None] = lambda task_id: None
    workers_alive: Callable[[], int] = lambda: 1  # the collector's registry, once it runs
    # live workers that take a kind's jobs of a route: worker -> software version (the registry's)
    offering: Callable[[str, str | None], dict[str, str]] = lambda kind, route: {}
    live_offers: Callable[[], list[str]] = lambda: []  # every kind/route some live worker takes
    wake_publisher: Callable[[], None] = lambda: None  # the orchestrator's, once it runs
    # the collector's: a job of this task is done (the publisher served it from the cache)
    job_done: Callable[[int], None] = lambda task_id: None
    # the collector's: how many jobs' worth of a task its workers have done in the jobs they are running
    running: Callable[[int], float] = lambda task_id: 0.0
    # the data plane (src/server/dataplane.py): where job inputs and results travel; the app factory sets it
    data: DataPlane | None = None
    _kinds: dict[str, Kind] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def kind(self, name: str) -> Kind:
        """The server half of kind `name`, imported on first use (KeyError if unknown)."""
        with self._lock:
            if name not in self._kinds:
                self._kinds[name] = registry.server(name, self.settings)
            return self._kinds[name]

    def route(self, task: Task) -> str | None:
        """The route of a task's jobs. Where the kind names several in order of preference, the one
        kept on the task (`facts["route"]`, see `pin_route`), else the first that a live worker
        serves, else the last."""
        wanted = self.kind(task.kind).route(task.params)
        if not isinstance(wanted, tuple):
            return wanted
        if "route" in task.facts:
            return task.facts["route"] or None
        return next((r for r in wanted if self.offering(task.kind, r or None)), wanted[-1]) or None

    def pin_route(self, task: Task) -> Task | None:
        """The task as its jobs may be published now, or None while they may not. A kind with
        preferences has its route chosen once a live worker serves one of them, and kept on the
        task, so that all its jobs (and the cached results it reuses) come from one route."""
        if not isinstance(self.kind(task.kind).route(task.params), tuple) or "route" in task.facts:
            return task
        route = self.route(task)
        if not self.offering(task.kind, route):
            return None
        self.store.update_facts(task.id, {"route": route or ""})
        return replace(task, facts={**task.facts, "route": route or ""})

    def versions(self, task: Task) -> set[str]:
        """The software versions a job of this task would run with: each live worker's for its
        route (any of the kind's preferred routes before one is kept), and this host's own (for the
        results cache; for a kind with preferences, only on its last route, the CPU one, which is
        what this host's version names)."""
        kind = self.kind(task.kind)
        wanted = kind.route(task.params)
        if not isinstance(wanted, tuple):
            routes, own = [wanted], True
        else:  # a kept route is stored as the kind names it ("" for the plain queue)
            routes = [task.facts["route"]] if "route" in task.facts else list(wanted)
            own = wanted[-1] in routes
        found = {v for r in routes for v in self.offering(task.kind, r or None).values()}
        return found | {kind.version(task.params)} if own else found

    def view(self, task: Task) -> TaskView:
        media = self.store.media(task.media_id)
        return TaskView(task.id, task.kind, task.params, task.facts,
                        media_of(media, self.files.original(media.id)), self.files.task_dir(task.id))

    @staticmethod
    def job_view(job: Job) -> JobView:
        return JobView(job.id, job.chunk, job.facts)
