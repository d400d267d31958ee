"""The server's data endpoint: job inputs out and results in over HTTP, on DATA_PORT, apart from the page's API.

    GET|HEAD /inputs/{job}?t=&e=&s=    a job's input (Range: bytes=a-b, a-, -n answer 206)
    PUT      /results/{job}?t=&e=&s=   an attempt's result, whole or a piece at a time
                                       (Content-Range: bytes a-b/total); the answer's JSON
                                       says {"received", "total", "complete", "unchanged"}
    GET|HEAD /results/{job}?t=&e=&s=   how much of that result arrived (X-Received), to resume

`t`, `e`, `s` are the reference's attempt token, expiry and signature (capability.py).
A request is served only when its signature is valid for that job, attempt and direction
(an input reference never writes, a result reference never reads an input) and has not
expired, and when the server's `admit` says the attempt is one it issued and, to write,
that it is still outstanding. A result larger than its kind's limit is refused (413).
Every refusal answers JSON {"error": reason} with 403 (no capability), 404 (no such object)
or 410 (the attempt or its task is over), or 400/411/413/416 for a malformed upload.

The app is plain WSGI, served by waitress on threads of its own: an input leaves through
waitress's file wrapper in large blocks, straight from the file; an upload is read from
the request in blocks and written to disk (local.py), never held whole in memory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable
from http import HTTPStatus
from urllib.parse import parse_qs

from waitress import create_server as waitress_server
from waitress.server import BaseWSGIServer

from src.config import Settings
from src.data.capability import Refused, verify
from src.data.local import BLOCK, ServerStore
from src.data.store import DEFAULT_RESULT_LIMIT

log = logging.getLogger("server")

PATH = re.compile(r"/(inputs|results)/([0-9]{1,19})")
CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,15})-([0-9]{1,15})/([0-9]{1,15})")
RANGE = re.compile(r"bytes=([0-9]{0,15})-([0-9]{0,15})")
SEND_BUFFER = 4 << 20  # bytes; Linux doubles it, and caps it at net.core.wmem_max

# admit(job_id, attempt_token, direction): raises Refused unless the server issued that
# attempt for that job and, for "write", it is still outstanding
Admit = Callable[[int, str, str], None]


class DataEndpoint:
    """The WSGI app. `limit(job_id)`: the most bytes that job's result may have."""

    def __init__(self, store: ServerStore, admit: Admit, limit: Callable[[int], int]):
        self.store = store
        self.admit = admit
        self.limit = limit

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        try:
            return self._serve(environ, start_response)
        except Refused as exc:
            headers = [("Content-Range", f"bytes */{exc.size}")] if getattr(exc, "size", None) is not None else []
            return _json(start_response, exc.status, {"error": exc.reason}, headers)
        except Exception as exc:  # a bug or a full disk answers, and the thread lives on
            log.exception("The data endpoint failed on %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            return _json(start_response, 500, {"error": f"{type(exc).__name__}"})

    def _serve(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        match = PATH.fullmatch(environ.get("PATH_INFO", ""))
        if match is None:
            raise Refused(404, "no such object: the data endpoint serves /inputs/{job} and /results/{job}")
        folder, job_id = match.group(1), int(match.group(2))
        direction = "read" if folder == "inputs" else "write"
        if folder == "inputs" and method not in ("GET", "HEAD"):
            raise Refused(403, "an input reference is read-only: results go to the job's result reference")
        if folder == "results" and method not in ("PUT", "GET", "HEAD"):
            raise Refused(403, f"{method} is not allowed on a result reference")
        token = self._capability(environ, job_id, direction)
        self.admit(job_id, token, direction)
        if folder == "inputs":
            return self._input(environ, start_response, job_id, method == "HEAD")
        if method == "PUT":
            return self._upload(environ, start_response, job_id, token)
        arrived = self.store.received(job_id, token)
        return _json(start_response, 200, arrived, [("X-Received", str(arrived["received"]))],
                     head=method == "HEAD")

    def _capability(self, environ: dict, job_id: int, direction: str) -> str:
        try:
            query = parse_qs(environ.get("QUERY_STRING", ""), strict_parsing=True, max_num_fields=8)
        except ValueError:
            query = {}
        fields = {name: query.get(name, []) for name in ("t", "e", "s")}
        if any(len(values) != 1 for values in fields.values()) or not fields["e"][0].isdigit():
            raise Refused(403, "the request carries no reference: a token, an expiry and a signature")
        token, expires, signature = fields["t"][0], int(fields["e"][0]), fields["s"][0]
        verify(self.store.secret, job_id, token, direction, expires, signature)
        return token

    def _input(self, environ: dict, start_response: Callable, job_id: int, head: bool) -> Iterable[bytes]:
        try:
            held = self.store.open_input(job_id)
        except FileNotFoundError:
            raise Refused(404, f"job {job_id}'s input is not stored (its task ended)") from None
        size = _size(held)
        first, last = _byte_range(environ.get("HTTP_RANGE", ""), size)
        headers = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes"),
                   ("Content-Length", str(last - first + 1 if size else 0))]
        partial = (first, last) != (0, size - 1) and size > 0
        if partial:
            headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
        start_response("206 Partial Content" if partial else "200 OK", headers)
        if head:
            held.close()
            return []
        held.seek(first)
        wrapper = environ.get("wsgi.file_wrapper")
        if wrapper is not None:  # waitress sends at most Content-Length bytes of it, from the file
            return wrapper(held, BLOCK)
        return _blocks(held, last - first + 1)

    def _upload(self, environ: dict, start_response: Callable, job_id: int, token: str) -> Iterable[bytes]:
        length_text = environ.get("CONTENT_LENGTH", "")
        if not length_text.isdigit():
            raise Refused(411, "a result upload needs a Content-Length")
        length = int(length_text)
        ranged = environ.get("HTTP_CONTENT_RANGE", "")
        if ranged:
            match = CONTENT_RANGE.fullmatch(ranged.strip())
            if match is None:
                raise Refused(400, "Content-Range must be 'bytes first-last/total'")
            start, last, total = (int(g) for g in match.groups())
            if last - start + 1 != length or last >= total:
                raise Refused(400, "Content-Range does not match the body's length")
        else:
            start, total = 0, length
        limit = self.limit(job_id)
        if total > limit:
            raise Refused(413, f"the result is {total} bytes, more than this kind's {limit}")
        arrived = self.store.receive(job_id, token, start, total, environ["wsgi.input"], length)
        status = 200 if arrived.get("unchanged") else 201 if arrived["complete"] else 202
        return _json(start_response, status, arrived, [("X-Received", str(arrived["received"]))])


class RangeNotSatisfiable(Refused):
    def __init__(self, size: int, reason: str):
        super().__init__(416, reason)
        self.size = size


def _byte_range(header: str, size: int) -> tuple[int, int]:
    """The one byte range a Range header asks for, within `size`; the whole when none (or a
    form this endpoint does not serve, like several ranges: the whole is a valid answer)."""
    match = RANGE.fullmatch(header.strip()) if header else None
    if match is None or not (match.group(1) or match.group(2)):
        return 0, size - 1
    if match.group(1):
        first = int(match.group(1))
        last = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
    else:
        first, last = max(0, size - int(match.group(2))), size - 1
    if first >= size or first > last:
        raise RangeNotSatisfiable(size, f"the range starts at byte {first}, the input has {size} bytes")
    return first, last


def _size(held) -> int:
    return os.fstat(held.fileno()).st_size


def _blocks(held, left: int) -> Iterable[bytes]:
    with held:
        while left > 0:
            block = held.read(min(BLOCK, left))
            if not block:
                return
            left -= len(block)
            yield block


def _json(start_response: Callable, status: int, body: dict, headers: list | None = None,
          head: bool = False) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(f"{status} {HTTPStatus(status).phrase}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *(headers or [])])
    return [] if head else [data]


def create_server(app: DataEndpoint, settings: Settings) -> BaseWSGIServer:
    """The data endpoint on DATA_HOST:DATA_PORT, bound and ready to `run()`."""
    server = waitress_server(
        app,
        host=settings.data_host,
        port=settings.data_port,
        threads=8,
        connection_limit=200,
        channel_timeout=60,
        # a result piece is a few MiB (client.py), a whole one at most a kind's limit
        max_request_body_size=2 * DEFAULT_RESULT_LIMIT,
        ident="karaoke-data",
        asyncore_use_poll=True,
    )
    # Waitress hands a socket as much of a file at a time as the socket's send buffer holds:
    # the kernel's default (16 kB here) made a large download a loop of small reads and sends.
    # Each accepted connection gets these options (an instance attribute: no keyword sets it).
    server.adj.socket_options = [*server.adj.socket_options, (socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)]
    return server
