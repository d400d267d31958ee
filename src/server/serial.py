"""The server's own work on each task, by phase: the serial part of a farm (issue 22).

Whatever the number of workers, one server prepares a task (probe, plan its pieces), plans
its jobs, builds each job's message (`payload`: its piece read or cut), checks and keeps each
result (`check`) and merges the results (`merge`). Each of these calls is measured with
`guard.accounted()`: the CPU of the thread that runs it (time.thread_time), plus the CPU of
the ffmpeg/ffprobe children it ran (reaped with wait4, see src/media/guard.py), and its wall
time.

Per task the figures add up in memory until the merge writes them into the task's stats
(`stats["serial"]`), beside the workers' CPU seconds (the jobs' own figures): `share` is the
server's CPU over the server's and the workers' together, the serial share of Amdahl's law
for this task. Per kind and phase they go to /metrics as
`karaoke_server_cpu_seconds_total{kind,phase}` and `karaoke_server_wall_seconds_total`.

Not counted: HTTP serving, the broker client's threads, the presence registry, and the
store's writes outside these calls. A server restarted in the middle of a task knows only the
phases it ran itself; such a task's figures say `partial`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter

from src.media import guard

PHASES = ("prepare", "plan", "payload", "check", "merge")
MAX_TASKS = 10_000  # tasks followed at once; the oldest is forgotten past it (a leak bound, never reached)


class SerialWork:
    """Per task and phase: CPU seconds (thread + children), children's CPU, wall seconds, calls."""

    def __init__(self, cpu: Counter, wall: Counter):
        self._cpu, self._wall = cpu, wall
        self._tasks: OrderedDict[int, dict[str, dict[str, float]]] = OrderedDict()
        self._lock = threading.Lock()

    @contextmanager
    def phase(self, task_id: int, kind: str, phase: str) -> Iterator[guard.Work]:
        """Measure the block as `phase` of the task; counted whether it ends well or raises."""
        work = guard.Work()
        try:
            with guard.accounted() as work:
                yield work
        finally:
            self._add(task_id, kind, phase, work)

    def _add(self, task_id: int, kind: str, phase: str, work: guard.Work) -> None:
        with self._lock:
            phases = self._tasks.setdefault(task_id, {})
            self._tasks.move_to_end(task_id)
            while len(self._tasks) > MAX_TASKS:
                self._tasks.popitem(last=False)
            row = phases.setdefault(phase, {"cpu_seconds": 0.0, "children_cpu_seconds": 0.0, "wall_seconds": 0.0,
                                            "calls": 0})
            row["cpu_seconds"] += work.cpu_seconds
            row["children_cpu_seconds"] += work.children_cpu_seconds
            row["wall_seconds"] += work.wall_seconds
            row["calls"] += 1
        self._cpu.labels(kind, phase).inc(work.cpu_seconds)
        self._wall.labels(kind, phase).inc(work.wall_seconds)

    def stats(self, task_id: int, workers_cpu_seconds: float) -> dict:
        """The task's figures so far, for its stats: per phase, the server's totals, the workers'
        CPU seconds, and the share of the server in all of them."""
        with self._lock:
            phases = {name: dict(row) for name, row in self._tasks.get(task_id, {}).items()}
        cpu = sum(row["cpu_seconds"] for row in phases.values())
        wall = sum(row["wall_seconds"] for row in phases.values())
        total = cpu + workers_cpu_seconds
        shown = {name: {key: (round(value, 4) if isinstance(value, float) else value) for key, value in row.items()}
                 for name, row in sorted(phases.items(), key=lambda item: PHASES.index(item[0])
                                         if item[0] in PHASES else len(PHASES))}
        return {"phases": shown, "server_cpu_seconds": round(cpu, 4), "server_wall_seconds": round(wall, 4),
                "workers_cpu_seconds": round(workers_cpu_seconds, 4),
                "share": round(cpu / total, 5) if total > 0 else None,
                # prepared by a server before a restart: its prepare is not in these figures
                "partial": "prepare" not in phases}

    def forget(self, task_id: int) -> None:
        with self._lock:
            self._tasks.pop(task_id, None)
