"""Prometheus metrics of one server, in its own registry (so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        self.jobs_queued = Gauge("karaoke_jobs_queued", "Jobs waiting for a worker", registry=r)
        self.jobs_running = Gauge("karaoke_jobs_running", "Jobs a worker is processing", registry=r)
        self.jobs_total_done = Gauge("karaoke_jobs_in_state_done", "Stored jobs that are done", registry=r)
        self.workers_alive = Gauge("karaoke_workers_alive", "Workers heard from recently", registry=r)
        self.workers_configured = Gauge(
            "karaoke_workers_configured", "Workers the deployment runs (WORKERS_HEALTHY + WORKERS_UNHEALTHY)",
            registry=r)
