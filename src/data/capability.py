"""References as capabilities: what a data URL proves, and the server secret that signs it.

A reference to a job's input or result carries an HMAC-SHA256, keyed by a secret only the
server holds, over (job id, attempt token, direction, expiry in unix seconds). Holding a
reference is the permission: a worker that was delivered a job can read that job's input
("read") and write the result of that attempt ("write"), until the expiry, and nothing
else; changing any field of the reference breaks its signature. The server still checks,
at each request, that the attempt is one it issued and that it is outstanding (endpoint.py).

The secret is DATA_SECRET when set (several servers behind one address share it), else it
is generated once and kept in STORAGE_DIR/data/secret (mode 0600, never through a symbolic
link), so references handed out before a restart stay valid after it.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
import stat
import time
from pathlib import Path

DIRECTIONS = ("read", "write")
# A job can wait in its queue behind a long backlog before a worker takes it, and its
# reference must still open then; the attempt checks bound it far more tightly.
REF_SECONDS = 7 * 24 * 3600
SECRET_FILE = "secret"
MIN_SECRET_CHARS = 16


class Refused(Exception):
    """A request the data plane refuses: `status` is its HTTP status, the message its reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _message(job_id: int, attempt_token: str, direction: str, expires: int) -> bytes:
    return f"{int(job_id)}\n{attempt_token}\n{direction}\n{int(expires)}".encode()


def sign(secret: bytes, job_id: int, attempt_token: str, direction: str, expires: int) -> str:
    """The hex HMAC-SHA256 that makes (job, attempt, direction, expiry) a capability."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} is not read or write")
    return hmac.new(secret, _message(job_id, attempt_token, direction, expires), hashlib.sha256).hexdigest()


def verify(secret: bytes, job_id: int, attempt_token: str, direction: str, expires: int, signature: str,
           now: float | None = None) -> None:
    """Raise Refused (403) unless `signature` signs exactly these fields and has not expired."""
    expected = sign(secret, job_id, attempt_token, direction, expires)
    if not hmac.compare_digest(expected, signature.lower() if isinstance(signature, str) else ""):
        # one reason for every mismatch: another job's, another attempt's, the other direction's
        # or a tampered reference all look alike without the secret
        raise Refused(403, f"the reference is not a valid {direction} capability for job {int(job_id)}")
    if (time.time() if now is None else now) > expires:
        raise Refused(403, f"the reference expired at {int(expires)}")


def expiry(now: float | None = None, lifetime: float = REF_SECONDS) -> int:
    return int((time.time() if now is None else now) + lifetime)


def load_secret(configured: str, folder: Path) -> bytes:
    """DATA_SECRET, or the secret kept in `folder` (made there on first use, mode 0600)."""
    if configured:
        if len(configured) < MIN_SECRET_CHARS:
            raise ValueError(f"DATA_SECRET must be at least {MIN_SECRET_CHARS} characters")
        return configured.encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_secret(path)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link; the data secret is never read through one") from None
        raise
    with os.fdopen(fd) as held:
        mode = os.fstat(held.fileno()).st_mode
        if not stat.S_ISREG(mode) or mode & 0o077:
            raise ValueError(f"{path} must be a regular file only its owner can read (mode 0600)")
        text = held.read().strip()
    if len(text) < MIN_SECRET_CHARS:
        raise ValueError(f"{path} holds no usable secret; delete it to make a new one")
    return text.encode()
