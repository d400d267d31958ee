"""Prometheus metrics of one server, in its own registry (so tests can build many apps).

Three sorts of figures, all with bounded label sets:

- counters and histograms the pipeline updates as things happen: jobs published, done,
  failed; and per kind (a name from the kinds registry, a handful) the tasks that ended
  (`karaoke_tasks_finished{kind,state}`), their latency from request to done
  (`karaoke_task_seconds{kind}`) and the media seconds they carried
  (`karaoke_media_seconds_done{kind}`). Every kind × state series exists from the start
  at 0, so `increase()` sees the first failure of a kind too;
- per worker (`karaoke_worker_*{worker,host}`), built at each scrape from the presence
  registry's snapshot: up (1 online, 0 offline), CPU, memory, load, results per kind. The
  registry holds at most MAX_WORKERS live workers and as many offline ones (for
  OFFLINE_SECONDS), so `worker` is bounded; a worker gone from the snapshot is gone from
  the next scrape;
- per queue (`karaoke_queue_*{role,kind,route}`), from the broker's management API
  snapshot: messages, ready, unacked, consumers and the broker's rates. Only the
  deployment's own queues with a known kind and route get a series of their own; any
  other queue under the prefix is summed into `role="other"`.
- per kind and phase, the server's own CPU and wall seconds (`karaoke_server_cpu_seconds_total`,
  `karaoke_server_wall_seconds_total{kind,phase}`): the serial part of the farm (serial.py).

The per-worker and per-queue families come from `FarmCollector`, which the /metrics route
hands the two snapshots before rendering: one scrape is one consistent snapshot, and two
scrapes at once never see each other's half-written gauges.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from src.kinds import registry as kinds
from src.server.serial import PHASES, SerialWork

if TYPE_CHECKING:
    from src.server.store import Store

TASK_STATES = ("done", "failed", "cancelled")  # how a task ends
QUEUE_ROLES = ("jobs", "results", "dead")  # queues that get series of their own (others: "other")
WORKER_LABELS = ("worker", "host")
OFFLINE_GAUGES = ("up", "heartbeat_age_seconds")  # what an offline worker still has
QUEUE_LABELS = ("role", "kind", "route")


class FarmCollector(Collector):
    """The per-worker and per-queue families, from the snapshots of the last scrape."""

    def __init__(self) -> None:
        self._latest: tuple[list[dict], dict] = ([], {"queues": [], "error": "not read yet", "updated_at": None})

    def update(self, workers: list[dict], queues: dict) -> None:
        self._latest = (workers, queues)  # one assignment: a concurrent collect() sees the old or the new pair

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the families depend on the snapshot; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        workers, queues = self._latest
        yield from self._workers(workers)
        yield from self._queues(queues)

    @staticmethod
    def _workers(workers: list[dict]) -> Iterator[Metric]:
        gauges = {
            "up": ("Whether the worker is online (1) or offline: it missed two heart-beats (0)", "online"),
            "busy": ("Whether the worker is running a job", "state"),
            "cpu_percent": ("CPU of the worker process and its encoders, % of one core", "cpu_percent"),
            "memory_bytes": ("Resident memory of the worker process and its encoders", "memory_bytes"),
            "host_cpu_percent": ("CPU of the worker's whole host, % of all its cores", "host_cpu_percent"),
            "host_memory_percent": ("Memory in use on the worker's host, %", "host_memory_percent"),
            "load1": ("1-minute load average of the worker's host", "load"),
            "cores": ("CPU cores of the worker's host", "cores"),
            "heartbeat_age_seconds": ("Seconds since the worker's last presence message", "last_heartbeat_age"),
            "gpu_memory_bytes": ("GPU memory the worker process holds (0 on a CPU)", "gpu_memory_bytes"),
        }
        families = {name: GaugeMetricFamily(f"karaoke_worker_{name}", text, labels=WORKER_LABELS)
                    for name, (text, _) in gauges.items()}
        jobs = CounterMetricFamily(
            "karaoke_worker_jobs", "Results the worker process sent, per kind, since it started (use rate() or "
            "increase(): a restarted worker is a new worker)", labels=(*WORKER_LABELS, "kind"))
        known = set(kinds.names())
        for w in workers:
            labels = [w["worker"], w["host"]]
            for name, (_, key) in gauges.items():
                if not w["online"] and name not in OFFLINE_GAUGES:
                    continue  # its last figures are history, not the present: no flat line after it left
                value = w[key]
                if key == "online":
                    value = 1.0 if value else 0.0
                elif key == "state":
                    value = 1.0 if value == "busy" else 0.0
                families[name].add_metric(labels, float(value))
            for kind, count in sorted(w["jobs_by_kind"].items()):
                if kind in known:  # presence is data from the network: only real kinds become labels
                    jobs.add_metric([*labels, kind], float(count))
        yield from families.values()
        yield jobs

    @staticmethod
    def _queues(snapshot: dict) -> Iterator[Metric]:
        figures = {
            "messages": ("Messages in the queue: ready plus unacknowledged (RabbitMQ)", "messages"),
            "ready": ("Messages in the queue waiting for a consumer", "ready"),
            "unacked": ("Messages delivered to a consumer and not yet acknowledged", "unacked"),
            "consumers": ("Consumers of the queue", "consumers"),
            "publish_per_second": ("Messages published to the queue per second (the broker's rate)", "publish_rate"),
            "deliver_per_second": ("Messages delivered from the queue per second (the broker's rate)", "deliver_rate"),
            "ack_per_second": ("Messages acknowledged per second (the broker's rate)", "ack_rate"),
            "redeliver_per_second": ("Messages delivered again per second (the broker's rate)", "redeliver_rate"),
        }
        sums: dict[tuple[str, str, str], dict[str, float]] = {}
        for q in snapshot.get("queues", []):
            key = _queue_labels(q)
            row = sums.setdefault(key, dict.fromkeys(figures, 0.0))
            for name, (_, field) in figures.items():
                row[name] += float(q.get(field) or 0)
        for name, (text, _) in figures.items():
            family = GaugeMetricFamily(f"karaoke_queue_{name}", text, labels=QUEUE_LABELS)
            for key, row in sorted(sums.items()):
                family.add_metric(list(key), row[name])
            yield family
        yield GaugeMetricFamily("karaoke_queues_readable", "Whether the last read of the broker's management API "
                                "answered (0: the queue figures are stale or absent)",
                                value=0.0 if snapshot.get("error") else 1.0)


def _queue_labels(queue: dict) -> tuple[str, str, str]:
    """(role, kind, route) of a queue of the snapshot, "" where none; an unknown one is ("other", "", "")."""
    role, kind, route = queue.get("role"), queue.get("kind") or "", queue.get("route") or ""
    if role == "jobs":
        if kind in kinds.names() and (route == "" or route in kinds.routes(kind)):
            return role, kind, route
    elif role in QUEUE_ROLES:
        return role, "", ""
    return "other", "", ""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_published = Counter("karaoke_jobs_published", "Jobs sent to the jobs queue", registry=r)
        self.jobs_done = Counter("karaoke_jobs_done", "Job results stored", registry=r)
        self.jobs_failed = Counter("karaoke_jobs_failed", "Failed job attempts: reported by workers, or results "
                                   "refused by their kind's check", registry=r)
        self.results_refused = Counter(
            "karaoke_results_refused", "Results that failed their kind's check (a corrupt chunk)", registry=r)
        self.jobs_redelivered = Counter(
            "karaoke_jobs_redelivered", "Job results that came from a second or later attempt", registry=r)
        self.duplicate_results = Counter(
            "karaoke_duplicate_results", "Results for jobs already done (ignored)", registry=r)
        self.refused_messages = Counter(
            "karaoke_refused_messages", "Messages that were not ours, parked on the dead queue", registry=r)
        self.parked_messages = Counter(
            "karaoke_parked_messages", "Refused messages parked on the dead queue, by where they arrived",
            ["destination"], registry=r)
        self.presence_dropped = Counter(
            "karaoke_presence_dropped", "Valid presence messages dropped: over a worker's rate, or registry full",
            registry=r)
        self.jobs_republished = Counter(
            "karaoke_jobs_republished", "Jobs published again after a failure or a missed deadline", registry=r)
        self.job_seconds = Histogram(
            "karaoke_job_seconds", "Worker compute time per job", registry=r,
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
        self.jobs_cached = Counter(
            "karaoke_jobs_cached", "Jobs served from the results cache (never published)", ["kind"], registry=r)
        self.tasks_cached = Counter(
            "karaoke_tasks_cached", "Whole tasks served from the results cache", registry=r)
        self.results_outvoted = Counter(
            "karaoke_results_outvoted", "Replicated results whose checksum lost the majority vote (VERIFY_REPLICAS)",
            registry=r)
        # labels are bounded: a kind is one of the registry's, a source measured or estimated
        self.job_joules = Counter(
            "karaoke_job_joules", "Energy of the jobs whose results were accepted, by how it was known",
            ["kind", "source"], registry=r)
        self.job_cpu_seconds = Counter(
            "karaoke_job_cpu_seconds", "CPU time of the jobs whose results were accepted", ["kind"], registry=r)
        # the serial part: the server's own work per kind and phase (src/server/serial.py); with
        # karaoke_job_cpu_seconds_total, rate(server) / (rate(server) + rate(jobs)) is the serial share
        self.server_cpu_seconds = Counter(
            "karaoke_server_cpu_seconds", "CPU time the server spent on tasks, by kind and phase (prepare, plan, "
            "payload, check, merge): the thread's own plus its ffmpeg/ffprobe children's", ["kind", "phase"],
            registry=r)
        self.server_wall_seconds = Counter(
            "karaoke_server_wall_seconds", "Wall time the server spent on tasks, by kind and phase",
            ["kind", "phase"], registry=r)
        self.serial = SerialWork(self.server_cpu_seconds, self.server_wall_seconds)
        self.jobs_queued = Gauge("karaoke_jobs_queued", "Jobs waiting for a worker", registry=r)
        self.jobs_running = Gauge("karaoke_jobs_running", "Jobs a worker is processing", registry=r)
        self.jobs_total_done = Gauge("karaoke_jobs_in_state_done", "Stored jobs that are done", registry=r)
        self.workers_alive = Gauge("karaoke_workers_alive", "Workers heard from recently", registry=r)
        self.workers_configured = Gauge(
            "karaoke_workers_configured", "Workers the deployment runs (WORKERS_HEALTHY + WORKERS_UNHEALTHY)",
            registry=r)

        # per kind: karaoke_jobs_done keeps its one series (tests and the README read it unlabelled)
        self.jobs_accepted = Counter(
            "karaoke_jobs_accepted", "Job results accepted and stored, per kind (karaoke_jobs_done by kind)",
            ["kind"], registry=r)
        self.task_seconds = Histogram(
            "karaoke_task_seconds", "Seconds from a task's request to done (tasks from the results cache included)",
            ["kind"], registry=r, buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200))
        self.tasks_finished = Counter(
            "karaoke_tasks_finished", "Tasks that ended, by how: done, failed or cancelled", ["kind", "state"],
            registry=r)
        self.media_seconds_done = Counter(
            "karaoke_media_seconds_done", "Seconds of media of the tasks done (rate(): media seconds per second)",
            ["kind"], registry=r)
        for kind in kinds.names():  # every series from 0: increase() then sees a kind's first event
            self.jobs_accepted.labels(kind)
            self.task_seconds.labels(kind)
            self.media_seconds_done.labels(kind)
            for state in TASK_STATES:
                self.tasks_finished.labels(kind, state)
            for phase in PHASES:
                self.server_cpu_seconds.labels(kind, phase)
                self.server_wall_seconds.labels(kind, phase)

        self.farm = FarmCollector()
        r.register(self.farm)

    def task_ended(self, store: Store, task_id: int) -> None:
        """Count a task that has just ended (call it right after the store marked it done, failed or
        cancelled): its state, and when done its latency and media seconds."""
        self.serial.forget(task_id)  # a done task's figures are in its stats by now
        task = store.task(task_id)
        if task is None or task.state not in TASK_STATES or task.kind not in kinds.names():
            return
        self.tasks_finished.labels(task.kind, task.state).inc()
        if task.state != "done":
            return
        requested = task.started_at or task.created_at  # started_at is when it was asked to run (again)
        if task.finished_at is not None:
            self.task_seconds.labels(task.kind).observe(max(0.0, task.finished_at - requested))
        media = store.media(task.media_id)
        if media is not None and media.duration:
            self.media_seconds_done.labels(task.kind).inc(media.duration)

    def exposition(self, workers: list[dict], queues: dict[str, Any]) -> bytes:
        """The text exposition of every metric, the per-worker and per-queue ones from these snapshots."""
        self.farm.update(workers, queues)
        return generate_latest(self.registry)
