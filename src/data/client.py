"""The worker's side of the data plane: fetch a job's input, upload its result, through the job's references.

The worker knows nothing of the server but the references in its jobs: plain HTTP(S)
URLs, to the server's data endpoint or presigned ones of an S3 bucket, used the same way.

- `fetch(ref, size, sha256)`: GETs the input in a stream; a connection cut mid-way (a
  restarting server, a network blip) resumes with `Range: bytes=<have>-` after a backoff,
  until PATIENCE seconds pass without progress. The bytes must have the size and SHA-256
  the job message names, or the job is refused.
- `upload(ref, body)`: PUTs the result in pieces of PIECE bytes with Content-Range (one
  PUT for a result that fits in one); after a failure it asks how much arrived (HEAD) and
  resumes there. Uploading the same bytes again is harmless: the store applies them once.

A refusal (4xx: no capability, the attempt is over) is final and raises `DataRefused`
with the server's reason; anything else that stays wrong past PATIENCE raises
`DataUnavailable`.
"""

from __future__ import annotations

import hashlib
import logging
import time

import requests

log = logging.getLogger("worker")

PIECE = 16 * 1024 * 1024
BLOCK = 1 << 20
PATIENCE = 120.0  # seconds without progress before a transfer gives up
TIMEOUT = (10, 60)  # connect, read (seconds)


class DataRefused(Exception):
    """The store refused the request (4xx): retrying cannot help. `status` is the HTTP status."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


class DataUnavailable(Exception):
    """The store could not be reached, or kept failing, for PATIENCE seconds."""


def _reason(answer: requests.Response) -> str:
    try:
        return str(answer.json().get("error", answer.text))[:300]
    except ValueError:
        return answer.text[:300] or answer.reason


def _refused(answer: requests.Response) -> None:
    if 400 <= answer.status_code < 500 and answer.status_code not in (408, 429):
        raise DataRefused(answer.status_code, _reason(answer))
    if answer.status_code >= 400:
        raise requests.ConnectionError(f"{answer.status_code}: {_reason(answer)}")


class _Backoff:
    """Waits that double from half a second to five; gives up after PATIENCE seconds without progress."""

    def __init__(self, what: str, patience: float):
        self.what, self.patience = what, patience
        self.progress()

    def progress(self) -> None:
        self.since, self.wait = time.monotonic(), 0.5

    def failed(self, exc: Exception) -> None:
        if time.monotonic() - self.since > self.patience:
            raise DataUnavailable(f"{self.what}: no progress for {self.patience:.0f}s: {exc}") from exc
        log.warning("%s failed (%s); retrying in %.1fs", self.what, exc, self.wait)
        time.sleep(self.wait)
        self.wait = min(5.0, self.wait * 2)


def fetch(ref: str, size: int, sha256: str, session: requests.Session | None = None,
          patience: float = PATIENCE) -> bytes:
    """The input a reference names, checked against its size and SHA-256."""
    http = session or requests.Session()
    data = bytearray()
    backoff = _Backoff("fetching the input", patience)
    while True:
        headers = {"Range": f"bytes={len(data)}-"} if data else {}
        try:
            with http.get(ref, headers=headers, stream=True, timeout=TIMEOUT) as answer:
                _refused(answer)
                if data and answer.status_code != 206:
                    data.clear()  # the store ignored the range: it sends the whole again
                for block in answer.iter_content(BLOCK):
                    data += block
                    backoff.progress()
                    if len(data) > size:
                        raise DataRefused(200, f"the input is larger than the {size} bytes the job names")
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            backoff.failed(exc)  # resumes from what arrived
            continue
        if len(data) >= size:
            break
        backoff.failed(DataUnavailable(f"the answer ended after {len(data)} of {size} bytes"))
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataRefused(200, "the input's SHA-256 is not the one the job names")
    return bytes(data)


def takes_pieces(ref: str) -> bool:
    """Whether the store behind a reference takes a result in pieces (the server's data endpoint
    does; an S3 presigned PUT stores exactly one body, so it gets the whole)."""
    return "X-Amz-Signature=" not in ref and "Signature=" not in ref


def upload(ref: str, body: bytes, session: requests.Session | None = None, patience: float = PATIENCE,
           piece: int = PIECE) -> dict:
    """Store `body` through a result reference; the store's last answer when it has all of it."""
    http = session or requests.Session()
    total, offset = len(body), 0
    if not takes_pieces(ref):
        piece = max(1, total)
    backoff = _Backoff("uploading the result", patience)
    while True:
        end = min(total, offset + piece)
        headers = {"Content-Type": "application/octet-stream"}
        if (offset, end) != (0, total):
            headers["Content-Range"] = f"bytes {offset}-{end - 1}/{total}"
        try:
            answer = http.put(ref, data=body[offset:end], headers=headers, timeout=TIMEOUT)
            _refused(answer)
        except (requests.ConnectionError, requests.Timeout) as exc:
            backoff.failed(exc)
            offset = _arrived(http, ref, total) if takes_pieces(ref) else 0
            continue
        try:
            arrived = answer.json()
        except ValueError:  # a store that answers no JSON (S3) took the whole body
            return {"received": total, "total": total, "complete": True}
        if not isinstance(arrived, dict) or arrived.get("complete") or end == total and "received" not in arrived:
            return arrived if isinstance(arrived, dict) else {"complete": True}
        backoff.progress()
        offset = int(arrived.get("received", end))


def _arrived(http: requests.Session, ref: str, total: int) -> int:
    """Where to resume: the bytes the store has of this result (0 when it cannot say, or has another size)."""
    try:
        answer = http.head(ref, timeout=TIMEOUT)
        _refused(answer)
        received = int(answer.headers.get("X-Received", "0"))
    except (requests.ConnectionError, requests.Timeout, ValueError, DataRefused):
        return 0
    return received if 0 <= received < total else 0
