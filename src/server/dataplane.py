"""The server's half of the data plane (src/data): the store, its endpoint, who may use it, and cleaning up.

- `put_input` keeps a job's input in the store (DATA_STORE) at its first publication; the
  publisher then hands each publication references bound to its attempt token.
- `admit` is what the data endpoint asks before it serves a valid capability: the job
  and its task exist, the attempt token is one the server issued for that job and has
  not closed, the task has not ended and the job is not done. `limit` is the most bytes a
  job's result may have: its kind's `max_result_bytes` where the kind names one.
- `sweep` (at start) deletes what belongs to no task still going; `drop_ended` (each pass
  of the publisher) deletes the inputs and results of tasks that ended since (done,
  failed, cancelled, deleted, reset). The results cache keeps its own copies.
- With the server as the store, `start` serves the data endpoint on DATA_PORT on a thread
  of its own; with S3 there is nothing to serve.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from src.config import Settings
from src.data.capability import Refused
from src.data.endpoint import DataEndpoint, create_server
from src.data.local import ServerStore
from src.data.store import DEFAULT_RESULT_LIMIT, DataStore, open_store
from src.kinds.base import Kind
from src.server.store import ENDED, Store

log = logging.getLogger("server")


class DataPlane:
    def __init__(self, settings: Settings, store: Store, kind: Callable[[str], Kind]):
        self.settings = settings
        self.store = store
        self.kind = kind
        self.data: DataStore = open_store(settings)
        self._server = None
        self._thread: threading.Thread | None = None
        self._live: dict[int, set[int]] = {}  # task -> its jobs with data in the store (the publisher's)
        self._live_lock = threading.Lock()

    # -- serving ---------------------------------------------------------------------------

    def start(self) -> None:
        if not isinstance(self.data, ServerStore):
            return
        self._server = create_server(DataEndpoint(self.data, self.admit, self.limit), self.settings)
        self._thread = threading.Thread(target=self._server.run, name="data-endpoint", daemon=True)
        self._thread.start()
        log.info("Data endpoint on port %d; workers reach it at %s", self.settings.data_port,
                 self.settings.data_address)

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # the loop's poll holds the listening socket until it returns: a server started again
            # on the same port (a restart in-process) could not bind it before then
            self._thread.join(timeout=5)
            self._server = None

    def admit(self, job_id: int, attempt_token: str, direction: str) -> None:
        job = self.store.job(job_id)
        task = self.store.task(job.task_id) if job is not None else None
        if job is None or task is None:
            raise Refused(404, f"job {job_id} does not exist (its task was deleted?)")
        if task.state in ENDED:
            raise Refused(410, f"job {job_id}'s task is {task.state}")
        if attempt_token not in job.attempt_tokens:
            raise Refused(410, f"that attempt of job {job_id} is not outstanding")
        if job.state == "done":
            raise Refused(410, f"job {job_id} is done")

    def limit(self, job_id: int) -> int:
        job = self.store.job(job_id)
        task = self.store.task(job.task_id) if job is not None else None
        if task is None:
            return DEFAULT_RESULT_LIMIT
        return int(getattr(self.kind(task.kind), "max_result_bytes", DEFAULT_RESULT_LIMIT))

    # -- the publisher's side -------------------------------------------------------------

    def put_input(self, task_id: int, job_id: int, body: bytes) -> None:
        self.data.put_input(job_id, body)
        with self._live_lock:
            self._live.setdefault(task_id, set()).add(job_id)

    def refs(self, job_id: int, attempt_token: str) -> tuple[str, str]:
        """The input and result references of one attempt of a job."""
        return self.data.input_ref(job_id, attempt_token), self.data.result_ref(job_id, attempt_token)

    def get_result(self, job_id: int, attempt_token: str) -> bytes | None:
        return self.data.get_result(job_id, attempt_token)

    def sweep(self) -> int:
        """Delete what belongs to no task still going (a restart's leftovers); how many objects."""
        live: dict[int, set[int]] = {}
        for task in self.store.tasks():
            if task.state not in ENDED:
                jobs = {job.id for job in self.store.jobs(task.id)}
                if jobs:
                    live[task.id] = jobs
        with self._live_lock:
            self._live = live
        removed = self.data.sweep({job for jobs in live.values() for job in jobs})
        if removed:
            log.info("Deleted %d input(s) and result(s) of tasks that ended before this start", removed)
        return removed

    def drop_ended(self) -> None:
        """Delete the inputs and results of every task that ended since the last call."""
        with self._live_lock:
            tracked = list(self._live.items())
        for task_id, jobs in tracked:
            task = self.store.task(task_id)
            if task is not None and task.state not in ENDED:
                continue
            self.data.delete_jobs(jobs)
            with self._live_lock:
                self._live.pop(task_id, None)
