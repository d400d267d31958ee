"""The inbound half of the server: results and presence from the broker → check → store → merge.

Results are handled one at a time on a thread of their own (the broker's receiver
thread only enqueues them). Whatever arrives is checked by the schema first, then
against the job it claims to answer (an outstanding attempt token of that job's task);
a result's bytes are then read from the data store (src/data: the worker stored them
through the job's result reference) and must have the size and SHA-256 the message names;
then they are checked by the job's kind (`Kind.check`: the shape a separation job implies, the frames and
codec a transcoded chunk must have). A message that is not ours is parked on the dead
queue with the reason in its `x-refused-reason` header, logged once and counted in
/metrics; nothing raises out of the loop.

A result the kind refuses (a corrupt chunk) counts as a failed attempt of its job: the
job is published again, and after MAX_ATTEMPTS its task fails with the reason. A result
that passes is kept by the kind under the task's folder, recorded in the store, and only
then ACKed; a result for a job already done changes nothing and is ACKed too, so a job
that ran twice is applied once. When a task's last job is in, the kind merges the
results on a merge thread so other tasks' results keep flowing. A result whose handling
itself fails (a full disk) is requeued, and parked once the results queue's delivery
count says it was tried MAX_ATTEMPTS times. A failure report counts one failed attempt;
the store, not the worker, decides whether the job is published again or its task fails.

Every result and presence message names the broker login that sent it by its routing key
(`{p}.results.{login}`, which only that login may publish: src/messaging/destinations.py);
one that came any other way is refused. With VERIFY_REPLICAS a login votes once per job,
whatever worker names it announces, so replicas defend against as many hosts as hold
logins of their own. Each accepted result also lowers the task's `verified` fact to what
it passed (`cache.Verification`), which the results cache keeps with the task.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from src.messaging.broker import Delivery
from src.messaging.schema import (
    ControlMessage,
    Expected,
    FailureMessage,
    MalformedMessage,
    PresenceMessage,
    ResultMessage,
    clean_text,
    decode,
    reply_mismatch,
)
from src.server import cache
from src.server.cache import Verification
from src.server.pipeline import Pipeline
from src.server.presence import WorkerRegistry
from src.server.store import Spent

log = logging.getLogger("server")


class Collector:
    def __init__(self, pipeline: Pipeline, on_workers: Callable[[list[dict]], None] = lambda workers: None):
        self.p = pipeline
        self.settings = pipeline.settings
        self.store = pipeline.store
        self.broker = pipeline.broker
        self.metrics = pipeline.metrics
        self.on_workers = on_workers  # the live worker list, every second (the page's panel)
        self.workers = WorkerRegistry(self.settings.broker_heartbeat_ms, self._job_started, self._worker_gone,
                                      self.metrics.presence_dropped.inc)
        self.presence_refused = 0
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        self._merger = ThreadPoolExecutor(1, thread_name_prefix="merge")
        self._last_progress: dict[int, int] = {}
        # worker -> (task, job, fraction done) of the job it runs, from its presence (job_progress)
        self._in_flight: dict[str, tuple[int, int, float]] = {}
        self._shown_running: dict[int, float] = {}  # task -> running worth last pushed to the page
        self._stopped = threading.Event()
        pipeline.job_done = self.job_done
        pipeline.running = self.running

    def start(self) -> None:
        d = self.broker.destinations
        # two in hand: one being stored, one arriving (a result message is a few hundred bytes;
        # its bytes are read from the data store while it is handled). Through the results
        # route: this subscription declares the results queue and binds
        # it to the routing key workers may publish to (destinations.py)
        self.broker.subscribe(d.results_binding, self._inbox.put, prefetch=2)
        self.broker.subscribe(d.presence_binding, self._on_presence, ack="auto")
        threading.Thread(target=self._results_loop, name="results", daemon=True).start()
        threading.Thread(target=self._watch_workers, name="workers", daemon=True).start()
        for task in self.store.tasks():  # a restart may have stopped between last result and merge
            done, total = self.store.progress(task.id)
            if task.state == "running" and total and done == total:
                self._merger.submit(self._merge, task.id)

    def ask_presence(self) -> None:
        """Ask every worker to announce itself now: workers that started before this server
        would otherwise appear only at their next heart-beat."""
        self.broker.send(self.broker.destinations.control, b"", ControlMessage("announce").headers(),
                         persistent=False)

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
        log.warning("Refused a message on the results queue (%s); parked on the dead queue", clean_text(reason))
        self.metrics.refused_messages.inc()
        self.metrics.parked_messages.labels("results").inc()
        self.broker.park(delivery, reason, self.broker.destinations.results)

    def _expected(self, message: ResultMessage | FailureMessage) -> Expected | str:
        """What the message's job expects, or why there is no such outstanding job."""
        job = self.store.job(message.job_id)
        task = self.store.task(job.task_id) if job is not None else None
        if job is None or task is None:
            return f"Job[{message.job_id}] does not exist"
        return Expected(task.kind, task.id, task.token, job.attempt_tokens)

    def _handle(self, delivery: Delivery) -> None:
        login = self.broker.destinations.sender(delivery.headers, "results")
        if login is None:
            return self._refuse(delivery, "not sent on a worker login's own results route: no broker login vouches "
                                          "for it")
        try:
            message = decode(delivery.headers, delivery.body)
        except MalformedMessage as exc:
            return self._refuse(delivery, str(exc))
        if not isinstance(message, ResultMessage | FailureMessage):
            return self._refuse(delivery, f"a {type(message).__name__} does not belong on the results queue")
        expected = self._expected(message)
        problem = expected if isinstance(expected, str) else reply_mismatch(message, expected)
        if problem is None and self.workers.login_of(message.worker) not in (None, login):
            problem = f"Worker[{message.worker}] belongs to another broker login than the sender's"
        if problem is not None:
            return self._refuse(delivery, problem)
        job = self.store.job(message.job_id)
        task = self.store.task(job.task_id)
        if task.state not in ("running", "done"):
            log.info("Dropped a late message for Job[%d]: Task[%d] is %s", job.id, task.id, task.state)
            return self.broker.ack(delivery)
        if job.state == "done" and isinstance(message, ResultMessage):
            # a late copy (a redelivery, or the old copy of a re-published job): harmless, not hostile
            self.metrics.duplicate_results.inc()
            log.info("JobDoneMsg[%d] - duplicate from Worker[%s] ignored - ACK", job.id, message.worker)
            return self.broker.ack(delivery)

        if isinstance(message, ResultMessage):  # the claim check: its bytes are in the data store
            stored = self._stored(job.id, message)
            if isinstance(stored, str):
                return self._refuse(delivery, stored)
            message = replace(message, payload=stored)

        kind, view, job_view = self.p.kind(task.kind), self.p.view(task), self.p.job_view(job)
        if isinstance(message, ResultMessage):
            with self.metrics.serial.phase(task.id, task.kind, "check"):  # the server's own work (serial.py)
                refused = kind.check(view, job_view, message.params, message.payload)
            if refused is not None:
                log.warning("JobDoneMsg[%d] - from Worker[%s] refused by the %s check: %s", job.id, message.worker,
                            task.kind, clean_text(refused))
                self.metrics.results_refused.inc()
                return self._failed(delivery, task, job, message.worker, message.attempt_token,
                                    f"result refused: {refused}")
        else:
            log.warning("JobFailedMsg[%d] - on Worker[%s]: %s", job.id, message.worker, message.error)
            return self._failed(delivery, task, job, message.worker, message.attempt_token, message.error)

        if self.settings.verify_replicas > 1 and not self._majority(task, job, message, login):
            return self.broker.ack(delivery)  # this copy is counted; the job waits for more votes

        with self.metrics.serial.phase(task.id, task.kind, "check"):
            kind.keep(view, job_view, message.params, message.payload)
        spent = Spent(version=message.version, cpu_ms=message.cpu_ms, joules=message.energy_mj / 1000,
                      energy_source=message.energy_source, result_bytes=len(message.payload))
        applied = self.store.record_result(job.id, message.worker, message.compute_ms, spent)
        self.broker.ack(delivery)
        if not applied:
            self.metrics.duplicate_results.inc()
            return
        passed = Verification.of(self.settings)
        self._passed(task.id, passed)
        if job.digest:
            self.p.cache.keep_job(job.digest, message.version, message.params, message.payload, passed)
        self.metrics.jobs_done.inc()
        self.metrics.jobs_accepted.labels(task.kind).inc()
        self.metrics.job_seconds.observe(message.compute_ms / 1000)
        self.metrics.job_joules.labels(task.kind, message.energy_source).inc(message.energy_mj / 1000)
        self.metrics.job_cpu_seconds.labels(task.kind).inc(message.cpu_ms / 1000)
        if message.attempt > 1 or job.publications > 1:
            self.metrics.jobs_redelivered.inc()
        log.info("JobDoneMsg[%d] - ACK - job time: %.2f[s] (Worker[%s], attempt %d)", job.id,
                 message.compute_ms / 1000, message.worker, message.attempt)
        self.job_done(task.id)

    def _stored(self, job_id: int, message: ResultMessage) -> bytes | str:
        """The result an attempt stored through its result reference, when it is the one the message
        names (size and SHA-256); else why not. Another copy of the same attempt (a redelivered
        job) may have replaced it since: only a message that names what is there is applied."""
        body = self.p.data.get_result(job_id, message.attempt_token)
        if body is None:
            return f"no result of Job[{job_id}] for that attempt is in the data store"
        if len(body) != message.result_size or hashlib.sha256(body).hexdigest() != message.result_sha256:
            return (f"the stored result of Job[{job_id}] ({len(body)} bytes) is not the one the message names "
                    f"({message.result_size} bytes and its SHA-256)")
        return body

    def job_done(self, task_id: int) -> None:
        """A job of the task is done (here, or served from the cache by the publisher): progress,
        and the merge once it was the last."""
        task = self.store.task(task_id)
        if task is None:
            return
        done, total = self.store.progress(task.id)
        percent = int(100 * done / total)
        if self._last_progress.get(task.id) != percent:
            self._last_progress[task.id] = percent
            log.info("Task[%d] - Progress: %d%%", task.id, percent)
        self.p.changed(task.id)
        if done == total and task.state == "running":
            self._merger.submit(self._merge, task.id)

    def _passed(self, task_id: int, passed: Verification) -> None:
        """A result of the task was accepted under `passed`: the task's `verified` fact becomes the
        weakest verification any of its results passed (settings may change across a restart)."""
        task = self.store.task(task_id)
        before = task.facts.get("verified") if task is not None else None
        now = passed if before is None else Verification.from_dict(before).weakest(passed)
        if task is not None and now.as_dict() != before:
            self.store.update_facts(task_id, {"verified": now.as_dict()})

    def _majority(self, task, job, message: ResultMessage, login: str) -> bool:
        """VERIFY_REPLICAS: count this copy's checksum; True once a majority of the replicas agree
        on it. A copy that decides nothing is settled, and once every copy is in without a
        majority, one more is published. A broker login votes once per job, whatever worker
        names it announces: one host that runs (or pretends to run) many workers is one vote."""
        replicas = self.settings.verify_replicas
        # the body alone: a result's params may hold figures of the run (faceblur's milliseconds
        # per frame) that differ between honest workers; the kind's check already held them to the plan
        checksum = hashlib.sha256(message.payload).hexdigest()
        repeated = self.store.voted(job.id, login)
        tally = self.store.vote(job.id, login, checksum)
        if not repeated and tally[checksum] >= replicas // 2 + 1:
            outvoted = sum(count for other, count in tally.items() if other != checksum)
            self.metrics.results_outvoted.inc(outvoted)
            log.info("JobDoneMsg[%d] - %d of %d replicas agree%s", job.id, tally[checksum], replicas,
                     f"; {outvoted} outvoted" if outvoted else "")
            return True
        log.info("JobDoneMsg[%d] - from Worker[%s] (login %s): %s (votes %s)", job.id, message.worker, login,
                 "a second copy from the same login counts once" if repeated else "no majority yet",
                 sorted(tally.values(), reverse=True))
        # a copy from a worker that already voted costs the job none of its attempts: it only
        # took longer for another worker to be free
        verdict = self.store.close_copy(job.id, message.worker, message.attempt_token,
                                        replicas + self.settings.max_attempts, counts=not repeated)
        if verdict == "failed" and self.store.mark_failed(
                task.id, f"job {job.id} (chunk {job.chunk}): no {replicas // 2 + 1} of {replicas} replicas agree "
                f"after {job.publications} copies (a broker login votes once: replicas need as many worker logins)"):
            self.metrics.task_ended(self.store, task.id)
            self.p.changed(task.id)
        elif verdict == "retry":
            self.p.wake_publisher()
        return False

    def _failed(self, delivery: Delivery, task, job, worker: str, token: str, error: str) -> None:
        """One failed attempt of a job: the store decides between another attempt and failing the task."""
        self.metrics.jobs_failed.inc()
        verdict = self.store.record_failure(job.id, worker, token, error, self.settings.max_attempts)
        reason = f"job {job.id} (chunk {job.chunk}) failed after {job.publications} attempt(s): {error}"
        if verdict == "failed" and self.store.mark_failed(task.id, reason):
            log.error("Task[%d] - failed: %s", task.id, reason)
            self.metrics.task_ended(self.store, task.id)
            self.p.changed(task.id)
        elif verdict == "retry":
            self.metrics.jobs_republished.inc()
            self.p.wake_publisher()
            log.info("Task[%d] - Job[%d] will be published again (attempt %d of %d)", task.id, job.id,
                     job.publications + 1, self.settings.max_attempts)
        self.broker.ack(delivery)

    def _merge(self, task_id: int) -> None:
        task = self.store.task(task_id)
        if task is None or task.state != "running":
            return
        started = time.monotonic()
        jobs = [self.p.job_view(job) for job in self.store.jobs(task_id)]
        kind, view = self.p.kind(task.kind), self.p.view(task)
        try:
            with self.metrics.serial.phase(task_id, task.kind, "merge"):
                stats = kind.merge(view, jobs)
        except FileNotFoundError:
            if self.store.task(task_id) is None:
                return  # deleted while merging
            raise
        except Exception as exc:
            log.exception("Task[%d] - merge failed", task_id)
            if self.store.mark_failed(task_id, f"merging the results failed: {type(exc).__name__}: {exc}"):
                self.metrics.task_ended(self.store, task_id)
            self.p.changed(task_id)
            return
        timing = {**task.facts.get("timing", {}), "merge_seconds": round(time.monotonic() - started, 3)}
        stats = {**stats, **self._costs(task_id, stats), "timing": timing}
        # the server's own CPU and wall seconds by phase beside the workers' (issue 22's serial share)
        stats["serial"] = self.metrics.serial.stats(task_id, self.store.spent(task_id)["cpu_seconds"])
        self.store.update_facts(task_id, {"stats": stats, "timing": timing, "waiting": None})
        self._keep_task(self.store.task(task_id), kind, view)  # before done: the same task again hits
        self.store.mark_done(task_id)
        self.metrics.task_ended(self.store, task_id)
        log.info("Task[%d] - merge time: %.2f[s]", task_id, timing["merge_seconds"])
        log.info("Task[%d] - total time: %.2f[s]", task_id, time.time() - (task.started_at or task.created_at))
        self.p.changed(task_id)

    def _costs(self, task_id: int, stats: dict) -> dict:
        """What the task's jobs cost and carried, for its stats: energy, cache hits, broker bytes."""
        spent = self.store.spent(task_id)
        sources = spent["sources"]
        energy = {"joules": round(spent["joules"], 3), "cpu_seconds": round(spent["cpu_seconds"], 3),
                  # every figure says how it was known; a task whose jobs all came from the cache cost none
                  "source": sources[0] if len(sources) == 1 else ("mixed" if sources else "cached")}
        if stats.get("frames"):
            energy["joules_per_frame"] = round(spent["joules"] / stats["frames"], 6)
        costs = {"energy": energy, "cache": {"task": False, "jobs": spent["cached"], "of": spent["jobs"]},
                 "broker_bytes": {"jobs": spent["job_bytes"], "results": spent["result_bytes"]},
                 # the software, device class and precision every job ran with (None: not one)
                 "software": spent["version"]}
        # what the results passed, truthfully: the weakest of its jobs' (a job served from the cache
        # passed at least what this server requires, or the cache would not have served it)
        task = self.store.task(task_id)
        passed = task.facts.get("verified") if task is not None else None
        costs["verify"] = {"replicas": self.settings.verify_replicas, "source": "workers",
                           "passed": passed or Verification.of(self.settings).as_dict(),
                           # the vote is per broker login (the store's `worker` column holds it)
                           "outvoted": [{"job_id": o["job_id"], "login": o["worker"]}
                                        for o in self.store.outvoted(task_id)]}
        return costs

    def _keep_task(self, task, kind, view) -> None:
        """Keep a merged task in the results cache when all its jobs ran with one software version."""
        media = self.store.media(task.media_id)
        version = self.store.spent(task.id)["version"]
        if not self.p.cache.enabled or version is None or not media.probe.get("sha256"):
            return
        try:
            key = cache.task_key(task.kind, media.probe["sha256"], task.params, version)
            facts = {k: v for k, v in task.facts.items() if k not in ("waiting",)}
            passed = task.facts.get("verified")
            verified = Verification.from_dict(passed) if passed else Verification.of(self.settings)
            self.p.cache.keep_task(key, view.folder, kind.merged_files(view), facts, verified)
        except OSError:
            log.exception("Task[%d] - could not keep it in the results cache", task.id)

    # -- workers ------------------------------------------------------------------------

    def _on_presence(self, delivery: Delivery) -> None:
        """Presence runs on the broker's receiver thread: it must never raise nor block."""
        try:
            login = self.broker.destinations.sender(delivery.headers, "presence")
            if login is None:
                raise MalformedMessage("not sent on a worker login's own presence route: no broker login vouches "
                                       "for it")
            message = decode(delivery.headers, delivery.body)
            if not isinstance(message, PresenceMessage):
                raise MalformedMessage(f"a {type(message).__name__} does not belong on the presence topic")
            problem = self.workers.update(message, login)
            if problem is None:
                self._note_progress(message)
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
            log.warning("Refused presence message #%d (%s); parked on the dead queue", self.presence_refused,
                        clean_text(problem))
        try:
            self.broker.park(delivery, problem, self.broker.destinations.presence_binding, acknowledge=False)
        except Exception:
            log.debug("could not park a presence message", exc_info=True)

    def _note_progress(self, presence: PresenceMessage) -> None:
        """Keep how far a worker's running job is (receiver thread: dict writes only)."""
        if presence.state == "busy" and presence.job_id and presence.task_id:
            self._in_flight[presence.worker] = (presence.task_id, presence.job_id, presence.job_progress)
        else:
            self._in_flight.pop(presence.worker, None)

    def running(self, task_id: int) -> float:
        """Jobs' worth of the task done inside the jobs its workers are running now: the sum of their
        reported fractions, counting each job once and only while it is not done (a late presence
        after the result must not count the job twice)."""
        fractions: dict[int, float] = {}
        for task, job_id, fraction in list(self._in_flight.values()):
            if task == task_id:
                fractions[job_id] = max(fraction, fractions.get(job_id, 0.0))
        if not fractions:
            return 0.0
        return sum(fraction for job_id, fraction in fractions.items()
                   if (job := self.store.job(job_id)) is not None and job.task_id == task_id and job.state != "done")

    def _push_progress(self) -> None:
        """Tasks whose running jobs moved since the last push are announced to the page."""
        tasks = {task for task, _, _ in list(self._in_flight.values())} | set(self._shown_running)
        for task_id in tasks:
            worth = round(self.running(task_id), 2)
            if worth != self._shown_running.get(task_id, 0.0):
                self._shown_running[task_id] = worth
                self.p.changed(task_id)
            if worth == 0.0:
                self._shown_running.pop(task_id, None)

    def _job_started(self, worker: str, job_id: int, started_at: float) -> None:
        self.store.start_attempt(job_id, worker, min(started_at, time.time()))
        log.info("Worker[%s] started Job[%d]", worker, job_id)

    def _worker_gone(self, worker: str) -> None:
        self.store.end_attempts_of(worker, "lost")
        self._in_flight.pop(worker, None)
        log.warning("Worker[%s] - no heart-beat for two intervals; offline", worker)

    def _watch_workers(self) -> None:
        while not self._stopped.wait(1):
            try:
                self.workers.expire()
                snapshot = self.workers.snapshot()
                self.metrics.workers_alive.set(len(snapshot))
                self.metrics.workers_configured.set(self.settings.workers_configured)
                self.on_workers(snapshot)
                self._push_progress()
            except Exception:
                log.exception("Watching workers failed")
