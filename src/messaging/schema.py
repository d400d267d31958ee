"""The messages server and workers exchange, how they look on the wire, and what a valid one is.

Every message is a STOMP frame whose headers say what it is. Messages carry control, not
media (the claim check, src/data): a job carries its kind's own `params` (a small JSON
object in one header) and references to its input and to where its result goes, with the
input's size and SHA-256; a result carries its params and the size and SHA-256 of the
result it stored. Neither has a body. Bodies that remain (presence) are raw bytes, never
encoded, and no frame's body may exceed MAX_BODY_BYTES: a bulky one is refused with the
reason, and parked.

- `JobMessage` (server → `/queue/{p}.jobs.{kind}`): one job of one task.
- `ResultMessage` (worker → results queue): the job's output.
- `FailureMessage` (worker → results queue): why a job failed.
- `ControlMessage` (server → control topic): stop the work of some tasks, or of all.
- `PresenceMessage` (worker → presence topic): who is alive, which kinds it runs, what it does.

Anything may arrive on any destination (a message from another program, a damaged one,
a forged one), so this module is the one place that says what a valid message is on the
backbone: every header's type, range and size, the body's size. What the
params and the bytes behind the references mean is the kind's to check (`Runner.problem` on the worker,
`Kind.check` on the server). `decode(headers, body)` returns a message only when all of
this holds and raises `MalformedMessage` with the reason otherwise; `reply_mismatch` then
checks a result or failure against the job it claims to answer. A job and its result
carry a per-publication `attempt-token`: the server issues a new one each time it
publishes a job and accepts a result or failure only with a token it issued for that job.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MAX_ID = 2**63 - 1  # SQLite's INTEGER
MAX_CHUNKS = 100_000
MAX_ATTEMPT = 1000
MAX_ERROR_CHARS = 500
MAX_PARAMS_CHARS = 4096
MAX_PRESENCE_BYTES = 4096
MAX_CONTROL_IDS = 1000
MAX_KINDS = 16
MAX_OFFERS = 64
MAX_VERSION_CHARS = 120
# What control needs: the largest body left is a presence message (MAX_PRESENCE_BYTES). Media
# travels through the data store (src/data); a frame with a larger body is refused and parked.
MAX_BODY_BYTES = 8 * 1024
MAX_REF_CHARS = 2048  # a reference URL: the data endpoint's or a presigned S3 one
MAX_OBJECT_BYTES = 2**40  # an input's or a result's size
REF = re.compile(r"https?://[\x21-\x7e]+")  # printable, no space; MAX_REF_CHARS bounds it
SHA256 = re.compile(r"[0-9a-f]{64}")
TOKEN = re.compile(r"[0-9a-f]{32}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # worker, model, kind and source names
PRINTABLE = re.compile(r"[\x20-\x7e]*")
ROUTE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,63})?")  # kind[/route]


class MalformedMessage(ValueError):
    """A frame that is not one of ours, is damaged, or does not fit what it answers."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_body(body: bytes) -> None:
    """Refuse a bulky body: messages carry control; media goes through the data store."""
    if len(body) > MAX_BODY_BYTES:
        raise MalformedMessage(f"body is {len(body)} bytes, more than {MAX_BODY_BYTES}: messages carry control, "
                               "media travels through the data store")


def params_header(params: dict[str, Any]) -> str:
    return json.dumps(params, separators=(",", ":"), allow_nan=False)


# -- the messages -------------------------------------------------------------------------


@dataclass(frozen=True)
class JobMessage:
    """One job of one task: the kind's params and references to its input and its result's place.

    `payload` is never on the wire: the worker fills it with the input it fetched through
    `input_ref` (checked against `input_size` and `input_sha256`) before its runner sees the job.
    """

    kind: str
    task_id: int
    job_id: int
    chunk: int
    task_token: str
    attempt_token: str  # this publication of the job; its result must echo it
    params: dict[str, Any] = field(default_factory=dict)
    payload: bytes = field(default=b"", repr=False)
    route: str = ""  # the capability it needs (its queue's route), "" for any worker of the kind
    input_ref: str = ""  # where the worker GETs its input (a read capability of this attempt)
    input_size: int = 0
    input_sha256: str = ""
    result_ref: str = ""  # where the worker PUTs its result (a write capability of this attempt)

    def headers(self) -> dict[str, str]:
        return {
            "type": "job",
            "kind": self.kind,
            "route": self.route,
            "task-id": str(self.task_id),
            "job-id": str(self.job_id),
            "chunk": str(self.chunk),
            "task-token": self.task_token,
            "attempt-token": self.attempt_token,
            "params": params_header(self.params),
            "input": self.input_ref,
            "input-size": str(self.input_size),
            "input-sha256": self.input_sha256,
            "result": self.result_ref,
        }

    def body(self) -> bytes:
        return b""


@dataclass(frozen=True)
class ResultMessage:
    """A job's output: the kind's result params, and the size and SHA-256 of the result it stored
    through the job's result reference. `payload` is never on the wire: the collector fills it
    with what the store holds, once size and checksum match."""

    kind: str
    task_id: int
    job_id: int
    task_token: str
    attempt_token: str
    worker: str
    attempt: int
    compute_ms: int
    params: dict[str, Any] = field(default_factory=dict)
    payload: bytes = field(default=b"", repr=False)
    version: str = ""  # the software that computed it (Runner.offers), for the results cache
    cpu_ms: int = 0  # CPU time the job took on the worker
    energy_mj: int = 0  # millijoules the job took
    energy_source: str = "estimated"  # measured (RAPL) or estimated (CPU time x WATTS_PER_CORE)
    result_size: int = 0
    result_sha256: str = ""

    def headers(self) -> dict[str, str]:
        return {
            "type": "result",
            "version": self.version,
            "cpu-ms": str(self.cpu_ms),
            "energy-mj": str(self.energy_mj),
            "energy-source": self.energy_source,
            "kind": self.kind,
            "task-id": str(self.task_id),
            "job-id": str(self.job_id),
            "task-token": self.task_token,
            "attempt-token": self.attempt_token,
            "worker": self.worker,
            "attempt": str(self.attempt),
            "compute-ms": str(self.compute_ms),
            "params": params_header(self.params),
            "result-size": str(self.result_size),
            "result-sha256": self.result_sha256,
        }

    def body(self) -> bytes:
        return b""


@dataclass(frozen=True)
class FailureMessage:
    """A job that failed on a worker. The server counts failures; `final` is the worker's view only."""

    task_id: int
    job_id: int
    task_token: str
    attempt_token: str
    worker: str
    attempt: int
    error: str
    final: bool = True

    def headers(self) -> dict[str, str]:
        return {
            "type": "failure",
            "task-id": str(self.task_id),
            "job-id": str(self.job_id),
            "task-token": self.task_token,
            "attempt-token": self.attempt_token,
            "worker": self.worker,
            "attempt": str(min(self.attempt, MAX_ATTEMPT)),
            # STOMP header values are one line; keep the reason readable and bounded
            "error": clean_text(self.error),
            "final": "true" if self.final else "false",
        }

    @classmethod
    def answering(cls, job: JobMessage, worker: str, attempt: int, error: str) -> FailureMessage:
        return cls(job.task_id, job.job_id, job.task_token, job.attempt_token, worker, attempt, error)


def clean_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """One printable line of at most `limit` characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in " ".join(str(text).split()))[:limit]


@dataclass(frozen=True)
class ControlMessage:
    """`reset`: stop the work of every task up to the highest id named. `cancel`: of these tasks.
    `announce`: every worker publishes its presence now (a server that just started)."""

    action: str
    task_ids: tuple[int, ...] = ()

    def headers(self) -> dict[str, str]:
        return {"type": "control", "action": self.action, "task-ids": ",".join(map(str, self.task_ids))}


@dataclass(frozen=True)
class PresenceMessage:
    """A worker's periodic 'I am alive' with what it is doing, for the operator panel.

    `session` is a random secret of the worker process. Only the server's login may read
    the presence topic, so no other worker can learn it: the registry binds a worker's name
    to the session it first announced, and a message with another session (a forged
    "leaving" or "busy") is refused.
    """

    worker: str
    host: str
    address: str
    pid: int
    state: str  # idle | busy | leaving
    job_id: int | None
    task_id: int | None
    jobs_done: int
    mean_job_seconds: float | None
    model: str
    sent_at: float
    session: str = ""
    device: str = "cpu"  # where the worker runs its model: cpu | cuda
    kinds: tuple[str, ...] = ()  # the job kinds it consumes
    offers: dict[str, str] = field(default_factory=dict)  # "kind" or "kind/route" -> software version
    cores: int = 1
    load: float = 0.0  # the host's 1-minute load average
    # node figures for the dashboard (src/audio_worker/node.py): percentages of one core for
    # the process (its encoders included), of the whole host otherwise
    cpu_percent: float = 0.0
    memory_bytes: int = 0
    host_cpu_percent: float = 0.0
    host_memory_percent: float = 0.0
    jobs_by_kind: dict[str, int] = field(default_factory=dict)  # results sent, per kind
    # its own presence interval (BROKER_HEARTBEAT_MS where it runs): the server's registry gives
    # each worker two of its own intervals, so a worker configured apart is not dropped between messages
    heartbeat_ms: int = 15000
    broker: str = ""  # host:port of the broker node it is connected to (a cluster's BROKER_HOSTS)
    # a GPU worker's device (src/audio_worker/node.py): what its process holds there, the card's size,
    # its utilisation (NVML, where the driver offers it; else None); 0 / None on a CPU
    precision: str = ""  # PRECISION of its model's arithmetic ("" for a worker without a model)
    gpu_memory_bytes: int = 0
    gpu_memory_total_bytes: int = 0
    gpu_percent: float | None = None
    # how far its current job is (0 to 1), as its runner counts frames; 0 when idle or not counted
    job_progress: float = 0.0

    def headers(self) -> dict[str, str]:
        return {"type": "presence", "content-type": "application/json"}

    def body(self) -> bytes:
        return json.dumps(asdict(self)).encode()


# -- validation of single fields ------------------------------------------------------------


def _header(headers: dict[str, str], name: str) -> str:
    if name not in headers:
        raise MalformedMessage(f"header {name!r} is missing")
    return headers[name]


def _int(headers: dict[str, str], name: str, low: int, high: int) -> int:
    raw = _header(headers, name)
    if not re.fullmatch(r"-?[0-9]{1,20}", raw):
        raise MalformedMessage(f"header {name!r} is not an integer: {_show(raw)}")
    return _in_range(name, int(raw), low, high)


def _in_range(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise MalformedMessage(f"{name} {value} is outside [{low}, {high}]")
    return value


def _match(headers: dict[str, str], name: str, pattern: re.Pattern) -> str:
    raw = _header(headers, name)
    if not pattern.fullmatch(raw):
        raise MalformedMessage(f"header {name!r} is not valid: {_show(raw)}")
    return raw


def _value(data: dict, name: str, kinds: tuple[type, ...], nullable: bool = False) -> Any:
    value = data[name]
    if value is None and nullable:
        return None
    if type(value) not in kinds:  # `type`, not isinstance: a bool is no integer here
        raise MalformedMessage(f"{name} is a {type(value).__name__}, not {'/'.join(k.__name__ for k in kinds)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise MalformedMessage(f"{name} is not finite")
    return value


def _no_constants(name: str) -> None:
    raise MalformedMessage(f"JSON holds {name}")


def _json_object(text: str | bytes, what: str, limit: int, keys: Collection[str] | None = None) -> dict:
    if len(text) > limit:
        raise MalformedMessage(f"{what} is {len(text)} bytes, more than {limit}")
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedMessage(f"{what} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedMessage(f"{what} is not a JSON object")
    if keys is not None and set(data) != set(keys):
        raise MalformedMessage(f"{what} has fields {_show(sorted(map(str, data)))}, expected {sorted(keys)}")
    return data


def _params(headers: dict[str, str]) -> dict[str, Any]:
    return _json_object(_header(headers, "params"), "header 'params'", MAX_PARAMS_CHARS)


def _no_body(what: str, body: bytes) -> None:
    if body:
        raise MalformedMessage(f"a {what} has no body (its bytes travel through the data store), "
                               f"this one has {len(body)} bytes")


def _ref(headers: dict[str, str], name: str) -> str:
    raw = _header(headers, name)
    if len(raw) > MAX_REF_CHARS or not REF.fullmatch(raw):
        raise MalformedMessage(f"header {name!r} is not an http(s) reference of at most {MAX_REF_CHARS} "
                               f"characters: {_show(raw)}")
    return raw


# -- whole messages ------------------------------------------------------------------------------


def _decode_job(headers: dict[str, str], body: bytes, kinds: Collection[str] | None) -> JobMessage:
    kind = _match(headers, "kind", NAME)
    route = _header(headers, "route")
    if route and not NAME.fullmatch(route):
        raise MalformedMessage(f"header 'route' is not a name: {_show(route)}")
    if kinds is not None and kind not in kinds:
        raise MalformedMessage(f"job kind {kind!r} is not one this worker runs ({', '.join(sorted(kinds))})")
    _no_body("job", body)
    return JobMessage(
        kind=kind,
        task_id=_int(headers, "task-id", 1, MAX_ID),
        job_id=_int(headers, "job-id", 1, MAX_ID),
        chunk=_int(headers, "chunk", 0, MAX_CHUNKS),
        task_token=_match(headers, "task-token", TOKEN),
        attempt_token=_match(headers, "attempt-token", TOKEN),
        params=_params(headers),
        route=route,
        input_ref=_ref(headers, "input"),
        input_size=_int(headers, "input-size", 0, MAX_OBJECT_BYTES),
        input_sha256=_match(headers, "input-sha256", SHA256),
        result_ref=_ref(headers, "result"),
    )


def _reply_to(headers: dict[str, str]) -> dict:
    """The fields by which a result or a failure names the job, task and attempt it answers."""
    return {
        "task_id": _int(headers, "task-id", 1, MAX_ID),
        "job_id": _int(headers, "job-id", 1, MAX_ID),
        "task_token": _match(headers, "task-token", TOKEN),
        "attempt_token": _match(headers, "attempt-token", TOKEN),
        "worker": _match(headers, "worker", NAME),
        "attempt": _int(headers, "attempt", 1, MAX_ATTEMPT),
    }


def _decode_result(headers: dict[str, str], body: bytes) -> ResultMessage:
    _no_body("result", body)
    return ResultMessage(
        kind=_match(headers, "kind", NAME),
        **_reply_to(headers),
        compute_ms=_int(headers, "compute-ms", 0, 10**9),
        params=_params(headers),
        version=_version(_header(headers, "version")),
        cpu_ms=_int(headers, "cpu-ms", 0, 10**12),
        energy_mj=_int(headers, "energy-mj", 0, 10**15),
        energy_source=_energy_source(_header(headers, "energy-source")),
        result_size=_int(headers, "result-size", 0, MAX_OBJECT_BYTES),
        result_sha256=_match(headers, "result-sha256", SHA256),
    )


def _version(text: str) -> str:
    if len(text) > MAX_VERSION_CHARS or not PRINTABLE.fullmatch(text):
        raise MalformedMessage(f"a version is one printable line of at most {MAX_VERSION_CHARS} characters")
    return text


def _energy_source(text: str) -> str:
    if text not in ("measured", "estimated"):
        raise MalformedMessage(f"energy source {_show(text)} is not measured or estimated")
    return text


def _decode_failure(headers: dict[str, str], body: bytes) -> FailureMessage:
    if body:
        raise MalformedMessage("a failure has no body")
    error = _header(headers, "error")
    if len(error) > MAX_ERROR_CHARS or not PRINTABLE.fullmatch(error):
        raise MalformedMessage("header 'error' is not one printable line of at most 500 characters")
    final = _header(headers, "final")
    if final not in ("true", "false"):
        raise MalformedMessage(f"header 'final' is not true or false: {_show(final)}")
    return FailureMessage(**_reply_to(headers), error=error, final=final == "true")


def _decode_control(headers: dict[str, str]) -> ControlMessage:
    action = _header(headers, "action")
    if action not in ("reset", "cancel", "announce"):
        raise MalformedMessage(f"unknown control action {_show(action)}")
    raw = headers.get("task-ids", "")
    items = raw.split(",") if raw else []
    if len(items) > MAX_CONTROL_IDS or not all(re.fullmatch(r"[0-9]{1,19}", i) for i in items):
        raise MalformedMessage(f"header 'task-ids' is not a list of task ids: {_show(raw)}")
    return ControlMessage(action, tuple(_in_range("task id", int(i), 1, MAX_ID) for i in items))


PRESENCE_FIELDS = tuple(f.name for f in fields(PresenceMessage))


def _decode_presence(body: bytes) -> PresenceMessage:
    data = _json_object(body, "presence body", MAX_PRESENCE_BYTES, PRESENCE_FIELDS)
    for name in ("worker", "model"):
        if not NAME.fullmatch(_value(data, name, (str,))):
            raise MalformedMessage(f"presence {name} is not a name: {_show(data[name])}")
    for name, limit in (("host", 255), ("address", 64), ("broker", 300)):
        value = _value(data, name, (str,))
        if len(value) > limit or not PRINTABLE.fullmatch(value):
            raise MalformedMessage(f"presence {name} is not one printable line of at most {limit} characters")
    if data["state"] not in ("idle", "busy", "leaving"):
        raise MalformedMessage(f"presence state {_show(data['state'])} is not idle, busy or leaving")
    _in_range("pid", _value(data, "pid", (int,)), 1, 2**31)
    _in_range("jobs_done", _value(data, "jobs_done", (int,)), 0, 2**31)
    for name in ("job_id", "task_id"):
        if _value(data, name, (int,), nullable=True) is not None:
            _in_range(name, data[name], 1, MAX_ID)
    mean = _value(data, "mean_job_seconds", (int, float), nullable=True)
    if mean is not None and not 0 <= mean <= 1e7:
        raise MalformedMessage(f"mean_job_seconds {mean} is outside [0, 1e7]")
    if not 0 <= _value(data, "sent_at", (int, float)) <= 1e11:
        raise MalformedMessage("sent_at is not a time")
    if not TOKEN.fullmatch(_value(data, "session", (str,))):
        raise MalformedMessage("presence session is not a token")
    if data["device"] not in ("cpu", "cuda"):
        raise MalformedMessage(f"presence device {_show(data['device'])} is not cpu or cuda")
    kinds = _value(data, "kinds", (list,))
    if len(kinds) > MAX_KINDS or not all(isinstance(k, str) and NAME.fullmatch(k) for k in kinds):
        raise MalformedMessage(f"presence kinds is not a list of kind names: {_show(kinds)}")
    offers = _value(data, "offers", (dict,))
    if len(offers) > MAX_OFFERS or not all(isinstance(o, str) and ROUTE_KEY.fullmatch(o) and isinstance(v, str)
                                           and _version(v) for o, v in offers.items()):
        raise MalformedMessage(f"presence offers is not a map of kind/route to version: {_show(offers)}")
    _in_range("cores", _value(data, "cores", (int,)), 1, 4096)
    for name, high in (("load", 1e6), ("cpu_percent", 100.0 * 4096), ("host_cpu_percent", 100.0),
                       ("host_memory_percent", 100.0)):
        if not 0 <= _value(data, name, (int, float)) <= high:
            raise MalformedMessage(f"{name} is outside [0, {high:g}]")
    _in_range("memory_bytes", _value(data, "memory_bytes", (int,)), 0, 2**50)
    for name in ("gpu_memory_bytes", "gpu_memory_total_bytes"):
        _in_range(name, _value(data, name, (int,)), 0, 2**50)
    gpu_percent = _value(data, "gpu_percent", (int, float), nullable=True)
    if gpu_percent is not None and not 0 <= gpu_percent <= 100:
        raise MalformedMessage(f"gpu_percent {gpu_percent} is outside [0, 100]")
    if not 0 <= _value(data, "job_progress", (int, float)) <= 1:
        raise MalformedMessage("job_progress is outside [0, 1]")
    if data["precision"] not in ("", "fp32", "tf32", "bf16"):
        raise MalformedMessage(f"presence precision {_show(data['precision'])} is not fp32, tf32 or bf16")
    _in_range("heartbeat_ms", _value(data, "heartbeat_ms", (int,)), 100, 3_600_000)
    jobs_by_kind = _value(data, "jobs_by_kind", (dict,))
    if len(jobs_by_kind) > MAX_KINDS or not all(
            isinstance(k, str) and NAME.fullmatch(k) and isinstance(n, int) and not isinstance(n, bool)
            and 0 <= n <= 2**31 for k, n in jobs_by_kind.items()):
        raise MalformedMessage(f"presence jobs_by_kind is not a map of kind to count: {_show(jobs_by_kind)}")
    return PresenceMessage(**{**data, "kinds": tuple(kinds)})


def decode(headers: dict[str, str], body: bytes, kinds: Collection[str] | None = None):
    """The message a frame carries; MalformedMessage with the reason if it is not a valid one of ours.

    `kinds`: the job kinds a job may be of (a worker passes the kinds it runs).
    """
    check_body(body)
    kind = headers.get("type")
    if kind == "job":
        return _decode_job(headers, body, kinds)
    if kind == "result":
        return _decode_result(headers, body)
    if kind == "failure":
        return _decode_failure(headers, body)
    if kind == "control":
        return _decode_control(headers)
    if kind == "presence":
        return _decode_presence(body)
    raise MalformedMessage(f"unknown message type {_show(kind)}")


@dataclass(frozen=True)
class Expected:
    """What the server expects of a reply: the job's task, its token and outstanding attempts."""

    kind: str
    task_id: int
    task_token: str
    attempt_tokens: frozenset[str]


def reply_mismatch(message: ResultMessage | FailureMessage, expected: Expected) -> str | None:
    """Why a decoded result or failure does not answer its job (None when it does)."""
    if message.task_id != expected.task_id or message.task_token != expected.task_token:
        return f"Job[{message.job_id}] does not belong to Task[{message.task_id}] with that task token"
    if message.attempt_token not in expected.attempt_tokens:
        return f"attempt token of Job[{message.job_id}] was not issued for an outstanding attempt"
    if isinstance(message, ResultMessage) and message.kind != expected.kind:
        return f"a {message.kind!r} result does not answer a {expected.kind!r} job"
    return None
