"""One worker process: take a job from the broker, run it, send the result, ACK.

The worker needs nothing but the broker address: a job message carries its audio and
everything else it needs. It subscribes with `ack: client-individual` and a prefetch
of WORKER_PREFETCH (1: it pulls a job only when free). Its result goes to the results
queue with a receipt, and the job is ACKed only after the receipt came back, so a
worker that dies at any point leaves its job to the broker, which hands it to another.

The worker logs in as BROKER_WORKER_USER, which may read jobs and control and write
results and presence, nothing else (src/messaging/accounts.py). It trusts nothing it
receives: a job is decoded and checked by the schema (and against the model it runs)
before anything else, anything that goes wrong with one job is contained to that job,
and no message can end the process.

Attempts are bounded with the jobs queue's delivery count: a job that has already
been delivered MAX_ATTEMPTS times (it crashed or hung every worker that took it) is
not run again. A failed, refused or exhausted job is reported on the results route
with its attempt token and NACKed without requeue, which parks it on the dead queue;
the server counts the failure and decides whether to publish the job again.

A reset (control topic) stops work on songs up to the id it names, but never beyond the
highest song id this worker has seen in a job: a forged reset cannot stop future songs.

Presence: every heart-beat interval, and at every job start and end, the worker
publishes what it is doing on the presence topic for the server's worker panel.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from typing import Any

import torch

from src.config import Settings
from src.messaging.broker import Broker, Delivery
from src.messaging.schema import (
    ControlMessage,
    FailureMessage,
    JobMessage,
    MalformedMessage,
    PresenceMessage,
    ResultMessage,
    decode,
)
from src.separation.compute import JobCancelled, model_mismatch, run_job
from src.separation.model import ModelUnavailable, load_model, pick_device

log = logging.getLogger("worker")


class Worker:
    def __init__(self, settings: Settings, simulate: str | None = None):
        self.settings = settings
        self.name = uuid.uuid4().hex[:7]
        self.simulate = simulate  # None, "crash" or "hang": see make workers
        self.device = pick_device(settings.device)
        self.session = uuid.uuid4().hex  # binds this process's presence messages (see presence.py)
        self.broker = Broker(settings, client_name=f"worker-{self.name}", role="worker")
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        self._models: dict[str, Any] = {}
        self._cancelled_up_to = 0  # songs with ids up to this one were reset
        self._highest_seen = 0  # the highest song id of a valid job this worker received
        self._current: JobMessage | None = None
        self._jobs_done = 0
        self._job_seconds = 0.0
        self._stopping = threading.Event()

    # -- life cycle ---------------------------------------------------------------------

    def run(self) -> None:
        torch.set_num_threads(self.settings.threads_per_worker)
        log.info("Worker[%s] starting: pid %d, %d torch thread(s), model %s on %s", self.name, os.getpid(),
                 self.settings.threads_per_worker, self.settings.model, self.device)
        try:
            self._model(self.settings.model)
        except ModelUnavailable as exc:
            log.error("Worker[%s] - %s; its jobs will fail with this reason", self.name, exc)
        d = self.broker.destinations
        # A worker login of its own has no `configure` permission, so it consumes the jobs queue
        # that `make broker` (or the server's first job) declared; one that shares the server's
        # login declares it as the server does, so workers may start before the first song.
        shared = self.settings.worker_login == self.settings.server_login
        self.broker.subscribe(d.jobs if shared else d.worker_jobs, self._inbox.put,
                              prefetch=self.settings.worker_prefetch)
        self.broker.subscribe(d.control, self._on_control, ack="auto")
        self.broker.connect()
        threading.Thread(target=self._announce_loop, name="presence", daemon=True).start()
        signal.signal(signal.SIGTERM, lambda *_: self._stopping.set())
        log.info("Worker[%s] ready", self.name)
        while not self._stopping.is_set():
            try:
                delivery = self._inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            self._handle(delivery)
        self._announce("leaving")
        self.broker.close()
        log.info("Worker[%s] stopped", self.name)

    def _model(self, name: str) -> Any:
        if name not in self._models:
            try:
                self._models[name] = load_model(name, self.settings.model_repo, self.device)
            except ModelUnavailable as exc:
                self._models[name] = exc
        model = self._models[name]
        if isinstance(model, ModelUnavailable):
            raise model
        return model

    # -- jobs -----------------------------------------------------------------------------

    def _handle(self, delivery: Delivery) -> None:
        """One delivery from the jobs queue; whatever it holds, the worker lives on."""
        try:
            job = decode(delivery.headers, delivery.body, models={self.settings.model})
            if not isinstance(job, JobMessage):
                raise MalformedMessage(f"a {type(job).__name__} does not belong on the jobs queue")
            problem = self._model_problem(job)
            if problem:
                raise MalformedMessage(problem)
        except MalformedMessage as exc:
            return self._refuse(delivery, str(exc))
        except Exception as exc:
            log.exception("Worker[%s] - checking a job failed", self.name)
            return self._refuse(delivery, f"{type(exc).__name__}: {exc}")
        try:
            self._run(delivery, job)
        except Exception:  # a bug here must cost one job, not the worker
            log.exception("Worker[%s] - Job[%d] failed unexpectedly; parked", self.name, job.job_id)
            self.broker.nack(delivery, requeue=False)

    def _model_problem(self, job: JobMessage) -> str | None:
        try:
            model = self._model(job.model)
        except ModelUnavailable:
            return None  # _run reports that as the job's failure, with the loader's message
        return model_mismatch(model, job)

    def _refuse(self, delivery: Delivery, reason: str) -> None:
        """Park an invalid job; if it names a job of ours, say why, so the server counts the failure."""
        log.warning("Worker[%s] refused a message on the jobs queue (%s); parked on the dead queue", self.name, reason)
        h = delivery.headers
        try:
            failure = FailureMessage(int(h["music-id"]), int(h["job-id"]), h["song-token"], self.name,
                                     delivery.delivery_count + 1, f"refused by the worker: {reason}", True,
                                     h["attempt-token"])
            decode(failure.headers(), b"")  # only a report the server can read
        except (KeyError, ValueError):
            failure = None
        if failure is not None:
            self._report(failure)
        self.broker.nack(delivery, requeue=False)

    def _run(self, delivery: Delivery, job: JobMessage) -> None:
        self._highest_seen = max(self._highest_seen, job.music_id)
        if job.music_id <= self._cancelled_up_to:
            log.info("Worker[%s] dropped Job[%d]: its song was reset", self.name, job.job_id)
            self.broker.ack(delivery)
            return
        attempt = delivery.delivery_count + 1
        if attempt > self.settings.max_attempts:
            self._give_up(delivery, job, attempt - 1,
                          f"no result after {attempt - 1} attempts: the job crashed or hung every worker "
                          "that took it")
            return

        log.info("Worker[%s] started Job[%d] (music %d, chunk %d, attempt %d)", self.name, job.job_id,
                 job.music_id, job.chunk, attempt)
        self._current = job
        self._announce("busy")
        self._maybe_simulate_fault()
        started = time.monotonic()
        try:
            if job.kind != "separate":
                raise ModelUnavailable(f"this worker does not know the job kind {job.kind!r}")
            cancelled = lambda: job.music_id <= self._cancelled_up_to  # noqa: E731
            out_start, output = run_job(self._model(job.model), job, should_stop=cancelled)
            self._slow_down(time.monotonic() - started, cancelled)
        except JobCancelled:
            log.info("Worker[%s] stopped Job[%d]: its song was reset", self.name, job.job_id)
            self.broker.ack(delivery)
        except ModelUnavailable as exc:
            self._give_up(delivery, job, attempt, str(exc))
        except Exception as exc:
            log.exception("Worker[%s] - Job[%d] failed (attempt %d)", self.name, job.job_id, attempt)
            self._report(FailureMessage(job.music_id, job.job_id, job.song_token, self.name, attempt,
                                        f"{type(exc).__name__}: {exc}", True, job.attempt_token))
            self.broker.nack(delivery, requeue=False)  # the server decides whether it runs again
        else:
            seconds = time.monotonic() - started
            result = ResultMessage(job.music_id, job.job_id, job.song_token, self.name, attempt, out_start,
                                   tuple(self._model(job.model).sources), int(seconds * 1000), output,
                                   job.attempt_token)
            self.broker.send(self.broker.destinations.results_route, result.body(), result.headers())
            self.broker.ack(delivery)
            self._jobs_done += 1
            self._job_seconds += seconds
            log.info("Worker[%s] finished Job[%d] - job time: %.2f[s] - ACK", self.name, job.job_id, seconds)
        finally:
            self._current = None
            self._announce("idle")

    def _slow_down(self, seconds: float, cancelled) -> None:
        """WORKER_SLOWDOWN: act as a machine that many times slower (benchmarks, fault tests)."""
        deadline = time.monotonic() + (self.settings.worker_slowdown - 1) * seconds
        while time.monotonic() < deadline:
            if cancelled():
                raise JobCancelled()
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _give_up(self, delivery: Delivery, job: JobMessage, attempt: int, reason: str) -> None:
        log.error("Worker[%s] - Job[%d] failed for good: %s", self.name, job.job_id, reason)
        self._report(FailureMessage(job.music_id, job.job_id, job.song_token, self.name, attempt, reason, True,
                                    job.attempt_token))
        self.broker.nack(delivery, requeue=False)

    def _report(self, failure: FailureMessage) -> None:
        self.broker.send(self.broker.destinations.results_route, b"", failure.headers())

    def _on_control(self, delivery: Delivery) -> None:
        try:
            message = decode(delivery.headers, delivery.body)
        except MalformedMessage as exc:
            log.warning("Worker[%s] ignored a control message: %s", self.name, exc)
            return
        if not isinstance(message, ControlMessage) or not message.music_ids:
            return
        wanted = max(message.music_ids)
        up_to = min(wanted, self._highest_seen)  # nothing beyond the songs this worker has seen
        if wanted > up_to:
            log.warning("Worker[%s] - reset up to song %d goes beyond the highest song seen (%d); "
                        "applied up to %d only", self.name, wanted, self._highest_seen, up_to)
        if up_to > self._cancelled_up_to:
            self._cancelled_up_to = up_to
            log.info("Worker[%s] - reset: dropping work on songs up to %d", self.name, self._cancelled_up_to)

    # -- fault simulation ------------------------------------------------------------------

    def _maybe_simulate_fault(self) -> None:
        """An unhealthy worker dies (or freezes) WORKER_SIMULATE_CRASH_AFTER seconds into its work."""
        if self.simulate is None:
            return
        mode, self.simulate = self.simulate, None  # arm once

        def fault() -> None:
            job = self._current
            doing = f"mid-Job[{job.job_id}]" if job else "while idle"
            log.warning("Worker[%s] - simulating a %s %s", self.name, mode, doing)
            os.kill(os.getpid(), signal.SIGKILL if mode == "crash" else signal.SIGSTOP)

        timer = threading.Timer(self.settings.worker_simulate_crash_after, fault)
        timer.daemon = True
        timer.start()

    # -- presence -----------------------------------------------------------------------------

    def _announce(self, state: str) -> None:
        job = self._current
        presence = PresenceMessage(
            worker=self.name, host=socket.gethostname(), address=self.broker.local_address, pid=os.getpid(),
            state=state, job_id=job.job_id if job else None, music_id=job.music_id if job else None,
            jobs_done=self._jobs_done,
            mean_job_seconds=round(self._job_seconds / self._jobs_done, 3) if self._jobs_done else None,
            model=self.settings.model, sent_at=time.time(), session=self.session, device=self.device,
        )
        try:
            self.broker.send(self.broker.destinations.presence, presence.body(), presence.headers(),
                             confirm=False, persistent=False, timeout=1)
        except Exception:  # presence is best effort; the job path never waits on it
            log.debug("presence not sent", exc_info=True)

    def _announce_loop(self) -> None:
        interval = self.settings.broker_heartbeat_ms / 1000
        while not self._stopping.wait(interval):
            self._announce("busy" if self._current else "idle")
