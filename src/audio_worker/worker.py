"""One worker process: take a job from the broker, fetch its input, run it with its kind's runner,
store the result, send the result message, ACK.

The worker needs the broker and the data store its jobs name, nothing else: a job message
carries its params and two references (the claim check, src/data): a URL to GET its input
from (checked against the size and SHA-256 the job names) and one to PUT its result to.
Transfers resume after a cut connection and retry with backoff (src/data/client.py); a
reference the store refuses because the attempt is over (410) drops the job. The result
message, which carries the result's size and SHA-256 but not its bytes, is sent only once
the store has the whole result. It consumes the jobs queue of each kind in WORKER_KINDS
(default: every kind this host can run, `src.kinds.registry`), and of a kind with routes
only the routes its runner offers (transcode: the codecs its ffmpeg can encode), or those
WORKER_KINDS names as `kind/route`. It takes jobs with `ack: client-individual` and a
prefetch of WORKER_PREFETCH (1: it pulls a job only when free). Its result goes to the
results route with a receipt, and the job is ACKed only after the receipt came back, so
a worker that dies at any point leaves its job to the broker, which hands it to another.
Kinds are loaded when the worker starts, so a worker that does not run separation never
imports torch.

The worker logs in as BROKER_WORKER_USER, which may read jobs and control and write
results and presence, nothing else (src/messaging/accounts.py). It trusts nothing it
receives: a job is decoded by the schema and checked by its kind's runner
(`Runner.problem`) before anything else, anything that goes wrong with one job is
contained to that job, and no message can end the process.

Attempts are bounded with the jobs queue's delivery count: a job that has already
been delivered MAX_ATTEMPTS times (it crashed or hung every worker that took it) is
not run again. A failed, refused or exhausted job is reported on the results route
with its attempt token and NACKed without requeue, which parks it on the dead queue;
the server counts the failure and decides whether to publish the job again.

Control: a `reset` stops work on tasks up to the id it names, a `cancel` on the tasks it
names, but never beyond the highest task id this worker has seen in a job: a forged
control message cannot stop future tasks. An `announce` (a server that just started)
makes it publish its presence at once.

Presence: every heart-beat interval, and at every job start and end, the worker
publishes what it is doing, which kinds and routes it offers (with their software
versions), its cores and load on the presence topic; during a job whose runner counts its
frames, also how far the job is (`job_progress`), at most once a second.

Energy: each result says the CPU seconds the job took and its energy, measured (RAPL) or
estimated (CPU seconds x WATTS_PER_CORE), and which (see energy.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import signal
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import replace

import requests

from src.audio_worker.energy import EnergyMeter
from src.audio_worker.node import NodeProbe
from src.config import Settings
from src.data import client
from src.kinds import registry
from src.kinds.base import Cancelled, Runner, progress_to
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

log = logging.getLogger("worker")

REMEMBERED_CANCELS = 1000
PROGRESS_SECONDS = 1.0  # at most one presence message a second for a job's progress


def wanted(settings: Settings) -> dict[str, set[str] | None]:
    """WORKER_KINDS as kind -> the routes named (`kind/route`), None for every route the host can
    serve; every kind this host can run when it is empty. ValueError for a kind it cannot run."""
    chosen: dict[str, set[str] | None] = {}
    for entry in (e.strip() for e in settings.worker_kinds.split(",") if e.strip()):
        name, _, route = entry.partition("/")
        if name not in registry.names():
            raise ValueError(f"WORKER_KINDS names {name!r}; the kinds are {', '.join(registry.names())}")
        reason = registry.unavailable(name)
        if reason:
            raise ValueError(f"WORKER_KINDS names {name!r}, which this host cannot run: {reason}")
        if route and route not in registry.routes(name):
            raise ValueError(f"WORKER_KINDS names {entry!r}; {name}'s routes are {', '.join(registry.routes(name))}")
        if not route:
            chosen[name] = None
        elif chosen.get(name, set()) is not None:
            chosen.setdefault(name, set()).add(route)
    return chosen or {name: None for name in registry.runnable()}


def offers(runners: dict[str, Runner], chosen: dict[str, set[str] | None]) -> dict[str, str]:
    """"kind" or "kind/route" -> software version, for what this worker will take."""
    offered = {}
    for name, runner in runners.items():
        for route, version in runner.offers().items():
            if chosen[name] is None or route in chosen[name]:
                offered[f"{name}/{route}" if route else name] = version
        missing = (chosen[name] or set()) - set(runner.offers())
        if missing:
            raise ValueError(f"WORKER_KINDS names {name}/{sorted(missing)[0]}, which this host cannot serve")
    return offered


class Worker:
    def __init__(self, settings: Settings, simulate: str | None = None):
        self.settings = settings
        self.name = uuid.uuid4().hex[:7]
        self.simulate = simulate  # None, "crash", "hang" or "corrupt": see make workers
        self.session = uuid.uuid4().hex  # binds this process's presence messages (see presence.py)
        chosen = wanted(settings)
        self.kinds = list(chosen)
        self.runners: dict[str, Runner] = {name: registry.worker(name, settings) for name in self.kinds}
        self.offers = offers(self.runners, chosen)
        self.energy = EnergyMeter(settings.powercap_root, settings.watts_per_core)
        model_runner = next((r for r in self.runners.values() if hasattr(r, "device")), None)
        device = getattr(model_runner, "device", "cpu")  # "cuda:1": the GPU this worker was given
        self.device = device.split(":")[0]  # the class, as presence says it
        self.precision = getattr(model_runner, "precision", "")
        self.broker = Broker(settings, client_name=f"worker-{self.name}", role="worker")
        self.http = requests.Session()  # the data store's connections, kept between jobs
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        self._reset_up_to = 0  # tasks with ids up to this one were reset
        self._cancelled: deque[int] = deque(maxlen=REMEMBERED_CANCELS)
        self._highest_seen = 0  # the highest task id of a valid job this worker received
        self._current: JobMessage | None = None
        self._jobs_done = 0
        self._jobs_by_kind: dict[str, int] = {}
        self._job_seconds = 0.0
        self._job_progress = 0.0  # of the current job, as its runner reports it (kinds.base.report_progress)
        self._progress_sent = 0.0  # when a presence last carried it
        self.node = NodeProbe(gpu=device if self.device == "cuda" else None)
        self._stopping = threading.Event()

    # -- life cycle ---------------------------------------------------------------------

    def run(self) -> None:
        log.info("Worker[%s] starting: pid %d, offers %s, %d thread(s), model %s on %s", self.name, os.getpid(),
                 ",".join(self.offers), self.settings.threads_per_worker, self.settings.model, self.device)
        d = self.broker.destinations
        # A worker login of its own has no `configure` permission, so it consumes the jobs queues
        # that `make broker` (or the server) declared; one that shares the server's login
        # declares them as the server does, so workers may start before the first task.
        shared = self.settings.worker_login == self.settings.server_login
        for offer in self.offers:
            kind, _, route = offer.partition("/")
            destination = d.jobs(kind, route or None) if shared else d.worker_jobs(kind, route or None)
            self.broker.subscribe(destination, self._inbox.put, prefetch=self.settings.worker_prefetch)
        self.broker.subscribe(d.control, self._on_control, ack="auto")
        self.broker.connect()
        self._announce("idle")  # on the panel at once, not one heart-beat later
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

    # -- jobs -----------------------------------------------------------------------------

    def _handle(self, delivery: Delivery) -> None:
        """One delivery from a jobs queue, pooled with the jobs of the same kind already waiting in
        this worker's prefetch when its runner can run several at once (`run_many`: separation,
        whose segments then share a GPU's batches). Whatever they hold, the worker lives on."""
        pool = [checked for checked in [self._check(delivery)] if checked]
        if pool and hasattr(self.runners[pool[0][1].kind], "run_many"):
            while len(pool) < self.settings.worker_prefetch:
                try:
                    extra = self._inbox.get_nowait()
                except queue.Empty:
                    break
                checked = self._check(extra)
                if checked and checked[1].kind != pool[0][1].kind:
                    self._run([checked])  # another kind's job: on its own
                elif checked:
                    pool.append(checked)
        if not pool:
            return
        try:
            self._run(pool)
        except Exception:  # a bug here must cost these jobs, not the worker
            log.exception("Worker[%s] - Jobs %s failed unexpectedly; parked", self.name, [j.job_id for _, j in pool])
            for delivery, _ in pool:
                self.broker.nack(delivery, requeue=False)

    def _check(self, delivery: Delivery) -> tuple[Delivery, JobMessage] | None:
        """The job a delivery holds, checked by its kind's runner; None when it was refused."""
        try:
            job = decode(delivery.headers, delivery.body, kinds=self.kinds)
            if not isinstance(job, JobMessage):
                raise MalformedMessage(f"a {type(job).__name__} does not belong on the jobs queue")
            offer = f"{job.kind}/{job.route}" if job.route else job.kind
            if offer not in self.offers:
                raise MalformedMessage(f"this worker does not serve {offer}")
            job = self._fetch(delivery, job)
            if job is None:
                return None
            problem = self.runners[job.kind].problem(job.params, job.payload)
            if problem:
                raise MalformedMessage(problem)
        except MalformedMessage as exc:
            self._refuse(delivery, str(exc))
            return None
        except Exception as exc:
            log.exception("Worker[%s] - checking a job failed", self.name)
            self._refuse(delivery, f"{type(exc).__name__}: {exc}")
            return None
        return delivery, job

    def _fetch(self, delivery: Delivery, job: JobMessage) -> JobMessage | None:
        """The job with its input, fetched through its reference (here, on the job's thread, not
        the broker's receiver); None when the store says the attempt is over (the job is dropped).
        MalformedMessage when the input cannot be had: the job is refused and the server told."""
        try:
            payload = client.fetch(job.input_ref, job.input_size, job.input_sha256, self.http)
        except client.DataRefused as exc:
            if exc.status == 410:
                log.info("Worker[%s] dropped Job[%d]: %s", self.name, job.job_id, exc.reason)
                self.broker.ack(delivery)
                return None
            raise MalformedMessage(f"its input could not be fetched: {exc}") from None
        except client.DataUnavailable as exc:
            raise MalformedMessage(f"its input could not be fetched: {exc}") from None
        return replace(job, payload=payload)

    def _refuse(self, delivery: Delivery, reason: str) -> None:
        """Park an invalid job; if it names a job of ours, say why, so the server counts the failure."""
        log.warning("Worker[%s] refused a message on the jobs queue (%s); parked on the dead queue", self.name, reason)
        h = delivery.headers
        try:
            failure = FailureMessage(int(h["task-id"]), int(h["job-id"]), h["task-token"], h["attempt-token"],
                                     self.name, delivery.delivery_count + 1, f"refused by the worker: {reason}")
            decode(failure.headers(), b"")  # only a report the server can read
        except (KeyError, ValueError):
            failure = None
        if failure is not None:
            self._report(failure)
        self.broker.nack(delivery, requeue=False)

    def _stopped(self, task_id: int) -> bool:
        return task_id <= self._reset_up_to or task_id in self._cancelled

    def _admit(self, delivery: Delivery, job: JobMessage) -> bool:
        """Whether to run a checked job: not when its task was stopped or its attempts are spent."""
        self._highest_seen = max(self._highest_seen, job.task_id)
        if self._stopped(job.task_id):
            log.info("Worker[%s] dropped Job[%d]: its task was stopped", self.name, job.job_id)
            self.broker.ack(delivery)
            return False
        attempt = delivery.delivery_count + 1
        if attempt > self.settings.max_attempts:
            self._give_up(delivery, job, attempt - 1,
                          f"no result after {attempt - 1} attempts: the job crashed or hung every worker "
                          "that took it")
            return False
        log.info("Worker[%s] started Job[%d] (%s, task %d, chunk %d, attempt %d)", self.name, job.job_id, job.kind,
                 job.task_id, job.chunk, attempt)
        return True

    def _run(self, pool: list[tuple[Delivery, JobMessage]]) -> None:
        """Run checked jobs of one kind together; each is answered (result, failure or drop) and
        ACKed or parked on its own. Time and energy are shared out evenly among them."""
        pool = [(delivery, job) for delivery, job in pool if self._admit(delivery, job)]
        if not pool:
            return
        runner = self.runners[pool[0][1].kind]
        stops = [lambda job=job: self._stopped(job.task_id) for _, job in pool]
        self._current, self._job_progress = pool[0][1], 0.0
        self._announce("busy")
        fault = self._maybe_simulate_fault()
        started, spent = time.monotonic(), self.energy.start()
        try:
            if len(pool) == 1:
                with progress_to(self._progress):
                    outcomes = [self._outcome(lambda: runner.run(pool[0][1].params, pool[0][1].payload, stops[0]))]
            else:
                jobs = [(job.params, job.payload, stop) for (_, job), stop in zip(pool, stops, strict=True)]
                outcomes = runner.run_many(jobs)
            self._slow_down(started, self.energy.stop(spent).cpu_seconds, lambda: all(stop() for stop in stops))
        except Cancelled:
            outcomes = [Cancelled()] * len(pool)
        except Exception as exc:
            log.exception("Worker[%s] - Jobs %s failed", self.name, [job.job_id for _, job in pool])
            outcomes = [exc] * len(pool)
        seconds, energy = (time.monotonic() - started) / len(pool), self.energy.stop(spent)
        try:
            for (delivery, job), outcome in zip(pool, outcomes, strict=True):
                self._answer(delivery, job, outcome, fault, seconds, energy, len(pool))
                fault = None  # a simulated fault damages one result
        finally:
            self._current = None
            self._announce("idle")

    @staticmethod
    def _outcome(run):
        try:
            return run()
        except Exception as exc:  # Cancelled included: it is an outcome of this job alone
            return exc

    def _answer(self, delivery: Delivery, job: JobMessage, outcome, fault: str | None, seconds: float, energy,
                shared_by: int) -> None:
        attempt = delivery.delivery_count + 1
        if isinstance(outcome, Cancelled):
            log.info("Worker[%s] stopped Job[%d]: its task was stopped", self.name, job.job_id)
            self.broker.ack(delivery)
            return
        if isinstance(outcome, BaseException):
            log.error("Worker[%s] - Job[%d] failed (attempt %d): %s", self.name, job.job_id, attempt,
                      "".join(traceback.format_exception(outcome)).strip())
            self._give_up(delivery, job, attempt, f"{type(outcome).__name__}: {outcome}")
            return
        params, payload = outcome
        runner = self.runners[job.kind]
        if fault:
            log.warning("Worker[%s] - simulating a %s result for Job[%d]", self.name, fault, job.job_id)
            payload = runner.corrupt(payload) if fault == "corrupt" else runner.tamper(job.params, payload)
        version = self.offers[f"{job.kind}/{job.route}" if job.route else job.kind]
        try:  # the bytes go to the data store first; the message only names them
            client.upload(job.result_ref, payload, self.http)
        except client.DataRefused as exc:
            if exc.status == 410:
                log.info("Worker[%s] dropped the result of Job[%d]: %s", self.name, job.job_id, exc.reason)
                self.broker.ack(delivery)
                return
            self._give_up(delivery, job, attempt, f"storing its result was refused: {exc}")
            return
        except client.DataUnavailable as exc:
            self._give_up(delivery, job, attempt, f"its result could not be stored: {exc}")
            return
        result = ResultMessage(job.kind, job.task_id, job.job_id, job.task_token, job.attempt_token, self.name,
                               attempt, int(seconds * 1000), params, version=version,
                               cpu_ms=round(energy.cpu_seconds * 1000 / shared_by),
                               energy_mj=round(energy.joules * 1000 / shared_by), energy_source=energy.source,
                               result_size=len(payload), result_sha256=hashlib.sha256(payload).hexdigest())
        self.broker.send(self.broker.destinations.results_route, result.body(), result.headers())
        self.broker.ack(delivery)
        self._jobs_done += 1
        self._jobs_by_kind[job.kind] = self._jobs_by_kind.get(job.kind, 0) + 1
        self._job_seconds += seconds
        log.info("Worker[%s] finished Job[%d] - job time: %.2f[s] - ACK", self.name, job.job_id, seconds)

    def _slow_down(self, started: float, cpu_seconds: float, stopped) -> None:
        """WORKER_SLOWDOWN=N: act as a machine N times slower (benchmarks, fault tests).

        The job ends N times its compute after it started, the compute being its CPU time over
        its threads: what it takes on cores of its own. Waiting N-1 times the wall time instead
        multiplied every slowdown from sharing cores (other workers, the server) by N, so
        workers meant to be independent machines slowed each other down N-fold.
        """
        if self.settings.worker_slowdown <= 1:
            return
        compute = cpu_seconds / self.settings.threads_per_worker
        deadline = started + self.settings.worker_slowdown * compute
        while time.monotonic() < deadline:
            if stopped():
                raise Cancelled()
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _give_up(self, delivery: Delivery, job: JobMessage, attempt: int, reason: str) -> None:
        """Report a failed attempt and park the job; the server decides whether it runs again."""
        log.error("Worker[%s] - Job[%d] failed: %s", self.name, job.job_id, reason)
        self._report(FailureMessage.answering(job, self.name, attempt, reason))
        self.broker.nack(delivery, requeue=False)

    def _report(self, failure: FailureMessage) -> None:
        self.broker.send(self.broker.destinations.results_route, b"", failure.headers())

    def _on_control(self, delivery: Delivery) -> None:
        try:
            message = decode(delivery.headers, delivery.body)
        except MalformedMessage as exc:
            log.warning("Worker[%s] ignored a control message: %s", self.name, exc)
            return
        if isinstance(message, ControlMessage) and message.action == "announce":
            # a server that just started asks; presence is rate-limited there, so a forged ask costs nothing
            self._announce("busy" if self._current else "idle")
            return
        if not isinstance(message, ControlMessage) or not message.task_ids:
            return
        beyond = [i for i in message.task_ids if i > self._highest_seen]
        if beyond:
            log.warning("Worker[%s] - %s of task %d goes beyond the highest task seen (%d); not applied there",
                        self.name, message.action, max(beyond), self._highest_seen)
        if message.action == "cancel":
            for task_id in message.task_ids:
                if task_id <= self._highest_seen and task_id not in self._cancelled:
                    self._cancelled.append(task_id)
                    log.info("Worker[%s] - cancel: dropping work on task %d", self.name, task_id)
            return
        up_to = min(max(message.task_ids), self._highest_seen)
        if up_to > self._reset_up_to:
            self._reset_up_to = up_to
            log.info("Worker[%s] - reset: dropping work on tasks up to %d", self.name, self._reset_up_to)

    # -- fault simulation ------------------------------------------------------------------

    def _maybe_simulate_fault(self) -> str | None:
        """An unhealthy worker dies (or freezes) WORKER_SIMULATE_CRASH_AFTER seconds into its work,
        or returns a damaged or tampered result ("corrupt"/"tamper": do that to this one). Once."""
        if self.simulate is None:
            return None
        mode, self.simulate = self.simulate, None  # arm once
        if mode in ("corrupt", "tamper"):
            return mode

        def fault() -> None:
            job = self._current
            doing = f"mid-Job[{job.job_id}]" if job else "while idle"
            log.warning("Worker[%s] - simulating a %s %s", self.name, mode, doing)
            os.kill(os.getpid(), signal.SIGKILL if mode == "crash" else signal.SIGSTOP)

        timer = threading.Timer(self.settings.worker_simulate_crash_after, fault)
        timer.daemon = True
        timer.start()
        return None

    # -- presence -----------------------------------------------------------------------------

    def _progress(self, fraction: float) -> None:
        """The runner's word on the current job: sent with a presence message at most once a
        second (the server's presence rate allows five), so the page's progress moves within a job."""
        self._job_progress = fraction
        now = time.monotonic()
        if now - self._progress_sent >= PROGRESS_SECONDS:
            self._progress_sent = now
            self._announce("busy")

    def _announce(self, state: str) -> None:
        job, node = self._current, self.node.sample()
        presence = PresenceMessage(
            worker=self.name, host=socket.gethostname(), address=self.broker.local_address, pid=os.getpid(),
            state=state, job_id=job.job_id if job else None, task_id=job.task_id if job else None,
            jobs_done=self._jobs_done,
            mean_job_seconds=round(self._job_seconds / self._jobs_done, 3) if self._jobs_done else None,
            model=self.settings.model, sent_at=time.time(), session=self.session, device=self.device,
            kinds=tuple(self.kinds), offers=self.offers, cores=os.cpu_count() or 1, load=node.load,
            cpu_percent=node.cpu_percent, memory_bytes=node.memory_bytes, host_cpu_percent=node.host_cpu_percent,
            host_memory_percent=node.host_memory_percent, jobs_by_kind=dict(self._jobs_by_kind),
            heartbeat_ms=self.settings.broker_heartbeat_ms, broker=self.broker.node, precision=self.precision,
            gpu_memory_bytes=node.gpu_memory_bytes, gpu_memory_total_bytes=node.gpu_memory_total_bytes,
            gpu_percent=node.gpu_percent, job_progress=round(self._job_progress, 4) if job else 0.0,
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
