"""A TCP proxy in front of the server's data endpoint that injects network faults from outside.

The server's DATA_URL names the proxy, so every reference a worker gets leads through it.
Each client connection carries one HTTP/1.1 request (the proxy asks the endpoint to close
after answering, so the worker's client opens a new connection for the next one); the proxy
reads the request's head and relays its body (Content-Length) and the answer, and records
each exchange. A `plan` (exchange -> fault or None) decides, per request, what goes wrong:

- `cut:N`: relay the head and N bytes of the body, then close both connections (an upload
  cut off mid-way: what the endpoint got stays, the worker sees its connection reset);
- `hold`: relay the request whole and read the answer, but never pass it on: the result is
  stored, and the worker waits for an answer until it is killed (`held` is set meanwhile);
- `slow`: relay the answer at about RATE bytes a second through a small receive buffer, so
  that most of a large input is still in the server's hands while it downloads
  (`downloading` is set once the first bytes went through);
- `twice`: relay the request, read its answer, send the same request again (recording that
  second answer), then pass the first answer on: a result uploaded twice, the second time
  before the worker can send its result message.

Nothing is changed in what passes: a fault is a cut, a delay or a repeat, as a network or a
retrying client makes them.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

BLOCK = 64 * 1024
RATE = 1_000_000  # bytes a second of a `slow` answer


@dataclass
class Exchange:
    """One request as the proxy relayed it."""

    method: str
    path: str  # without the query (the reference's capability)
    target: str  # with it
    headers: dict[str, str]
    fault: str | None = None
    sent: int = 0  # body bytes passed to the endpoint
    status: int | None = None  # the endpoint's answer (None: no answer)
    relayed: int = 0  # answer bytes (head included) passed back to the client
    repeat_status: int | None = None  # `twice`: the answer to the repeated request
    body: bytes = b""  # `twice`: the request's body
    notes: list[str] = field(default_factory=list)


def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    """(head up to its blank line, bytes read past it); an empty head when the peer closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        block = conn.recv(BLOCK)
        if not block:
            return b"", b""
        data += block
        if len(data) > 256 * 1024:
            raise ValueError("a request head over 256 kB")
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _parse(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _closing(head: bytes) -> bytes:
    """The request head with `Connection: close`: the endpoint answers, then closes."""
    lines = [line for line in head.decode("latin-1").split("\r\n") if line and
             not line.lower().startswith("connection:")]
    return ("\r\n".join(lines) + "\r\nConnection: close\r\n\r\n").encode("latin-1")


def _status(answer_head: bytes) -> int | None:
    parts = answer_head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


class DataProxy:
    """Listens on a free port of loopback and relays to `upstream_port` there."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.exchanges: list[Exchange] = []
        self.plan: Callable[[Exchange], str | None] = lambda exchange: None
        self.held = threading.Event()
        self.downloading = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="data-proxy", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with suppress(OSError):
            self.listener.close()

    def seen(self, method: str | None = None, folder: str | None = None) -> list[Exchange]:
        with self._lock:
            return [e for e in self.exchanges if (method is None or e.method == method)
                    and (folder is None or e.path.startswith(f"/{folder}/"))]

    # -- inside ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            try:
                head, rest = _read_head(client)
                if head:
                    self._relay(client, head, rest)
            except (OSError, ValueError):
                pass  # a connection the worker or the endpoint dropped: nothing more to relay

    def _relay(self, client: socket.socket, head: bytes, rest: bytes) -> None:
        method, target, headers = _parse(head)
        exchange = Exchange(method, target.split("?", 1)[0], target, headers)
        with self._lock:
            self.exchanges.append(exchange)
            exchange.fault = self.plan(exchange)
        fault = exchange.fault or ""
        length = int(headers.get("content-length", "0") or 0)
        body = bytearray()  # kept only for `twice`
        upstream = socket.socket()
        if fault == "slow":  # most of the answer stays with the server, not in this proxy's buffers
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BLOCK)
        with upstream:
            try:
                upstream.connect(self.upstream)
            except OSError:
                exchange.notes.append("endpoint unreachable")
                return  # the client sees its connection closed
            upstream.sendall(_closing(head))
            cut = int(fault.split(":", 1)[1]) if fault.startswith("cut:") else None
            pending = rest
            while exchange.sent < length:
                if not pending:
                    pending = client.recv(BLOCK)
                    if not pending:
                        exchange.notes.append("client closed mid-body")
                        return
                piece = pending[:length - exchange.sent]
                if cut is not None and exchange.sent + len(piece) >= cut:
                    piece = piece[:cut - exchange.sent]
                upstream.sendall(piece)
                exchange.sent += len(piece)
                if fault == "twice":
                    body += piece
                pending = pending[len(piece):]
                if cut is not None and exchange.sent >= cut:
                    exchange.notes.append(f"cut after {exchange.sent} of {length} body bytes")
                    with suppress(OSError):
                        client.shutdown(socket.SHUT_RDWR)
                    return
            answer = self._answer(client, upstream, exchange, fault)
        if fault == "hold":
            self.held.set()
            exchange.notes.append("answer held")
            client.settimeout(None)
            with suppress(OSError):
                while client.recv(BLOCK):  # until the worker is gone
                    pass
            return
        if fault == "twice" and answer is not None:
            exchange.body = bytes(body)
            exchange.repeat_status = self._repeat(head, exchange.body)
            client.sendall(answer)
            exchange.relayed = len(answer)

    def _answer(self, client: socket.socket, upstream: socket.socket, exchange: Exchange, fault: str) -> bytes | None:
        """Relay the endpoint's answer to the client, or (`hold`, `twice`) keep it whole and return it."""
        answer_head, rest = _read_head(upstream)
        if not answer_head:
            exchange.notes.append("no answer")
            return None
        exchange.status = _status(answer_head)
        if fault in ("hold", "twice"):
            kept = answer_head + rest
            while block := upstream.recv(BLOCK):  # read it all, pass on nothing yet
                kept += block
            return kept
        client.sendall(answer_head + rest)
        exchange.relayed = len(answer_head) + len(rest)
        while True:
            if fault == "slow":
                time.sleep(BLOCK / RATE)
            block = upstream.recv(BLOCK)
            if not block:
                return answer_head
            client.sendall(block)
            exchange.relayed += len(block)
            if fault == "slow":
                self.downloading.set()

    def _repeat(self, head: bytes, body: bytes) -> int | None:
        with socket.create_connection(self.upstream) as again:
            again.sendall(_closing(head) + body)
            answer_head, _ = _read_head(again)
            while again.recv(BLOCK):
                pass
        return _status(answer_head)
