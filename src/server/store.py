"""The job store: songs, their tracks, their jobs and every job attempt, in SQLite.

Everything the server knows lives here (plus audio files beside it), so a server that
is killed and restarted picks up where it was. IDs are AUTOINCREMENT, so an ID is never
reused, not even after `/reset`, and a late message for a deleted song can't land on a
new one. Each method is one short transaction; the store is shared by threads.

Attempts are the server's own count, not what workers say: each publication of a job
issues an attempt token (kept in `job.attempt_tokens` unless that copy failed) and counts
one attempt. A result or failure is accepted only with one of those tokens (a late copy of
a done job's result is a harmless duplicate); a failure closes its token, and the job is
published again or, after MAX_ATTEMPTS publications, fails its song. A job not done by
its deadline is published again too.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from src.separation.plan import JobPlan

SCHEMA = """
CREATE TABLE IF NOT EXISTS music (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    band TEXT NOT NULL,
    token TEXT NOT NULL,
    frames INTEGER NOT NULL,
    samplerate INTEGER NOT NULL,
    channels INTEGER NOT NULL,
    norm_mean REAL NOT NULL,
    norm_std REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'uploaded',
    ready INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    selection TEXT,
    mix_selection TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS track (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    music_id INTEGER NOT NULL REFERENCES music(id) ON DELETE CASCADE,
    name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS job (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    music_id INTEGER NOT NULL REFERENCES music(id) ON DELETE CASCADE,
    chunk INTEGER NOT NULL,
    first_offset INTEGER NOT NULL,
    segments INTEGER NOT NULL,
    slice_start INTEGER NOT NULL,
    slice_end INTEGER NOT NULL,
    out_start INTEGER NOT NULL,
    out_end INTEGER NOT NULL,
    size INTEGER NOT NULL,
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
CREATE TABLE IF NOT EXISTS attempt (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES job(id) ON DELETE CASCADE,
    music_id INTEGER NOT NULL,
    worker TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    outcome TEXT NOT NULL DEFAULT 'running'
);
CREATE INDEX IF NOT EXISTS job_music ON job(music_id);
CREATE INDEX IF NOT EXISTS job_state ON job(state);
CREATE INDEX IF NOT EXISTS attempt_job ON attempt(job_id);
"""


@dataclass(frozen=True)
class Music:
    id: int
    name: str
    band: str
    token: str
    frames: int
    samplerate: int
    channels: int
    norm_mean: float
    norm_std: float
    state: str
    ready: bool  # decoded: its audio can be cut into jobs
    error: str | None
    selection: list[int] | None
    mix_selection: list[int] | None
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def duration(self) -> float:
        return self.frames / self.samplerate


@dataclass(frozen=True)
class Track:
    id: int
    music_id: int
    name: str


@dataclass(frozen=True)
class Job:
    id: int
    music_id: int
    chunk: int
    plan: JobPlan
    size: int
    state: str
    worker: str | None
    time_ms: int | None
    attempts: int
    error: str | None
    queued_at: float | None
    done_at: float | None
    attempt_tokens: frozenset[str] = frozenset()
    publications: int = 0
    failures: int = 0
    published_at: float | None = None


# Columns added since the first release, for databases created before them.
ADDED_COLUMNS = {
    "music": {"ready": "INTEGER NOT NULL DEFAULT 1"},  # songs from before background decoding were decoded
    "job": {
        "attempt_tokens": "TEXT NOT NULL DEFAULT ''",
        "publications": "INTEGER NOT NULL DEFAULT 0",
        "failures": "INTEGER NOT NULL DEFAULT 0",
        "published_at": "REAL",
    },
}


def _music(row: sqlite3.Row) -> Music:
    data = dict(row)
    for key in ("selection", "mix_selection"):
        data[key] = json.loads(data[key]) if data[key] else None
    data["ready"] = bool(data["ready"])
    return Music(**data)


def _job(row: sqlite3.Row) -> Job:
    plan = JobPlan(row["chunk"], row["first_offset"], row["segments"], row["slice_start"],
                   row["slice_end"], row["out_start"], row["out_end"])
    return Job(row["id"], row["music_id"], row["chunk"], plan, row["size"], row["state"],
               row["worker"], row["time_ms"], row["attempts"], row["error"], row["queued_at"], row["done_at"],
               frozenset(row["attempt_tokens"].split()), row["publications"], row["failures"], row["published_at"])


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        for table, added in ADDED_COLUMNS.items():  # a database written by an earlier version
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            for column, declaration in added.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

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

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- songs -----------------------------------------------------------------------

    def create_music(self, name: str, band: str, token: str, frames: int, samplerate: int, channels: int,
                     sources: Sequence[str]) -> Music:
        """A new song, not yet decoded: `frames` is the probe's estimate until `mark_decoded`."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO music (name, band, token, frames, samplerate, channels, norm_mean, norm_std,"
                " created_at) VALUES (?,?,?,?,?,?,0,1,?)",
                (name, band, token, frames, samplerate, channels, time.time()),
            )
            music_id = cur.lastrowid
            db.executemany("INSERT INTO track (music_id, name) VALUES (?, ?)",
                           [(music_id, source) for source in sources])
        return self.music(music_id)

    def music(self, music_id: int) -> Music | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM music WHERE id = ?", (music_id,)).fetchone()
        return _music(row) if row else None

    def all_music(self) -> list[Music]:
        with self._lock:
            return [_music(r) for r in self._db.execute("SELECT * FROM music ORDER BY id")]

    def tracks(self, music_id: int) -> list[Track]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM track WHERE music_id = ? ORDER BY id", (music_id,))
            return [Track(**dict(r)) for r in rows]

    def mark_decoded(self, music_id: int, frames: int, norm_mean: float, norm_std: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE music SET ready = 1, frames = ?, norm_mean = ?, norm_std = ? WHERE id = ?",
                       (frames, norm_mean, norm_std, music_id))

    def request_processing(self, music_id: int) -> None:
        """A song asked to be processed before its decode ended: processing, with no jobs yet."""
        with self._tx() as db:
            db.execute("UPDATE music SET state = 'processing', error = NULL, started_at = ? WHERE id = ?",
                       (time.time(), music_id))

    def set_selection(self, music_id: int, track_ids: Sequence[int]) -> None:
        with self._tx() as db:
            db.execute("UPDATE music SET selection = ? WHERE id = ?", (json.dumps(list(track_ids)), music_id))

    def start_processing(self, music_id: int, plans: Sequence[JobPlan], bytes_per_frame: int) -> None:
        """Record the song's jobs as pending (not yet on the broker) and the song as processing."""
        with self._tx() as db:
            db.execute("DELETE FROM job WHERE music_id = ?", (music_id,))  # a failed song starts over
            db.execute("UPDATE music SET state = 'processing', error = NULL, started_at = ? WHERE id = ?",
                       (time.time(), music_id))
            db.executemany(
                "INSERT INTO job (music_id, chunk, first_offset, segments, slice_start, slice_end,"
                " out_start, out_end, size) VALUES (?,?,?,?,?,?,?,?,?)",
                [(music_id, p.chunk, p.first_offset, p.segments, p.slice_start, p.slice_end, p.out_start,
                  p.out_end, (p.slice_end - p.slice_start) * bytes_per_frame) for p in plans],
            )

    def mark_done(self, music_id: int, mix_selection: Sequence[int]) -> None:
        with self._tx() as db:
            db.execute("UPDATE music SET state = 'done', mix_selection = ?, finished_at = ? WHERE id = ?",
                       (json.dumps(list(mix_selection)), time.time(), music_id))

    def mark_failed(self, music_id: int, error: str) -> bool:
        """Fail a song that is still being decoded or processed; False if it had already ended."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE music SET state = 'failed', error = ?, finished_at = ? "
                "WHERE id = ? AND state IN ('uploaded', 'processing')", (error, time.time(), music_id))
            return cur.rowcount == 1

    def delete_music(self, music_id: int) -> None:
        """Forget one song with its tracks, jobs and attempts (the id is never reused)."""
        with self._tx() as db:
            db.execute("DELETE FROM attempt WHERE music_id = ?", (music_id,))
            db.execute("DELETE FROM music WHERE id = ?", (music_id,))  # tracks and jobs cascade

    def delete_everything(self) -> None:
        with self._tx() as db:
            for table in ("attempt", "job", "track", "music"):
                db.execute(f"DELETE FROM {table}")

    # -- jobs --------------------------------------------------------------------------

    def jobs(self, music_id: int | None = None, state: str | None = None) -> list[Job]:
        query, args = "SELECT * FROM job WHERE 1=1", []
        if music_id is not None:
            query, args = query + " AND music_id = ?", [*args, music_id]
        if state is not None:
            query, args = query + " AND state = ?", [*args, state]
        with self._lock:
            return [_job(r) for r in self._db.execute(query + " ORDER BY id", args)]

    def job(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM job WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def job_ids(self) -> list[int]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM job ORDER BY id")]

    def issue_attempt(self, job_id: int, token: str) -> None:
        """Record a new publication of a job, with the token its result must echo."""
        with self._tx() as db:
            db.execute("UPDATE job SET attempt_tokens = trim(attempt_tokens || ' ' || ?), "
                       "publications = publications + 1, attempts = publications + 1, published_at = ? "
                       "WHERE id = ? AND state != 'done'", (token, time.time(), job_id))

    def republish(self, job_id: int) -> bool:
        """Queue a job again (it failed, or missed its deadline); False if it is no longer queued."""
        with self._tx() as db:
            return db.execute("UPDATE job SET state = 'pending' WHERE id = ? AND state = 'queued'",
                              (job_id,)).rowcount == 1

    def mark_queued(self, job_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE job SET state = 'queued', queued_at = ? WHERE id = ? AND state = 'pending'",
                       (time.time(), job_id))

    def record_result(self, job_id: int, worker: str, time_ms: int) -> bool:
        """Mark a job done; False if it already was (a redelivered duplicate changes nothing)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE job SET state = 'done', worker = ?, time_ms = ?, done_at = ? "
                "WHERE id = ? AND state != 'done'", (worker, time_ms, time.time(), job_id))
            self._end_attempt(db, job_id, worker, "done")
            return cur.rowcount == 1

    def record_failure(self, job_id: int, worker: str, token: str, error: str, max_attempts: int) -> str:
        """Close a failed attempt: 'retry' (publish again), 'failed' (its song fails) or 'wait'.

        'wait': another copy of the job is still outstanding (a deadline re-publication).
        """
        with self._tx() as db:
            row = db.execute("SELECT attempt_tokens, publications, state FROM job WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] == "done":
                return "wait"
            left = [t for t in row["attempt_tokens"].split() if t != token]
            db.execute("UPDATE job SET error = ?, failures = failures + 1, attempt_tokens = ? WHERE id = ?",
                       (error, " ".join(left), job_id))
            self._end_attempt(db, job_id, worker, "failed")
            if left:
                return "wait"
            if row["publications"] >= max_attempts:
                return "failed"
            db.execute("UPDATE job SET state = 'pending' WHERE id = ?", (job_id,))
            return "retry"

    def progress(self, music_id: int) -> tuple[int, int]:
        """(jobs done, jobs in all) of a song."""
        with self._lock:
            row = self._db.execute(
                "SELECT SUM(state = 'done'), COUNT(*) FROM job WHERE music_id = ?", (music_id,)).fetchone()
        return int(row[0] or 0), int(row[1] or 0)

    def job_state_counts(self) -> dict[str, int]:
        with self._lock:
            return {r[0]: r[1] for r in self._db.execute("SELECT state, COUNT(*) FROM job GROUP BY state")}

    # -- attempts (the per-song timeline) ----------------------------------------------

    def start_attempt(self, job_id: int, worker: str, started_at: float) -> None:
        with self._tx() as db:
            # only a job that is out with a worker: a worker's presence must not write into a finished song
            row = db.execute("SELECT music_id FROM job WHERE id = ? AND state = 'queued'", (job_id,)).fetchone()
            if row is None:
                return
            open_row = db.execute("SELECT 1 FROM attempt WHERE job_id = ? AND worker = ? AND outcome = 'running'",
                                  (job_id, worker)).fetchone()
            if open_row is None:
                db.execute("INSERT INTO attempt (job_id, music_id, worker, started_at) VALUES (?,?,?,?)",
                           (job_id, row[0], worker, started_at))

    def end_attempts_of(self, worker: str, outcome: str) -> None:
        """Close a vanished worker's running attempts (it crashed or hung)."""
        with self._tx() as db:
            db.execute("UPDATE attempt SET outcome = ?, ended_at = ? WHERE worker = ? AND outcome = 'running'",
                       (outcome, time.time(), worker))

    def _end_attempt(self, db: sqlite3.Connection, job_id: int, worker: str, outcome: str) -> None:
        cur = db.execute("UPDATE attempt SET outcome = ?, ended_at = ? WHERE job_id = ? AND worker = ? "
                         "AND outcome = 'running'", (outcome, time.time(), job_id, worker))
        if cur.rowcount == 0:  # the worker finished before its presence said it started
            row = db.execute("SELECT music_id FROM job WHERE id = ?", (job_id,)).fetchone()
            if row is not None:
                now = time.time()
                db.execute("INSERT INTO attempt (job_id, music_id, worker, started_at, ended_at, outcome) "
                           "VALUES (?,?,?,?,?,?)", (job_id, row[0], worker, now, now, outcome))

    def attempts(self, music_id: int) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT a.job_id, j.chunk, a.worker, a.started_at, a.ended_at, a.outcome FROM attempt a "
                "JOIN job j ON j.id = a.job_id WHERE a.music_id = ? ORDER BY a.started_at", (music_id,))
            return [dict(r) for r in rows]
