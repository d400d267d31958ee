"""The results cache: work already done is not done again, for single jobs and whole tasks.

A job's result is keyed by what determines it: its kind, its params and input bytes (the
job's `digest`, made when it is first published) and the version of the software that
computed it (an encoder and its ffmpeg build, demucs and torch: `Runner.offers`). A whole
task is keyed by its kind, the content hash of its medium, its normalised params and the
version all its jobs ran with. So the same task again publishes nothing and is done at
once; a task with other params that cut the same chunks (another container, the same
codec and quality) reuses those chunks and nothing else; a new encoder build reuses
nothing. A key is looked up under each version a live worker (or this server) has for
the job's route: a worker with another build will not get a result it would not make.

Entries are files under `STORAGE_DIR/cache` (a job's result body, a task's merged files)
with a small SQLite index beside them, so the cache survives a restart. Files are linked
into task folders where the filesystem allows it (the cache and the tasks share
STORAGE_DIR), so a hit copies nothing; outputs are always replaced by rename, never
written in place, so a task can never change a cached file. The cache holds at most
CACHE_MB; the least recently used entries go first. CACHE_MB=0 turns it off.

Every entry remembers the verification its result passed (`Verification`: VERIFY's PSNR
floor, VERIFY_REPLICAS' vote, VERIFY_SAMPLE's share), and the cache serves only entries whose
verification covers the one this server runs with: a result accepted while VERIFY was off, by
one replica or with a smaller sample, is never reused under VERIFY=psnr, VERIFY_REPLICAS=2 or
a larger VERIFY_SAMPLE, restarts included. A task served whole
says so in its stats (`verify.source` "cache", `verify.passed`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.media.atomic import atomic

log = logging.getLogger("server")

SCHEMA = """
CREATE TABLE IF NOT EXISTS entry (
    key TEXT PRIMARY KEY,
    level TEXT NOT NULL,
    size INTEGER NOT NULL,
    used_at REAL NOT NULL,
    meta TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entry_used ON entry(used_at);
"""


@dataclass(frozen=True)
class Verification:
    """What a result passed before it was accepted: a PSNR floor against its source (VERIFY=psnr
    with VERIFY_MIN_PSNR; None when VERIFY was off), the replicas that agreed on it, and the
    share of video chunks the server decoded in full (VERIFY_SAMPLE)."""

    psnr: float | None = None
    replicas: int = 1
    sample: float = 0.0

    @classmethod
    def of(cls, settings: Any) -> Verification:
        """What this server's settings make every result pass."""
        psnr = settings.verify_min_psnr if settings.verify == "psnr" else None
        # VERIFY=psnr decodes and measures every chunk: what VERIFY_SAMPLE=1 does, and more
        return cls(psnr, settings.verify_replicas, 1.0 if psnr is not None else settings.verify_sample)

    @classmethod
    def from_dict(cls, data: Any) -> Verification:
        """From `as_dict`; anything else (an entry from before verifications were kept) is the weakest."""
        if not isinstance(data, dict):
            return cls()
        psnr, replicas, sample = data.get("psnr"), data.get("replicas"), data.get("sample")
        return cls(float(psnr) if isinstance(psnr, int | float) and not isinstance(psnr, bool) else None,
                   replicas if isinstance(replicas, int) and not isinstance(replicas, bool) and replicas > 0 else 1,
                   float(sample) if isinstance(sample, int | float) and not isinstance(sample, bool)
                   and 0 <= sample <= 1 else 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {"verify": "off" if self.psnr is None else "psnr", "psnr": self.psnr, "replicas": self.replicas,
                "sample": self.sample}

    def covers(self, required: Verification) -> bool:
        """At least as strict as `required` on every count."""
        psnr_ok = required.psnr is None or (self.psnr is not None and self.psnr >= required.psnr)
        return psnr_ok and self.replicas >= required.replicas and self.sample >= required.sample

    def weakest(self, other: Verification) -> Verification:
        """What both passed (a task whose jobs were accepted under different settings)."""
        psnr = None if self.psnr is None or other.psnr is None else min(self.psnr, other.psnr)
        return Verification(psnr, min(self.replicas, other.replicas), min(self.sample, other.sample))


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def digest(kind: str, params: dict[str, Any], body: bytes) -> str:
    """What a job's result depends on besides the software: its kind, params and input."""
    return hashlib.sha256(_canonical([kind, params]) + hashlib.sha256(body).digest()).hexdigest()


def job_key(job_digest: str, version: str) -> str:
    return hashlib.sha256(_canonical(["job", job_digest, version])).hexdigest()


def task_key(kind: str, media_sha256: str, params: dict[str, Any], version: str) -> str:
    return hashlib.sha256(_canonical(["task", kind, media_sha256, params, version])).hexdigest()


def file_sha256(path: Path) -> str:
    digest_ = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest_.update(block)
    return digest_.hexdigest()


def _link(source: Path, target: Path) -> None:
    """`target` becomes `source`'s content: a hard link where possible, a copy otherwise; by rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".cache-part")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copyfile(source, partial)
    partial.replace(target)


class ResultCache:
    def __init__(self, root: Path, limit_mb: int, required: Verification = Verification()):
        self.root = root
        self.limit = limit_mb * 1024 * 1024
        self.required = required  # what an entry must have passed to be served
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if self.limit > 0:
            root.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(root / "index.sqlite3", check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    @property
    def enabled(self) -> bool:
        return self._db is not None

    def close(self) -> None:
        if self._db is not None:
            with self._lock:
                self._db.close()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def _hit(self, key: str, level: str) -> dict | None:
        """The entry's meta, marked as just used; None when absent, when its files are gone, or when
        it passed a weaker verification than `required` (it stays: a weaker server may use it)."""
        if self._db is None:
            return None
        with self._lock:
            row = self._db.execute("SELECT meta FROM entry WHERE key = ? AND level = ?", (key, level)).fetchone()
            if row is None:
                return None
            meta = json.loads(row[0])
            if not Verification.from_dict(meta.get("verified")).covers(self.required):
                log.info("Cache - %s passed %s, weaker than the %s required now: not served", key[:12],
                         meta.get("verified") or "no verification", self.required.as_dict())
                return None
            if not self._path(key).exists():
                self._db.execute("DELETE FROM entry WHERE key = ?", (key,))
                return None
            self._db.execute("UPDATE entry SET used_at = ? WHERE key = ?", (time.time(), key))
        return meta

    def _added(self, key: str, level: str, size: int, meta: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO entry (key, level, size, used_at, meta) VALUES (?,?,?,?,?)",
                             (key, level, size, time.time(), json.dumps(meta)))
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used entries until the cache fits CACHE_MB (lock held)."""
        total = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM entry").fetchone()[0]
        for key, size in self._db.execute("SELECT key, size FROM entry ORDER BY used_at").fetchall():
            if total <= self.limit:
                break
            self._db.execute("DELETE FROM entry WHERE key = ?", (key,))
            path = self._path(key)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            total -= size
            log.info("Cache - evicted %s (%d bytes) to stay within %d MB", key[:12], size, self.limit >> 20)

    def clear(self) -> None:
        """Forget every entry (POST /reset deletes every result, cached ones too)."""
        if self._db is None:
            return
        with self._lock:
            self._db.execute("DELETE FROM entry")
            for child in self.root.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)

    # -- single jobs ----------------------------------------------------------------------

    def job(self, job_digest: str, versions: set[str]) -> tuple[dict[str, Any], bytes, str] | None:
        """A cached result (params, body, version) of a job with this digest, under one of `versions`."""
        for version in sorted(versions):
            key = job_key(job_digest, version)
            meta = self._hit(key, "job")
            if meta is not None:
                try:
                    return meta["params"], self._path(key).read_bytes(), version
                except FileNotFoundError:  # evicted between the lookup and the read
                    continue
        return None

    def keep_job(self, job_digest: str, version: str, params: dict[str, Any], body: bytes,
                 verified: Verification) -> None:
        """Keep a job's result, with the verification it passed."""
        if self._db is None or len(body) > self.limit:
            return
        key = job_key(job_digest, version)
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic(path) as partial:
            partial.write_bytes(body)
        self._added(key, "job", len(body), {"params": params, "verified": verified.as_dict()})

    # -- whole tasks ----------------------------------------------------------------------

    def task(self, keys: list[str], folder: Path) -> dict[str, Any] | None:
        """Restore the first cached task among `keys` into `folder`: its merged files; its facts, whose
        `stats.verify` says the task came from the cache and which verification it passed there."""
        for key in keys:
            meta = self._hit(key, "task")
            if meta is None:
                continue
            try:
                for relative in meta["files"]:
                    _link(self._path(key) / relative, folder / relative)
            except FileNotFoundError:
                continue
            facts = meta["facts"]
            stats = facts.get("stats", {})
            verify = {**stats.get("verify", {}), "source": "cache",
                      "passed": Verification.from_dict(meta.get("verified")).as_dict()}
            return {**facts, "stats": {**stats, "verify": verify}}
        return None

    def keep_task(self, key: str, folder: Path, files: list[Path], facts: dict[str, Any],
                  verified: Verification) -> None:
        """Keep a merged task: `files` (inside `folder`), the facts that describe them and the
        verification all its jobs passed (the weakest of them)."""
        if self._db is None:
            return
        relative = [str(path.relative_to(folder)) for path in files]
        size = sum(path.stat().st_size for path in files)
        if size > self.limit:
            return
        staging = self._path(key).with_name(key + ".part")
        shutil.rmtree(staging, ignore_errors=True)
        for path, name in zip(files, relative, strict=True):
            _link(path, staging / name)
        shutil.rmtree(self._path(key), ignore_errors=True)
        staging.replace(self._path(key))
        self._added(key, "task", size, {"files": relative, "facts": facts, "verified": verified.as_dict()})
