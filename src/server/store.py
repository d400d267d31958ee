"""The store: media, tasks, their outputs, their jobs and every job attempt, in SQLite.

Everything the server knows lives here (plus files beside it), so a server that is
killed and restarted picks up where it was. The tables are the backbone's and know no
kind: what a kind needs to remember (a task's decoded length, a job's range of frames)
is kept as JSON in `facts`. IDs are AUTOINCREMENT, so an ID is never reused, not even
after `/reset`, and a late message for a deleted task can't land on a new one. Each
method is one short transaction; the store is shared by threads.

A task's state: `waiting` (the karaoke façade made it at upload and waits for the
instruments to keep), `queued` (being prepared, or jobs not planned yet), `running`
(jobs planned), then `done`, `failed` or `cancelled`.

Attempts are the server's own count, not what workers say: each publication of a job
issues an attempt token (kept in `job.attempt_tokens` unless that copy failed) and counts
one attempt. A result or failure is accepted only with one of those tokens (a late copy of
a done job's result is a harmless duplicate); a failure closes its token, and the job is
published again or, after MAX_ATTEMPTS publications, fails its task. A job not done by
its deadline is published again too.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.kinds.base import Planned

# An absolute file path of two or more components (not a URL's "//host/..."): a task's or a job's
# error is shown through the API, and a server path there tells a client how this host is laid
# out and whether a file it named exists. The server's log keeps the whole text.
ABSOLUTE_PATH = re.compile(r"(?<![\w./~-])(?:/[^\s'\"/,;()\[\]]+){2,}")


def without_paths(error: str) -> str:
    """`error` with each absolute path cut to its last component ("…/name")."""
    return ABSOLUTE_PATH.sub(lambda match: "…/" + match.group(0).rsplit("/", 1)[1], error)

SCHEMA = """
CREATE TABLE IF NOT EXISTS media (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    duration REAL,
    probe TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS task (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    media_id INTEGER NOT NULL REFERENCES media(id) ON DELETE CASCADE,
    params TEXT NOT NULL,
    facts TEXT NOT NULL DEFAULT '{}',
    token TEXT NOT NULL,
    state TEXT NOT NULL,
    ready INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS output (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id INTEGER NOT NULL REFERENCES task(id) ON DELETE CASCADE,
    name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS job (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id INTEGER NOT NULL REFERENCES task(id) ON DELETE CASCADE,
    chunk INTEGER NOT NULL,
    facts TEXT NOT NULL,
    size INTEGER NOT NULL,
    seconds REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    worker TEXT,
    time_ms INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    queued_at REAL,
    done_at REAL,
    attempt_tokens TEXT NOT NULL DEFAULT '',
    publications INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    published_at REAL
);
CREATE TABLE IF NOT EXISTS vote (
    job_id INTEGER NOT NULL REFERENCES job(id) ON DELETE CASCADE,
    worker TEXT NOT NULL,
    checksum TEXT NOT NULL,
    PRIMARY KEY (job_id, worker)
);
CREATE TABLE IF NOT EXISTS attempt (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES job(id) ON DELETE CASCADE,
    task_id INTEGER NOT NULL,
    worker TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    outcome TEXT NOT NULL DEFAULT 'running'
);
CREATE INDEX IF NOT EXISTS task_media ON task(media_id);
CREATE INDEX IF NOT EXISTS job_task ON job(task_id);
CREATE INDEX IF NOT EXISTS job_state ON job(state);
CREATE INDEX IF NOT EXISTS attempt_job ON attempt(job_id);
CREATE INDEX IF NOT EXISTS output_task ON output(task_id);
"""

# Columns added after the first release: a database made before them gets them on open.
ADDED_COLUMNS = {
    "job": {
        "digest": "TEXT",  # sha256 of the job's kind, params and input: with a version, its cache key
        "version": "TEXT",  # the software that computed its result (or the cached result)
        "cached": "INTEGER NOT NULL DEFAULT 0",  # its result came from the cache: no worker ran it
        "cpu_ms": "INTEGER",
        "joules": "REAL",
        "energy_source": "TEXT",
        "result_bytes": "INTEGER",
    },
}

ACTIVE = ("queued", "running")  # states in which a task's jobs may run
ENDED = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class MediaRow:
    id: int
    name: str
    size: int
    duration: float | None
    probe: dict[str, Any]  # video, audio, tags
    created_at: float


@dataclass(frozen=True)
class Task:
    id: int
    kind: str
    media_id: int
    params: dict[str, Any]
    facts: dict[str, Any]
    token: str
    state: str
    ready: bool  # prepared: it can be cut into jobs
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


@dataclass(frozen=True)
class Spent:
    """What one accepted result cost, as its worker reported it (or nothing: from the cache)."""

    version: str | None = None
    cached: bool = False
    cpu_ms: int | None = None
    joules: float | None = None
    energy_source: str | None = None
    result_bytes: int | None = None


@dataclass(frozen=True)
class OutputRow:
    id: int
    task_id: int
    name: str


@dataclass(frozen=True)
class Job:
    id: int
    task_id: int
    chunk: int
    facts: dict[str, Any]
    size: int
    seconds: float
    state: str
    worker: str | None
    time_ms: int | None
    attempts: int
    error: str | None
    queued_at: float | None
    done_at: float | None
    attempt_tokens: frozenset[str]
    publications: int
    failures: int
    published_at: float | None
    digest: str | None = None
    version: str | None = None
    cached: int = 0
    cpu_ms: int | None = None
    joules: float | None = None
    energy_source: str | None = None
    result_bytes: int | None = None


def _media(row: sqlite3.Row) -> MediaRow:
    data = dict(row)
    data["probe"] = json.loads(data["probe"])
    return MediaRow(**data)


def _task(row: sqlite3.Row) -> Task:
    data = dict(row)
    data["params"], data["facts"] = json.loads(data["params"]), json.loads(data["facts"])
    data["ready"] = bool(data["ready"])
    return Task(**data)


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["facts"] = json.loads(data["facts"])
    data["attempt_tokens"] = frozenset(data["attempt_tokens"].split())
    return Job(**data)


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        for table, columns in ADDED_COLUMNS.items():
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns.items():
                if name not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, query: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(query, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- media -----------------------------------------------------------------------

    def create_media(self, name: str, size: int, duration: float | None, probe: dict[str, Any]) -> MediaRow:
        with self._tx() as db:
            media_id = db.execute("INSERT INTO media (name, size, duration, probe, created_at) VALUES (?,?,?,?,?)",
                                  (name, size, duration, json.dumps(probe), time.time())).lastrowid
        return self.media(media_id)

    def media(self, media_id: int) -> MediaRow | None:
        rows = self._rows("SELECT * FROM media WHERE id = ?", (media_id,))
        return _media(rows[0]) if rows else None

    def all_media(self) -> list[MediaRow]:
        return [_media(r) for r in self._rows("SELECT * FROM media ORDER BY id")]

    def delete_media(self, media_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM attempt WHERE task_id IN (SELECT id FROM task WHERE media_id = ?)", (media_id,))
            db.execute("DELETE FROM media WHERE id = ?", (media_id,))  # tasks, outputs and jobs cascade

    # -- tasks -----------------------------------------------------------------------

    def create_task(self, kind: str, media_id: int, params: dict[str, Any], token: str, state: str,
                    outputs: Sequence[str]) -> Task:
        with self._tx() as db:
            task_id = db.execute(
                "INSERT INTO task (kind, media_id, params, token, state, created_at) VALUES (?,?,?,?,?,?)",
                (kind, media_id, json.dumps(params), token, state, time.time())).lastrowid
            db.executemany("INSERT INTO output (task_id, name) VALUES (?, ?)", [(task_id, n) for n in outputs])
        return self.task(task_id)

    def task(self, task_id: int) -> Task | None:
        rows = self._rows("SELECT * FROM task WHERE id = ?", (task_id,))
        return _task(rows[0]) if rows else None

    def tasks(self, kind: str | None = None) -> list[Task]:
        if kind is None:
            return [_task(r) for r in self._rows("SELECT * FROM task ORDER BY id")]
        return [_task(r) for r in self._rows("SELECT * FROM task WHERE kind = ? ORDER BY id", (kind,))]

    def tasks_of(self, media_id: int) -> list[Task]:
        return [_task(r) for r in self._rows("SELECT * FROM task WHERE media_id = ? ORDER BY id", (media_id,))]

    def outputs(self, task_id: int) -> list[OutputRow]:
        return [OutputRow(**dict(r)) for r in self._rows("SELECT * FROM output WHERE task_id = ? ORDER BY id",
                                                          (task_id,))]

    def set_params(self, task_id: int, params: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("UPDATE task SET params = ? WHERE id = ?", (json.dumps(params), task_id))

    def update_facts(self, task_id: int, facts: dict[str, Any]) -> None:
        """Merge `facts` into the task's facts."""
        with self._tx() as db:
            self._merge_facts(db, task_id, facts)

    def mark_prepared(self, task_id: int, facts: dict[str, Any]) -> None:
        """The kind prepared the task: its facts, and ready to plan, in one step."""
        with self._tx() as db:
            self._merge_facts(db, task_id, facts)
            db.execute("UPDATE task SET ready = 1 WHERE id = ?", (task_id,))

    @staticmethod
    def _merge_facts(db: sqlite3.Connection, task_id: int, facts: dict[str, Any]) -> None:
        row = db.execute("SELECT facts FROM task WHERE id = ?", (task_id,)).fetchone()
        if row is not None:
            db.execute("UPDATE task SET facts = ? WHERE id = ?", (json.dumps({**json.loads(row[0]), **facts}), task_id))

    def request(self, task_id: int) -> None:
        """A task asked to run (again): queued, its jobs planned once it is prepared."""
        with self._tx() as db:
            db.execute("UPDATE task SET state = 'queued', error = NULL, started_at = ?, finished_at = NULL "
                       "WHERE id = ?", (time.time(), task_id))

    def start_jobs(self, task_id: int, planned: Sequence[Planned]) -> None:
        """Record the task's jobs as pending (not yet on the broker) and the task as running."""
        with self._tx() as db:
            db.execute("DELETE FROM job WHERE task_id = ?", (task_id,))  # a failed task starts over
            db.execute("UPDATE task SET state = 'running', error = NULL WHERE id = ?", (task_id,))
            db.executemany(
                "INSERT INTO job (task_id, chunk, facts, size, seconds) VALUES (?,?,?,?,?)",
                [(task_id, chunk, json.dumps(p.facts), p.size, p.seconds) for chunk, p in enumerate(planned)],
            )

    def mark_done(self, task_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE task SET state = 'done', finished_at = ? WHERE id = ?", (time.time(), task_id))

    def mark_failed(self, task_id: int, error: str) -> bool:
        """Fail a task that has not ended yet; False if it had."""
        with self._tx() as db:
            return db.execute(
                "UPDATE task SET state = 'failed', error = ?, finished_at = ? WHERE id = ? "
                "AND state NOT IN ('done', 'failed', 'cancelled')",
                (without_paths(error), time.time(), task_id)).rowcount == 1

    def mark_cancelled(self, task_id: int) -> bool:
        with self._tx() as db:
            changed = db.execute(
                "UPDATE task SET state = 'cancelled', finished_at = ? WHERE id = ? "
                "AND state NOT IN ('done', 'failed', 'cancelled')", (time.time(), task_id)).rowcount == 1
            db.execute("UPDATE attempt SET outcome = 'cancelled', ended_at = ? WHERE task_id = ? "
                       "AND outcome = 'running'", (time.time(), task_id))
            return changed

    def delete_task(self, task_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM attempt WHERE task_id = ?", (task_id,))
            db.execute("DELETE FROM task WHERE id = ?", (task_id,))  # outputs and jobs cascade

    def delete_everything(self) -> None:
        with self._tx() as db:
            for table in ("vote", "attempt", "job", "output", "task", "media"):
                db.execute(f"DELETE FROM {table}")

    # -- jobs --------------------------------------------------------------------------

    def jobs(self, task_id: int | None = None, state: str | None = None) -> list[Job]:
        query, args = "SELECT * FROM job WHERE 1=1", []
        if task_id is not None:
            query, args = query + " AND task_id = ?", [*args, task_id]
        if state is not None:
            query, args = query + " AND state = ?", [*args, state]
        return [_job(r) for r in self._rows(query + " ORDER BY id", args)]

    def job(self, job_id: int) -> Job | None:
        rows = self._rows("SELECT * FROM job WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def job_ids(self) -> list[int]:
        return [r[0] for r in self._rows("SELECT id FROM job ORDER BY id")]

    def issue_attempt(self, job_id: int, token: str) -> None:
        """Record a new publication of a job, with the token its result must echo."""
        with self._tx() as db:
            db.execute("UPDATE job SET attempt_tokens = trim(attempt_tokens || ' ' || ?), "
                       "publications = publications + 1, attempts = publications + 1, published_at = ? "
                       "WHERE id = ? AND state != 'done'", (token, time.time(), job_id))

    def republish(self, job_id: int) -> bool:
        """Queue a job again (it missed its deadline); False if it is no longer queued."""
        with self._tx() as db:
            return db.execute("UPDATE job SET state = 'pending' WHERE id = ? AND state = 'queued'",
                              (job_id,)).rowcount == 1

    def mark_queued(self, job_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE job SET state = 'queued', queued_at = ? WHERE id = ? AND state = 'pending'",
                       (time.time(), job_id))

    def record_result(self, job_id: int, worker: str, time_ms: int, spent: Spent | None = None) -> bool:
        """Mark a job done; False if it already was (a redelivered duplicate changes nothing)."""
        spent = spent or Spent()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE job SET state = 'done', worker = ?, time_ms = ?, done_at = ?, version = ?, cached = ?, "
                "cpu_ms = ?, joules = ?, energy_source = ?, result_bytes = ? WHERE id = ? AND state != 'done'",
                (worker, time_ms, time.time(), spent.version, int(spent.cached), spent.cpu_ms, spent.joules,
                 spent.energy_source, spent.result_bytes, job_id))
            if not spent.cached:
                self._end_attempt(db, job_id, worker, "done", time_ms)
            return cur.rowcount == 1

    def set_digest(self, job_id: int, digest: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE job SET digest = ? WHERE id = ?", (digest, job_id))

    def vote(self, job_id: int, worker: str, checksum: str) -> dict[str, int]:
        """Record one worker's checksum for a replicated job (a worker votes once); the tally."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO vote (job_id, worker, checksum) VALUES (?,?,?)",
                       (job_id, worker, checksum))
            rows = db.execute("SELECT checksum, COUNT(*) FROM vote WHERE job_id = ? GROUP BY checksum",
                              (job_id,)).fetchall()
            return {row[0]: row[1] for row in rows}

    def close_copy(self, job_id: int, worker: str, token: str, max_publications: int, counts: bool = True) -> str:
        """A replica's copy is in but decided nothing: 'wait' (copies still out), 'retry' (publish
        one more) or 'failed' (max_publications reached without a majority). A copy that does not
        `count` (its worker had voted already) gives its publication back."""
        return self._close(job_id, worker, token, "voted", max_publications, "publications = publications - ?",
                           (0 if counts else 1,))

    def outvoted(self, task_id: int) -> list[dict[str, Any]]:
        """Replicas whose checksum lost its job's vote: [{job_id, worker}]."""
        rows = self._rows(
            "SELECT v.job_id, v.worker FROM vote v JOIN job j ON j.id = v.job_id WHERE j.task_id = ? AND "
            "v.checksum != (SELECT checksum FROM vote w WHERE w.job_id = v.job_id GROUP BY checksum "
            "ORDER BY COUNT(*) DESC LIMIT 1) ORDER BY v.job_id", (task_id,))
        return [{"job_id": r[0], "worker": r[1]} for r in rows]

    def voted(self, job_id: int, worker: str) -> bool:
        return bool(self._rows("SELECT 1 FROM vote WHERE job_id = ? AND worker = ?", (job_id, worker)))

    def spent(self, task_id: int) -> dict[str, Any]:
        """What a task's jobs cost and carried: CPU, energy (and its sources), bytes, cache hits."""
        row = self._rows(
            "SELECT COUNT(*), SUM(cached), SUM(cpu_ms), SUM(joules), SUM(size * (1 - cached)), "
            "SUM(result_bytes * (1 - cached)), GROUP_CONCAT(DISTINCT energy_source), COUNT(DISTINCT version), "
            "MAX(version) FROM job WHERE task_id = ?", (task_id,))[0]
        return {"jobs": row[0], "cached": int(row[1] or 0), "cpu_seconds": (row[2] or 0) / 1000,
                "joules": float(row[3] or 0), "job_bytes": int(row[4] or 0), "result_bytes": int(row[5] or 0),
                "sources": sorted((row[6] or "").split(",")) if row[6] else [],
                "version": row[8] if row[7] == 1 else None}

    def finish_from_cache(self, task_id: int, facts: dict[str, Any]) -> None:
        """The whole task came from the results cache: its facts, prepared and done, no jobs."""
        with self._tx() as db:
            db.execute("DELETE FROM job WHERE task_id = ?", (task_id,))
            self._merge_facts(db, task_id, facts)
            now = time.time()
            db.execute("UPDATE task SET ready = 1, state = 'done', error = NULL, finished_at = ?, "
                       "started_at = COALESCE(started_at, ?) WHERE id = ?", (now, now, task_id))

    def record_failure(self, job_id: int, worker: str, token: str, error: str, max_attempts: int) -> str:
        """Close a failed attempt: 'retry' (publish again), 'failed' (its task fails) or 'wait'.

        'wait': another copy of the job is still outstanding (a deadline re-publication).
        """
        return self._close(job_id, worker, token, "failed", max_attempts, "error = ?, failures = failures + 1",
                           (without_paths(error),))

    def _close(self, job_id: int, worker: str, token: str, outcome: str, max_publications: int, change: str,
               args: tuple) -> str:
        """Close one outstanding copy of a job (its token) with `change` applied to the job; then
        'wait' (other copies still out), 'failed' (no publication left) or 'retry' (pending again)."""
        with self._tx() as db:
            row = db.execute("SELECT attempt_tokens, state FROM job WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] == "done":
                return "wait"
            left = [t for t in row["attempt_tokens"].split() if t != token]
            db.execute(f"UPDATE job SET {change}, attempt_tokens = ? WHERE id = ?", (*args, " ".join(left), job_id))
            self._end_attempt(db, job_id, worker, outcome)
            if left:
                return "wait"
            if db.execute("SELECT publications FROM job WHERE id = ?", (job_id,)).fetchone()[0] >= max_publications:
                return "failed"
            db.execute("UPDATE job SET state = 'pending' WHERE id = ?", (job_id,))
            return "retry"

    def progress(self, task_id: int) -> tuple[int, int]:
        """(jobs done, jobs in all) of a task."""
        row = self._rows("SELECT SUM(state = 'done'), COUNT(*) FROM job WHERE task_id = ?", (task_id,))[0]
        return int(row[0] or 0), int(row[1] or 0)

    def finished_since(self, since: float) -> list[sqlite3.Row]:
        """Tasks that ended at or after `since`: kind, state, started_at (requested), finished_at, media duration."""
        return self._rows("SELECT task.kind, task.state, task.started_at, task.finished_at, media.duration "
                          "FROM task JOIN media ON media.id = task.media_id WHERE task.finished_at >= ? "
                          "ORDER BY task.finished_at", (since,))

    def jobs_done_since(self, since: float) -> list[sqlite3.Row]:
        """Jobs done at or after `since`: their task's kind and done_at."""
        return self._rows("SELECT task.kind, job.done_at FROM job JOIN task ON task.id = job.task_id "
                          "WHERE job.state = 'done' AND job.done_at >= ? ORDER BY job.done_at", (since,))

    def job_state_counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._rows("SELECT state, COUNT(*) FROM job GROUP BY state")}

    # -- attempts (the per-task timeline) ----------------------------------------------

    def start_attempt(self, job_id: int, worker: str, started_at: float) -> None:
        """A worker's presence says it runs this job: the timeline shows it from now on."""
        with self._tx() as db:
            # only a job that is out with a worker: a worker's presence must not write into a finished task
            row = db.execute("SELECT task_id FROM job WHERE id = ? AND state = 'queued'", (job_id,)).fetchone()
            if row is None:
                return
            open_row = db.execute("SELECT 1 FROM attempt WHERE job_id = ? AND worker = ? AND outcome = 'running'",
                                  (job_id, worker)).fetchone()
            if open_row is None:
                db.execute("INSERT INTO attempt (job_id, task_id, worker, started_at) VALUES (?,?,?,?)",
                           (job_id, row[0], worker, started_at))

    def end_attempts_of(self, worker: str, outcome: str) -> None:
        """Close a vanished worker's running attempts (it crashed or hung)."""
        with self._tx() as db:
            db.execute("UPDATE attempt SET outcome = ?, ended_at = ? WHERE worker = ? AND outcome = 'running'",
                       (outcome, time.time(), worker))

    def _end_attempt(self, db: sqlite3.Connection, job_id: int, worker: str, outcome: str,
                     time_ms: int | None = None) -> None:
        now = time.time()
        cur = db.execute("UPDATE attempt SET outcome = ?, ended_at = ? WHERE job_id = ? AND worker = ? "
                         "AND outcome = 'running'", (outcome, now, job_id, worker))
        if cur.rowcount == 0:
            # The reply came before any presence said the job started (presence is sampled every
            # heart-beat): the reply itself says how long the job ran.
            row = db.execute("SELECT task_id FROM job WHERE id = ?", (job_id,)).fetchone()
            if row is not None:
                started = now - (time_ms or 0) / 1000
                db.execute("INSERT INTO attempt (job_id, task_id, worker, started_at, ended_at, outcome) "
                           "VALUES (?,?,?,?,?,?)", (job_id, row[0], worker, started, now, outcome))

    def shares(self, task_id: int) -> dict[str, Any]:
        """Who did what of a task: per worker its jobs done, their media seconds and compute time,
        and the job it runs now; and the jobs nobody runs yet. (Cache hits are no worker's.)"""
        done = self._rows(
            "SELECT worker, COUNT(*), SUM(seconds), SUM(time_ms) FROM job WHERE task_id = ? AND state = 'done' "
            "AND cached = 0 AND worker IS NOT NULL GROUP BY worker", (task_id,))
        running = self._rows(
            "SELECT a.worker, a.job_id, j.seconds, a.started_at FROM attempt a JOIN job j ON j.id = a.job_id "
            "WHERE a.task_id = ? AND a.outcome = 'running' AND j.state != 'done'", (task_id,))
        workers: dict[str, dict[str, Any]] = {}
        for worker, jobs, seconds, time_ms in done:
            workers[worker] = {"worker": worker, "jobs_done": jobs, "seconds_done": seconds or 0.0,
                               "compute_ms": int(time_ms or 0), "running": None}
        for worker, job_id, seconds, started_at in running:
            entry = workers.setdefault(worker, {"worker": worker, "jobs_done": 0, "seconds_done": 0.0,
                                                "compute_ms": 0, "running": None})
            entry["running"] = {"job_id": job_id, "seconds": seconds, "started_at": started_at}
        busy = {row[1] for row in running}
        waiting = self._rows("SELECT id, seconds FROM job WHERE task_id = ? AND state != 'done'", (task_id,))
        left = [seconds for job_id, seconds in waiting if job_id not in busy]
        return {"workers": sorted(workers.values(), key=lambda w: w["worker"]),
                "pending": {"jobs": len(left), "seconds": sum(left)}}

    def attempts(self, task_id: int) -> list[dict]:
        rows = self._rows(
            "SELECT a.job_id, j.chunk, a.worker, a.started_at, a.ended_at, a.outcome FROM attempt a "
            "JOIN job j ON j.id = a.job_id WHERE a.task_id = ? ORDER BY a.started_at", (task_id,))
        return [dict(r) for r in rows]
