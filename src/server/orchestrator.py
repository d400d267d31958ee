"""Orchestration, the outbound half of the server: upload → task → prepare → plan → jobs on the broker.

An upload is probed in the request (what is not media, or would cost too much, is
refused now, not later in a worker) and kept as a medium. A task asks for one kind of
work on one medium: its params are checked by the kind, and a preparer thread then runs
the kind's `prepare` (decode a song, read a video's keyframes). A task that is asked to
run (`queued`) is planned into jobs as soon as it is prepared.

Planning records the task's jobs as `pending` in the store first; a publisher thread
publishes them to the kind's jobs queue, each confirmed by a broker RECEIPT before it is
marked `queued`; a server restarted mid-publish finds the rest still pending and
publishes them again (a job published twice is harmless: results are idempotent).

Each publication carries a fresh attempt token (store.issue_attempt). Every few seconds
the publisher also looks for jobs past their deadline and publishes them again, so a job
that a worker took and never answered (lost, or swallowed by a rogue consumer) is never
silent; after MAX_ATTEMPTS publications its task fails with the reason instead. A job's
deadline counts from its publication and allows JOB_DEADLINE_SECONDS plus
JOB_DEADLINE_FACTOR seconds per second of media of the job and of every job published
before it that is still out, shared among the workers alive (the queue is FIFO).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path, PureWindowsPath
from typing import Any

from src.kinds import registry
from src.kinds.base import NotApplicable
from src.media import probe
from src.messaging.broker import Broker, BrokerUnavailable
from src.messaging.schema import ControlMessage, JobMessage
from src.server import cache
from src.server.pipeline import Pipeline, media_of
from src.server.store import Job, MediaRow, Spent, Task

log = logging.getLogger("server")

DEADLINE_CHECK_SECONDS = 2.0
CACHE_WORKER = "cache"  # the `worker` of a job served from the results cache


class NotFound(LookupError):
    pass


class NotProcessable(ValueError):
    """The task can never run (its input could not be prepared)."""


def display_name(filename: str | None) -> str:
    """A human name from an uploaded file's name: no folders, no extension, no control characters."""
    if not filename:
        return "untitled"
    base = PureWindowsPath(filename).name  # splits on both / and \
    base = re.sub(r"[\x00-\x1f\x7f]", "", base)
    stem = base.rsplit(".", 1)[0] if "." in base.strip(".") else base
    return stem.strip()[:200] or "untitled"


class Orchestrator:
    def __init__(self, pipeline: Pipeline):
        self.p = pipeline
        self.store = pipeline.store
        self._wake: queue.Queue[int | None] = queue.Queue()
        self._stopped = threading.Event()
        self._publisher = threading.Thread(target=self._publish_loop, name="publisher", daemon=True)
        self._preparer = ThreadPoolExecutor(1, thread_name_prefix="prepare")
        self._prepared = threading.Lock()  # orders "prepare ended" against "run asked for"
        self._lacking_since: dict[int, float] = {}  # task -> since when no live worker could take its jobs
        self._started = time.monotonic()
        pipeline.wake_publisher = lambda: self._wake.put(None)

    def start(self) -> None:
        swept = self.p.files.sweep_incoming()
        if swept:
            log.info("Deleted %d unfinished upload(s) left from before", swept)
        self.p.data.sweep()  # inputs and results of tasks that ended while the server was away
        self._publisher.start()
        self._wake.put(None)  # publish whatever a previous run left pending
        for task in self.store.tasks():  # preparations a previous run did not finish
            if not task.ready and task.state in ("waiting", "queued"):
                self._preparer.submit(self._prepare, task.id)

    def stop(self) -> None:
        self._stopped.set()
        self._wake.put(None)
        self._preparer.shutdown(wait=True, cancel_futures=True)

    # -- media ------------------------------------------------------------------------

    def upload(self, upload_path: Path, filename: str | None) -> MediaRow:
        """Probe an uploaded file and keep it as a medium.

        Raises UnreadableMedia or RefusedMedia; the file is the caller's to delete then.
        """
        size = upload_path.stat().st_size
        if size == 0:
            raise probe.UnreadableMedia("the upload is empty")
        found = probe.probe(upload_path, probe.Limits.of(self.p.settings))  # header and packets held to limits
        tags = {key: value for key, value in (("title", found.title), ("artist", found.artist)) if value}
        # the content hash keys the results cache: the same file uploaded again is the same input
        media = self.store.create_media(found.title or display_name(filename), size, found.duration,
                                        {"video": found.video, "audio": found.audio, "tags": tags,
                                         "sha256": cache.file_sha256(upload_path)})
        target = self.p.files.original(media.id)
        target.parent.mkdir(parents=True, exist_ok=True)
        upload_path.replace(target)
        what = "video" if found.video else f"audio ({found.audio['codec']})"
        log.info("Media[%d] - uploaded %r, %s, about %.1fs", media.id, media.name, what, found.duration or 0)
        return media

    # -- tasks --------------------------------------------------------------------------

    def create_task(self, kind_name: str, media_id: int, raw_params: dict[str, Any], run: bool = True) -> Task:
        """A task of `kind_name` on a medium; `run=False` keeps it `waiting` until `run()`.

        Raises KeyError (unknown kind), NotFound (medium), NotApplicable, BadParams.
        """
        kind = self.p.kind(kind_name)
        row = self.store.media(media_id)
        if row is None:
            raise NotFound(f"no media with id {media_id}")
        media = media_of(row, self.p.files.original(media_id))
        kind.accepts(media)
        params = kind.parameters(raw_params, media)
        task = self.store.create_task(kind_name, media_id, params, uuid.uuid4().hex,
                                      "queued" if run else "waiting", kind.output_names(params, {}))
        if run:
            self.store.request(task.id)
        log.info("Task[%d] - %s of Media[%d] with %s", task.id, kind_name, media_id, params)
        self._preparer.submit(self._prepare, task.id)
        return self.store.task(task.id)

    def _prepare(self, task_id: int) -> None:
        task = self.store.task(task_id)
        if task is None or task.ready or self._stopped.is_set():
            return
        with self._prepared:
            if task.state == "queued" and self._reuse(task):
                return
        started = time.monotonic()
        try:
            with self.p.metrics.serial.phase(task.id, task.kind, "prepare"):  # the server's own work (serial.py)
                facts = self.p.kind(task.kind).prepare(self.p.view(task))
            facts["timing"] = {"prepare_seconds": round(time.monotonic() - started, 3)}
        except (probe.UnreadableMedia, probe.RefusedMedia, NotApplicable, FileNotFoundError) as exc:
            if self.store.task(task_id) is not None and self.store.mark_failed(task_id, str(exc)):
                # repr: one line, whatever the media says
                log.warning("Task[%d] - preparing failed: %r", task_id, str(exc))
                self.p.metrics.task_ended(self.store, task_id)
                self.p.changed(task_id)
            return
        except Exception as exc:
            log.exception("Task[%d] - preparing failed", task_id)
            if self.store.mark_failed(task_id, f"preparing the input failed: {type(exc).__name__}: {exc}"):
                self.p.metrics.task_ended(self.store, task_id)
                self.p.changed(task_id)
            return
        with self._prepared:
            if self.store.task(task_id) is None:
                return  # deleted while preparing
            self.store.mark_prepared(task_id, facts)
            task = self.store.task(task_id)
            log.info("Task[%d] - prepared", task_id)
            if task.state == "queued":
                self._plan(task)
        self.p.changed(task_id)

    def run(self, task_id: int, params: dict[str, Any] | None = None) -> None:
        """Run a task that is waiting, or failed (again, from the start), with `params` if given."""
        with self._prepared:
            task = self.store.task(task_id)
            if task is None:
                raise NotFound(f"no task with id {task_id}")
            if not task.ready and task.state == "failed":
                raise NotProcessable(f"task {task_id} cannot run: {task.error}")
            if params is not None:
                self.store.set_params(task_id, params)
            if task.state in ("waiting", "failed", "cancelled"):
                self.store.request(task_id)
                task = self.store.task(task_id)
                if self._reuse(task):
                    return
                if task.ready:
                    self._plan(task)
                else:
                    log.info("Task[%d] - runs once its input is prepared", task_id)
        self.p.changed(task_id)

    def _reuse(self, task: Task) -> bool:
        """Finish the task from the results cache if the same task was done before (same medium,
        params and software): no prepare, no job, no merge. True when it was."""
        sha = self.store.media(task.media_id).probe.get("sha256")
        if not sha or not self.p.cache.enabled:
            return False
        keys = [cache.task_key(task.kind, sha, task.params, v) for v in sorted(self.p.versions(task))]
        facts = self.p.cache.task(keys, self.p.files.task_dir(task.id))
        if facts is None:
            return False
        stats = {**facts.get("stats", {}), "cache": {"task": True, "jobs": 0, "of": 0},
                 "energy": {"joules": 0.0, "cpu_seconds": 0.0, "source": "cached"}}
        self.store.finish_from_cache(task.id, {**facts, "stats": stats, "waiting": None})
        self.p.metrics.tasks_cached.inc()
        self.p.metrics.task_ended(self.store, task.id)
        log.info("Task[%d] - done from the results cache: the same %s of the same input was done before",
                 task.id, task.kind)
        self.p.changed(task.id)
        return True

    def _plan(self, task: Task) -> None:
        # the live workers that would take its jobs: a plan gives each of them some
        workers = max(1, len(self.p.offering(task.kind, self.p.route(task))))
        try:
            with self.p.metrics.serial.phase(task.id, task.kind, "plan"):
                planned = self.p.kind(task.kind).plan(replace(self.p.view(task), workers=workers))
        except Exception as exc:  # a video's pieces are proven here (its GOPs may forbid a cut): fail with why
            refused = isinstance(exc, probe.UnreadableMedia | probe.RefusedMedia | NotApplicable)
            reason = str(exc) if refused else f"planning the jobs failed: {type(exc).__name__}: {exc}"
            log.warning("Task[%d] - planning failed: %r", task.id, reason)
            if self.store.mark_failed(task.id, reason):
                self.p.metrics.task_ended(self.store, task.id)
                self.p.changed(task.id)
            return
        self.store.start_jobs(task.id, planned)
        log.info("Task[%d] - %s in %d jobs", task.id, task.kind, len(planned))
        self._wake.put(task.id)

    def cancel(self, task_id: int) -> bool:
        """Stop a task: its queued jobs are dropped by whoever takes them, running ones stopped."""
        if not self.store.mark_cancelled(task_id):
            return False
        self.p.metrics.task_ended(self.store, task_id)
        self.p.broker.send(self.p.broker.destinations.control, b"",
                           ControlMessage("cancel", (task_id,)).headers(), persistent=False)
        log.info("Task[%d] - cancelled", task_id)
        self.p.changed(task_id)
        return True

    # -- publishing --------------------------------------------------------------------

    def _publish_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self._wake.get(timeout=DEADLINE_CHECK_SECONDS)
            except queue.Empty:
                pass
            if self._stopped.is_set():
                return
            try:
                self.p.data.drop_ended()  # a task that ended leaves nothing in the data store
                self._republish_overdue()
                self._publish_pending()
            except BrokerUnavailable as exc:
                log.warning("Publishing paused: %s; retrying", exc)
                time.sleep(2)
                self._wake.put(None)
            except Exception:
                log.exception("Publishing failed; retrying")
                time.sleep(2)
                self._wake.put(None)

    def _publish_pending(self) -> None:
        waiting: set[int] = set()  # tasks no live worker serves yet: their other jobs wait too
        for job in self.store.jobs(state="pending"):
            task = self.store.task(job.task_id)
            if task is None or task.state != "running":
                continue
            kind = self.p.kind(task.kind)
            if task.id in waiting:
                continue
            pinned = self.p.pin_route(task)
            if pinned is None:  # its route is chosen once a worker serves one (separation: GPU or CPU)
                waiting.add(task.id)
                self._watch_capability(task, self.p.route(task), 0)
                continue
            task = pinned
            try:
                with self.p.metrics.serial.phase(task.id, task.kind, "payload"):  # cutting or reading the piece
                    params, payload = kind.payload(self.p.view(task), self.p.job_view(job))
                    digest = job.digest or cache.digest(task.kind, params, payload)
            except Exception as exc:  # an input that cannot be made (a video piece no cut matches) fails its
                # task, rather than stop the publisher on this job for every task
                log.exception("Task[%d] - Job[%d]: its input could not be made", task.id, job.id)
                if self.store.mark_failed(task.id, f"the input of job {job.id} (chunk {job.chunk}) could not be "
                                                   f"made: {type(exc).__name__}: {exc}"):
                    self.p.metrics.task_ended(self.store, task.id)
                    self.p.changed(task.id)
                continue
            if job.digest is None:
                job = replace(job, digest=digest)
                self.store.set_digest(job.id, job.digest)
            if self._from_cache(task, job):
                continue
            route = self.p.route(task)
            # the claim check: the input goes to the data store once per job, each message names it
            if job.publications == 0:
                self.p.data.put_input(task.id, job.id, payload)
            size, sha256 = len(payload), hashlib.sha256(payload).hexdigest()
            # VERIFY_REPLICAS: the first publication sends one copy per replica; a re-publication one
            copies = self.p.settings.verify_replicas if job.publications == 0 else 1
            for _ in range(copies):
                token = uuid.uuid4().hex
                input_ref, result_ref = self.p.data.refs(job.id, token)  # capabilities of this attempt alone
                message = JobMessage(task.kind, task.id, job.id, job.chunk, task.token, token, params,
                                     route=route or "", input_ref=input_ref, input_size=size, input_sha256=sha256,
                                     result_ref=result_ref)
                self.store.issue_attempt(job.id, message.attempt_token)
                self.p.broker.send(self.p.broker.destinations.jobs(task.kind, route), message.body(),
                                   message.headers())
                self.p.metrics.jobs_published.inc()
            self.store.mark_queued(job.id)
            log.info("Task[%d] - Job[%d] (chunk %d) queued (attempt %d%s)", task.id, job.id, job.chunk,
                     job.publications + 1, f", {copies} replicas" if copies > 1 else "")

    def _from_cache(self, task: Task, job: Job) -> bool:
        """Serve a job from the results cache when the same job ran before; True when it was."""
        found = self.p.cache.job(job.digest, self.p.versions(task))
        if found is None:
            return False
        params, body, version = found
        view, job_view = self.p.view(task), self.p.job_view(job)
        kind = self.p.kind(task.kind)
        with self.p.metrics.serial.phase(task.id, task.kind, "check"):
            refused = kind.check(view, job_view, params, body)  # the cache is storage, and storage can rot
        if refused is not None:
            log.warning("Task[%d] - Job[%d]: the cached result is refused (%s); publishing the job", task.id,
                        job.id, refused)
            return False
        with self.p.metrics.serial.phase(task.id, task.kind, "check"):
            kind.keep(view, job_view, params, body)
        if self.store.record_result(job.id, CACHE_WORKER, 0, Spent(version=version, cached=True)):
            self.p.metrics.jobs_cached.labels(task.kind).inc()
            log.info("Task[%d] - Job[%d] (chunk %d) served from the results cache", task.id, job.id, job.chunk)
            self.p.job_done(task.id)
        return True

    def deadline(self, seconds_of_media: float, workers: int) -> float:
        """Seconds a job may take from its publication, given the media ahead of it and its own,
        shared among the `workers` that take jobs from its queue."""
        s = self.p.settings
        return s.job_deadline_seconds + s.job_deadline_factor * seconds_of_media / max(1, workers)

    def _lacking(self, task: Task, route: str | None, workers: int) -> str | None:
        """Why no live worker can run this task's jobs (None when enough can)."""
        needed = self.p.settings.verify_replicas
        if workers >= needed:
            return None
        offer = f"{task.kind}/{route}" if route else task.kind
        offered = ", ".join(self.p.live_offers()) or "none"
        if workers == 0:
            return f"no live worker takes {offer} jobs (live workers take: {offered})"
        return (f"VERIFY_REPLICAS={needed} needs {needed} different workers that take {offer} jobs; "
                f"{workers} live")

    def _watch_capability(self, task: Task, route: str | None, workers: int) -> bool:
        """Say on the task when no live worker can run its jobs, and fail it when that lasts
        JOB_DEADLINE_SECONDS (a worker that joins in time clears it). True while lacking."""
        reason = self._lacking(task, route, workers)
        if reason is None:
            self._lacking_since.pop(task.id, None)
            if task.facts.get("waiting"):
                self.store.update_facts(task.id, {"waiting": None})
                self.p.changed(task.id)
            return False
        since = self._lacking_since.setdefault(task.id, time.monotonic())
        if task.facts.get("waiting") != reason:
            self.store.update_facts(task.id, {"waiting": reason})
            log.warning("Task[%d] - waiting: %s", task.id, reason)
            self.p.changed(task.id)
        # the registry needs two heart-beats after a start to know every worker
        settled = time.monotonic() - self._started > 2 * self.p.settings.broker_heartbeat_ms / 1000
        if settled and time.monotonic() - since > self.p.settings.job_deadline_seconds:
            if self.store.mark_failed(task.id, f"{reason}, for {self.p.settings.job_deadline_seconds:.0f}s"):
                log.error("Task[%d] - failed: %s", task.id, reason)
                self.p.metrics.task_ended(self.store, task.id)
                self._lacking_since.pop(task.id, None)
                self.p.changed(task.id)
        return True

    def _republish_overdue(self) -> None:
        now, ahead = time.time(), {}
        outstanding = sorted(self.store.jobs(state="queued"), key=lambda j: j.published_at or 0)
        tasks: dict[int, Task | None] = {}
        lacking: dict[int, bool] = {}
        for job in outstanding:
            task = tasks.setdefault(job.task_id, self.store.task(job.task_id))
            if task is None or task.state != "running":
                continue
            route = self.p.route(task)
            workers = len(self.p.offering(task.kind, route))
            if task.id not in lacking:
                lacking[task.id] = self._watch_capability(task, route, workers)
            if lacking[task.id]:
                continue  # nobody can take it: publishing it again would only duplicate it
            queue_name = (task.kind, route)  # each kind and route has its own FIFO queue
            ahead[queue_name] = ahead.get(queue_name, 0.0) + job.seconds
            allowed = self.deadline(ahead[queue_name], workers)
            if job.published_at is None or now - job.published_at <= allowed:
                continue
            if job.publications >= self.p.settings.max_attempts:
                reason = (f"job {job.id} (chunk {job.chunk}) failed: no result after {job.publications} attempt(s), "
                          f"each given {allowed:.0f}s")
                if self.store.mark_failed(task.id, reason):
                    log.error("Task[%d] - failed: %s", task.id, reason)
                    self.p.metrics.task_ended(self.store, task.id)
                    self.p.changed(task.id)
            elif self.store.republish(job.id):
                self.p.metrics.jobs_republished.inc()
                log.warning("Task[%d] - Job[%d] not done %.0fs after its publication (deadline %.0fs); "
                            "publishing it again", task.id, job.id, now - job.published_at, allowed)

    # -- deleting ----------------------------------------------------------------------

    def delete_task(self, task_id: int) -> None:
        """Forget a task and its files. Its jobs still out run to their end, and their results are dropped."""
        self.cancel(task_id)
        self.store.delete_task(task_id)
        self.p.files.delete_task(task_id)

    def delete_media(self, media_id: int) -> None:
        """Forget a medium with no tasks left, and its file."""
        self.store.delete_media(media_id)
        self.p.files.delete_media(media_id)

    def reset(self) -> None:
        """Stop every worker's current job, empty the queues, delete every medium and task."""
        newest = max((t.id for t in self.store.tasks()), default=0)
        self.p.broker.send(self.p.broker.destinations.control, b"",
                           ControlMessage("reset", (newest,)).headers(), persistent=False)
        kinds = sorted({t.kind for t in self.store.tasks()})
        self.store.delete_everything()
        self.p.files.delete_everything()
        self.p.cache.clear()
        drained = drain_stale_jobs(self.p, registry.queues(kinds)) if kinds else 0
        log.info("Reset: every medium, task and cached result deleted, %d queued jobs dropped", drained)


def drain_stale_jobs(pipeline: Pipeline, queues: list[tuple[str, str | None]], quiet_seconds: float = 1.0,
                     limit_seconds: float = 15.0) -> int:
    """ACK every queued job in these (kind, route) queues whose task no longer exists, until they are quiet.

    A consumer of its own, not the server's connection: the server publishes jobs and
    never consumes them anywhere else.
    """
    broker = Broker(pipeline.settings, client_name=f"drain-{uuid.uuid4().hex[:8]}", role="server")
    seen: queue.Queue = queue.Queue()
    for kind, route in queues:
        broker.subscribe(broker.destinations.jobs(kind, route), seen.put, prefetch=100)
    broker.connect(give_up_after=10)
    dropped, deadline = 0, time.monotonic() + limit_seconds
    try:
        while time.monotonic() < deadline:
            try:
                delivery = seen.get(timeout=quiet_seconds)
            except queue.Empty:
                break
            task_id = delivery.headers.get("task-id", "")
            if not task_id.isdigit():
                broker.nack(delivery, requeue=False)  # not ours: park it on the dead queue
                continue
            if pipeline.store.task(int(task_id)) is None:
                broker.ack(delivery)
                dropped += 1
            else:
                broker.nack(delivery, requeue=True)
    finally:
        broker.close()
    return dropped
