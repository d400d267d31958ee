"""The inbound half of the server: results and presence from the broker → store → merge.

Results are handled one at a time on a thread of their own (the broker's receiver
thread only enqueues them). A result is written to disk under its job's ID, recorded
in the store, and only then ACKed; a result for a job already done changes nothing and
is ACKed too, so a job that ran twice is applied once. When a song's last job is in,
its stems and mix are merged on a merge thread so other songs' results keep flowing.

Whatever arrives is checked by the schema first, then against the job it claims to
answer (an outstanding attempt token, the shape the job implies). A message that fails is
parked on the dead queue with the reason in its `x-refused-reason` header, logged once and
counted in /metrics; nothing raises out of the loop. A result whose handling itself fails
(a full disk) is requeued, and parked once the results queue's delivery count says it was
tried MAX_ATTEMPTS times. A failure report counts one failed attempt of its job; the
store, not the worker, decides whether the job is published again or its song fails.
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
from src.messaging.schema import (
    Expected,
    FailureMessage,
    MalformedMessage,
    PresenceMessage,
    ResultMessage,
    decode,
    result_mismatch,
)
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
        self.workers = WorkerRegistry(settings.broker_heartbeat_ms, self._job_started, self._worker_gone,
                                      metrics.presence_dropped.inc)
        self.presence_refused = 0
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        self._merger = ThreadPoolExecutor(1, thread_name_prefix="merge")
        self._last_progress: dict[int, int] = {}
        self._stopped = threading.Event()

    def start(self) -> None:
        d = self.broker.destinations
        # two in hand: one being stored, one arriving; a result frame can be tens of MB
        # through the results route: this subscription declares the results queue and binds
        # it to the routing key workers may publish to (destinations.py)
        self.broker.subscribe(d.results_route, self._inbox.put, prefetch=2)
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
            except Exception as exc:
                if delivery.delivery_count + 1 >= self.settings.max_attempts:
                    self._settle_safely(delivery, f"handling it failed {delivery.delivery_count + 1} times: "
                                                  f"{type(exc).__name__}: {exc}")
                else:
                    log.exception("Handling a result failed; it will be redelivered")
                    self.broker.nack(delivery, requeue=True)
                    time.sleep(1)

    def _settle_safely(self, delivery: Delivery, reason: str) -> None:
        try:
            self._refuse(delivery, reason)
        except Exception:  # the broker is gone: it requeues the message, and its delivery limit bounds that
            log.exception("Could not park a message")

    def _refuse(self, delivery: Delivery, reason: str) -> None:
        log.warning("Refused a message on the results queue (%s); parked on the dead queue", reason)
        self.metrics.refused_messages.inc()
        self.metrics.parked_messages.labels("results").inc()
        self.broker.park(delivery, reason, self.broker.destinations.results)

    def _expected(self, message: ResultMessage | FailureMessage) -> Expected | str:
        """What the message's job expects, or why there is no such outstanding job."""
        job = self.store.job(message.job_id)
        music = self.store.music(job.music_id) if job is not None else None
        if job is None or music is None:
            return f"Job[{message.job_id}] does not exist"
        plan = job.plan
        return Expected(music.id, music.token, job.attempt_tokens, self.spec.sources, music.channels,
                        plan.out_start, plan.out_end - plan.out_start)

    def _handle(self, delivery: Delivery) -> None:
        try:
            message = decode(delivery.headers, delivery.body)
        except MalformedMessage as exc:
            return self._refuse(delivery, str(exc))
        if not isinstance(message, ResultMessage | FailureMessage):
            return self._refuse(delivery, f"a {type(message).__name__} does not belong on the results queue")
        expected = self._expected(message)
        problem = expected if isinstance(expected, str) else result_mismatch(message, expected)
        if problem is not None:
            return self._refuse(delivery, problem)
        job = self.store.job(message.job_id)
        music = self.store.music(job.music_id)
        if music.state not in ("processing", "done"):
            log.info("Dropped a late message for Job[%d]: Music[%d] is %s", job.id, music.id, music.state)
            return self.broker.ack(delivery)
        if job.state == "done" and isinstance(message, ResultMessage):
            # a late copy (a redelivery, or the old copy of a re-published job): harmless, not hostile
            self.metrics.duplicate_results.inc()
            log.info("JobDoneMsg[%d] - duplicate from Worker[%s] ignored - ACK", job.id, message.worker)
            return self.broker.ack(delivery)

        if isinstance(message, FailureMessage):
            self.metrics.jobs_failed.inc()
            log.warning("JobFailedMsg[%d] - on Worker[%s]: %s", job.id, message.worker, message.error)
            verdict = self.store.record_failure(job.id, message.worker, message.attempt_token, message.error,
                                                self.settings.max_attempts)
            reason = f"job {job.id} (chunk {job.chunk}) failed after {job.publications} attempt(s): {message.error}"
            if verdict == "failed" and self.store.mark_failed(music.id, reason):
                log.error("Music[%d] - failed: %s", music.id, reason)
                announce(self.events, self.store, music.id)
            elif verdict == "retry":
                self.metrics.jobs_republished.inc()
                log.info("Music[%d] - Job[%d] will be published again (attempt %d of %d)", music.id, job.id,
                         job.publications + 1, self.settings.max_attempts)
            return self.broker.ack(delivery)

        with self.files.atomic(self.files.result(music.id, job.id)) as temporary, temporary.open("wb") as f:
            np.save(f, message.audio)
        applied = self.store.record_result(job.id, message.worker, message.compute_ms)
        self.broker.ack(delivery)
        if not applied:
            self.metrics.duplicate_results.inc()
            return
        self.metrics.jobs_done.inc()
        self.metrics.job_seconds.observe(message.compute_ms / 1000)
        if message.attempt > 1 or job.publications > 1:
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
        """Presence runs on the broker's receiver thread: it must never raise nor block."""
        try:
            message = decode(delivery.headers, delivery.body)
            if not isinstance(message, PresenceMessage):
                raise MalformedMessage(f"a {type(message).__name__} does not belong on the presence topic")
            problem = self.workers.update(message)
        except MalformedMessage as exc:
            problem = str(exc)
        except Exception as exc:  # a bug must not stop the receiver thread
            log.exception("Handling a presence message failed")
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            return
        self.metrics.parked_messages.labels("presence").inc()
        self.metrics.refused_messages.inc()
        self.presence_refused += 1
        if self.presence_refused <= 20 or self.presence_refused % 1000 == 0:  # logged, not flooded
            log.warning("Refused presence message #%d (%s); parked on the dead queue", self.presence_refused, problem)
        try:
            self.broker.park(delivery, problem, self.broker.destinations.presence, acknowledge=False)
        except Exception:
            log.debug("could not park a presence message", exc_info=True)

    def _job_started(self, worker: str, job_id: int, started_at: float) -> None:
        self.store.start_attempt(job_id, worker, min(started_at, time.time()))
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
                self.metrics.workers_configured.set(self.settings.workers_configured)
                self.events.publish("workers", {"workers": snapshot})
            except Exception:
                log.exception("Watching workers failed")
