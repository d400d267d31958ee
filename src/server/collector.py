"""The inbound half of the server: results and presence from the broker → store → merge.

Results are handled one at a time on a thread of their own (the broker's receiver
thread only enqueues them). A result is written to disk under its job's ID, recorded
in the store, and only then ACKed; a result for a job already done changes nothing and
is ACKed too, so a job that ran twice is applied once. Messages that are not ours are
NACKed without requeue, which parks them on the dead queue. When a song's last job is
in, its stems and mix are merged on a merge thread so other songs' results keep
flowing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from src.config import Settings
from src.messaging.broker import Broker, Delivery
from src.messaging.schema import FailureMessage, MalformedMessage, PresenceMessage, ResultMessage, decode
from src.separation.model import ModelSpec
from src.server import mixdown
from src.server.events import EventHub
from src.server.files import SongFiles
from src.server.metrics import Metrics
from src.server.presence import WorkerRegistry
from src.server.store import Store
from src.server.views import announce

log = logging.getLogger("server")


class Collector:
    def __init__(self, settings: Settings, store: Store, files: SongFiles, spec: ModelSpec, broker: Broker,
                 events: EventHub, metrics: Metrics):
        self.settings = settings
        self.store = store
        self.files = files
        self.spec = spec
        self.broker = broker
        self.events = events
        self.metrics = metrics
        self.workers = WorkerRegistry(settings.broker_heartbeat_ms, self._job_started, self._worker_gone)
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        self._merger = ThreadPoolExecutor(1, thread_name_prefix="merge")
        self._last_progress: dict[int, int] = {}
        self._stopped = threading.Event()

    def start(self) -> None:
        d = self.broker.destinations
        # two in hand: one being stored, one arriving; a result frame can be tens of MB
        self.broker.subscribe(d.results, self._inbox.put, prefetch=2)
        self.broker.subscribe(d.presence, self._on_presence, ack="auto")
        threading.Thread(target=self._results_loop, name="results", daemon=True).start()
        threading.Thread(target=self._watch_workers, name="workers", daemon=True).start()
        for music in self.store.all_music():  # a restart may have stopped between last result and merge
            done, total = self.store.progress(music.id)
            if music.state == "processing" and total and done == total:
                self._merger.submit(self._merge, music.id)

    def stop(self) -> None:
        self._stopped.set()
        self._merger.shutdown(wait=True, cancel_futures=True)

    # -- results ------------------------------------------------------------------------

    def _results_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                delivery = self._inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._handle(delivery)
            except Exception:
                log.exception("Handling a result failed; it will be redelivered")
                self.broker.nack(delivery, requeue=True)
                time.sleep(1)

    def _refuse(self, delivery: Delivery, reason: str) -> None:
        log.warning("Refused a message on the results queue (%s); parked on the dead queue", reason)
        self.metrics.refused_messages.inc()
        self.broker.nack(delivery, requeue=False)

    def _handle(self, delivery: Delivery) -> None:
        try:
            message = decode(delivery.headers, delivery.body)
        except MalformedMessage as exc:
            return self._refuse(delivery, str(exc))
        if not isinstance(message, ResultMessage | FailureMessage):
            return self._refuse(delivery, f"a {type(message).__name__} does not belong on the results queue")
        music = self.store.music(message.music_id)
        job = self.store.job(message.job_id)
        if music is None or music.token != message.song_token or job is None or job.music_id != music.id:
            log.info("Dropped a result for Job[%d] of a song that no longer exists", message.job_id)
            return self.broker.ack(delivery)

        if isinstance(message, FailureMessage):
            self.metrics.jobs_failed.inc()
            self.store.record_failure(job.id, message.worker, message.attempt, message.error)
            log.warning("JobFailedMsg[%d] - attempt %d on Worker[%s]: %s", job.id, message.attempt,
                        message.worker, message.error)
            reason = f"job {job.id} (chunk {job.chunk}) failed after {message.attempt} attempt(s): {message.error}"
            if message.final and self.store.mark_failed(music.id, reason):
                log.error("Music[%d] - failed: %s", music.id, reason)
                announce(self.events, self.store, music.id)
            return self.broker.ack(delivery)

        plan = job.plan
        if (message.sources != self.spec.sources or message.out_start != plan.out_start
                or message.audio.shape[-1] != plan.out_end - plan.out_start):
            return self._refuse(delivery, f"result of Job[{job.id}] does not fit its job")
        if job.state == "done":
            self.metrics.duplicate_results.inc()
            log.info("JobDoneMsg[%d] - duplicate from Worker[%s] ignored - ACK", job.id, message.worker)
            return self.broker.ack(delivery)

        with self.files.atomic(self.files.result(music.id, job.id)) as temporary, temporary.open("wb") as f:
            np.save(f, message.audio)
        applied = self.store.record_result(job.id, message.worker, message.compute_ms, message.attempt)
        self.broker.ack(delivery)
        if not applied:
            self.metrics.duplicate_results.inc()
            return
        self.metrics.jobs_done.inc()
        self.metrics.job_seconds.observe(message.compute_ms / 1000)
        if message.attempt > 1:
            self.metrics.jobs_redelivered.inc()
        log.info("JobDoneMsg[%d] - ACK - job time: %.2f[s] (Worker[%s], attempt %d)", job.id,
                 message.compute_ms / 1000, message.worker, message.attempt)
        done, total = self.store.progress(music.id)
        percent = int(100 * done / total)
        if self._last_progress.get(music.id) != percent:
            self._last_progress[music.id] = percent
            log.info("Music[%d] - Progress: %d%%", music.id, percent)
        announce(self.events, self.store, music.id)
        if done == total and music.state == "processing":
            self._merger.submit(self._merge, music.id)

    def _merge(self, music_id: int) -> None:
        music = self.store.music(music_id)
        if music is None or music.state != "processing":
            return
        started = time.monotonic()
        try:
            mixed = mixdown.write_stems(self.store, self.files, self.spec, music_id)
        except FileNotFoundError:
            if self.store.music(music_id) is None:
                return  # reset while merging
            raise
        except Exception as exc:
            log.exception("Music[%d] - merge failed", music_id)
            self.store.mark_failed(music_id, f"merging the stems failed: {exc}")
            announce(self.events, self.store, music_id)
            return
        self.store.mark_done(music_id, mixed)
        log.info("Music[%d] - merge time: %.2f[s]", music_id, time.monotonic() - started)
        log.info("Music[%d] - total time: %.2f[s]", music_id, time.time() - (music.started_at or music.created_at))
        announce(self.events, self.store, music_id)

    # -- workers ------------------------------------------------------------------------

    def _on_presence(self, delivery: Delivery) -> None:
        try:
            message = decode(delivery.headers, delivery.body)
        except MalformedMessage:
            return
        if isinstance(message, PresenceMessage):
            self.workers.update(message)

    def _job_started(self, worker: str, job_id: int, started_at: float) -> None:
        self.store.start_attempt(job_id, worker, started_at)
        log.info("Worker[%s] started Job[%d]", worker, job_id)

    def _worker_gone(self, worker: str) -> None:
        self.store.end_attempts_of(worker, "lost")
        log.warning("Worker[%s] - no heart-beat for %.0fs; gone", worker, self.workers.expiry_seconds)

    def _watch_workers(self) -> None:
        while not self._stopped.wait(1):
            try:
                self.workers.expire()
                snapshot = self.workers.snapshot()
                self.metrics.workers_alive.set(len(snapshot))
                self.events.publish("workers", {"workers": snapshot})
            except Exception:
                log.exception("Watching workers failed")
