"""`ServerStore`: job inputs and results as files under STORAGE_DIR/data, served by the server's data endpoint.

    STORAGE_DIR/data/secret                      the references' HMAC key (capability.py)
    STORAGE_DIR/data/inputs/{job}                a job's input, written once at its first publication
    STORAGE_DIR/data/results/{job}.{token}       an attempt's result, complete
    STORAGE_DIR/data/partial/{job}.{token}.{n}   a result of n bytes while it arrives

Names are built from a job id and a 32-hex attempt token only, never from a request's
text. Every file is opened without following a symbolic link. An input is written to a
temporary name and renamed (src.media.atomic); a result grows in `partial/` piece by
piece (an upload cut off resumes where it stopped) and is renamed into `results/` once
whole, so a reader never sees half of one. A result uploaded again with the same bytes
changes nothing; with other bytes it replaces the first (the collector checks the size
and checksum its message names, so only the copy a result message vouches for is applied).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlencode

from src.data.capability import Refused, expiry, sign
from src.media.atomic import atomic

TOKEN = re.compile(r"[0-9a-f]{32}")
BLOCK = 1 << 20  # bytes moved at a time between a socket and a file
NO_FOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _job_of(name: str) -> int | None:
    head = name.split(".", 1)[0]
    return int(head) if head.isdigit() else None


class ServerStore:
    """Files under `root`; references are URLs under `base_url` (the data endpoint's address)."""

    def __init__(self, root: Path, base_url: str, secret: bytes):
        self.root = root
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.inputs, self.results, self.partial = root / "inputs", root / "results", root / "partial"
        for folder in (self.inputs, self.results, self.partial):
            folder.mkdir(parents=True, exist_ok=True)
        self._locks: dict[tuple[int, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- the DataStore protocol ----------------------------------------------------------

    def put_input(self, job_id: int, body: bytes) -> None:
        with atomic(self.input_path(job_id)) as temporary:
            temporary.write_bytes(body)

    def input_ref(self, job_id: int, attempt_token: str) -> str:
        return self._ref("inputs", "read", job_id, attempt_token)

    def result_ref(self, job_id: int, attempt_token: str) -> str:
        return self._ref("results", "write", job_id, attempt_token)

    def get_result(self, job_id: int, attempt_token: str) -> bytes | None:
        try:
            with self._open(self.result_path(job_id, attempt_token)) as held:
                return held.read()
        except FileNotFoundError:
            return None

    def delete_jobs(self, job_ids: Iterable[int]) -> None:
        doomed = {int(j) for j in job_ids}
        if doomed:
            self._remove(lambda job: job in doomed)

    def sweep(self, live_job_ids: set[int]) -> int:
        return self._remove(lambda job: job not in live_job_ids)

    # -- what the endpoint uses ------------------------------------------------------------

    def input_path(self, job_id: int) -> Path:
        return self.inputs / str(int(job_id))

    def result_path(self, job_id: int, attempt_token: str) -> Path:
        return self.results / f"{int(job_id)}.{self._token(attempt_token)}"

    def open_input(self, job_id: int) -> BinaryIO:
        """The input, open for reading (FileNotFoundError when there is none)."""
        return self._open(self.input_path(job_id))

    def received(self, job_id: int, attempt_token: str) -> dict:
        """How much of an attempt's result has arrived: {"received", "total", "complete"}."""
        token = self._token(attempt_token)
        done = self.result_path(job_id, token)
        if done.is_file():
            size = done.stat().st_size
            return {"received": size, "total": size, "complete": True}
        for part in self._parts(job_id, token):
            return {"received": part.stat().st_size, "total": int(part.name.rsplit(".", 1)[1]), "complete": False}
        return {"received": 0, "total": None, "complete": False}

    def receive(self, job_id: int, attempt_token: str, start: int, total: int, body: BinaryIO, length: int) -> dict:
        """Write `length` bytes of `body` at `start` of a result of `total` bytes; once all of it
        is in, it becomes the attempt's result. Refused (416) for a piece beyond what arrived."""
        token = self._token(attempt_token)
        with self._lock(job_id, token):
            part = self.partial / f"{int(job_id)}.{token}.{int(total)}"
            if start == 0:  # a fresh upload: whatever an earlier one of another size left goes
                for other in self._parts(job_id, token):
                    if other != part:
                        other.unlink(missing_ok=True)
            have = part.stat().st_size if part.is_file() else 0
            if start > have:
                raise Refused(416, f"the piece starts at byte {start}, but {have} bytes of this result arrived")
            if start + length > total:
                raise Refused(416, f"the piece ends at byte {start + length}, beyond the result's {total} bytes")
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | NO_FOLLOW, 0o600)
            with os.fdopen(fd, "r+b") as out:
                out.truncate(start)
                out.seek(start)
                left = length
                while left > 0:
                    block = body.read(min(BLOCK, left))
                    if not block:
                        break  # the client went away: what arrived stays, for a resumed upload
                    out.write(block)
                    left -= len(block)
                arrived = out.tell()
            if arrived < total:
                return {"received": arrived, "total": total, "complete": False}
            return self._complete(part, self.result_path(job_id, token))

    # -- inside ---------------------------------------------------------------------------------

    def _complete(self, part: Path, done: Path) -> dict:
        total = part.stat().st_size
        if done.is_file() and done.stat().st_size == total and _sha256(done) == _sha256(part):
            part.unlink()
            return {"received": total, "total": total, "complete": True, "unchanged": True}
        os.replace(part, done)
        return {"received": total, "total": total, "complete": True, "unchanged": False}

    def _ref(self, folder: str, direction: str, job_id: int, attempt_token: str) -> str:
        token = self._token(attempt_token)
        expires = expiry()
        query = urlencode({"t": token, "e": expires, "s": sign(self.secret, job_id, token, direction, expires)})
        return f"{self.base_url}/{folder}/{int(job_id)}?{query}"

    def _parts(self, job_id: int, token: str) -> list[Path]:
        prefix = f"{int(job_id)}.{token}."
        return [p for p in self.partial.iterdir() if p.name.startswith(prefix)]

    def _lock(self, job_id: int, token: str) -> threading.Lock:
        with self._locks_guard:
            if len(self._locks) > 10_000:  # uploads long finished; a lock in use stays referenced by its holder
                self._locks.clear()
            return self._locks.setdefault((int(job_id), token), threading.Lock())

    def _remove(self, doomed: Callable[[int], bool]) -> int:
        removed = 0
        for folder in (self.inputs, self.results, self.partial):
            for entry in os.scandir(folder):
                job = _job_of(entry.name)
                if job is None or doomed(job):  # a nameless leftover (an interrupted write) goes too
                    Path(entry.path).unlink(missing_ok=True)
                    removed += 1
        return removed

    @staticmethod
    def _token(attempt_token: str) -> str:
        if not TOKEN.fullmatch(attempt_token):
            raise Refused(404, "an attempt token is 32 hex digits")
        return attempt_token

    @staticmethod
    def _open(path: Path) -> BinaryIO:
        return os.fdopen(os.open(path, os.O_RDONLY | NO_FOLLOW), "rb")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with ServerStore._open(path) as held:
        for block in iter(lambda: held.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
