"""The messages server and workers exchange, how they look on the wire, and what a valid one is.

Every message is a STOMP frame whose headers say what it is and whose body, if any,
is lossless audio: little-endian float32, planar (channel-major; for results
source-major, then channel), base64-encoded. Base64 because audio bodies are full of
NUL bytes, and stomp.py's reader re-scans its whole buffer at every NUL it sees,
which turns a raw 40 MB frame quadratic; base64 has no NUL and keeps reading linear
for a third more bytes.

- `JobMessage` (server → jobs queue): one chunk of one song for one job kind.
- `ResultMessage` (worker → results queue): the job's output.
- `FailureMessage` (worker → results queue): why a job failed.
- `ControlMessage` (server → control topic): stop work for some or all songs.
- `PresenceMessage` (worker → presence topic): who is alive and what it is doing.

Anything may arrive on any destination (a message from another program, a damaged one,
a forged one), so this module is the one place that says what a valid message is: every
field's type, range and size, samples finite, strings and lists bounded. `decode(headers,
body)` returns a message only when all of that holds and raises `MalformedMessage` with
the reason otherwise; `result_mismatch` then checks a result against the job it claims to
answer (its outstanding attempt tokens and the shape the job implies). A job and its
result carry a per-publication `attempt-token`: the server issues a new one each time it
publishes a job and accepts a result or failure only with a token it issued for that job.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

AUDIO_ENCODING = "base64;float32le;planar"
KINDS = frozenset({"separate"})

MAX_ID = 2**63 - 1  # SQLite's INTEGER
MAX_CHANNELS = 8
MAX_SOURCES = 16
MAX_FRAMES = 2**28  # frames of one job's audio or output (far above what plan.MAX_RESULT_BYTES allows)
MAX_TOTAL_FRAMES = 2**40
MAX_SEGMENTS = 100_000
MAX_ATTEMPT = 1000
MAX_ERROR_CHARS = 500
MAX_PARAMS_CHARS = 4096
MAX_PRESENCE_BYTES = 4096
MAX_CONTROL_IDS = 1000
MAX_SAMPLE = 1e6  # |sample| of a result; demucs' outputs of normalised audio are a few units
TOKEN = re.compile(r"[0-9a-f]{32}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # worker, model and source names
PRINTABLE = re.compile(r"[\x20-\x7e]*")


class MalformedMessage(ValueError):
    """A frame that is not one of ours, is damaged, or does not fit what it answers."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def encode_audio(array: np.ndarray) -> bytes:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes())


def decode_audio(body: bytes, shape: tuple[int, ...], max_abs: float | None = None) -> np.ndarray:
    """The float32 array of `shape` a body holds; every sample finite (and within `max_abs`)."""
    samples = math.prod(shape)
    expected = 4 * -(-samples * 4 // 3)  # base64 of samples × 4 bytes, padded
    if len(body) != expected:
        raise MalformedMessage(f"body is {len(body)} bytes, a base64 float32 array of shape {shape} is {expected}")
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedMessage(f"body is not base64: {exc}") from None
    if len(raw) != samples * 4:
        raise MalformedMessage(f"body holds {len(raw)} bytes of audio, headers announce {samples * 4}")
    audio = np.frombuffer(raw, dtype="<f4").reshape(shape)
    if not np.isfinite(audio).all():
        raise MalformedMessage("audio holds NaN or infinite samples")
    if max_abs is not None and audio.size and float(np.abs(audio).max()) > max_abs:
        raise MalformedMessage(f"audio holds samples beyond ±{max_abs:g}")
    return audio


# -- the messages -------------------------------------------------------------------------


@dataclass(frozen=True)
class JobMessage:
    """One job: the audio a worker needs, and where its output belongs in the song."""

    music_id: int
    job_id: int
    chunk: int
    song_token: str
    kind: str
    model: str
    samplerate: int
    total_frames: int
    slice_start: int
    audio: np.ndarray = field(repr=False)  # (channels, frames) float32
    params: dict[str, Any] = field(default_factory=dict)  # kind-specific, JSON-able
    attempt_token: str = ""  # this publication of the job; its result must echo it

    def headers(self) -> dict[str, str]:
        channels, frames = self.audio.shape
        return {
            "type": "job",
            "kind": self.kind,
            "music-id": str(self.music_id),
            "job-id": str(self.job_id),
            "chunk": str(self.chunk),
            "song-token": self.song_token,
            "attempt-token": self.attempt_token,
            "model": self.model,
            "samplerate": str(self.samplerate),
            "total-frames": str(self.total_frames),
            "slice-start": str(self.slice_start),
            "channels": str(channels),
            "frames": str(frames),
            "params": json.dumps(self.params, separators=(",", ":")),
            "encoding": AUDIO_ENCODING,
        }

    def body(self) -> bytes:
        return encode_audio(self.audio)


@dataclass(frozen=True)
class ResultMessage:
    """A job's output: `audio` is (sources, channels, frames) starting at `out_start`."""

    music_id: int
    job_id: int
    song_token: str
    worker: str
    attempt: int
    out_start: int
    sources: tuple[str, ...]
    compute_ms: int
    audio: np.ndarray = field(repr=False)
    attempt_token: str = ""

    def headers(self) -> dict[str, str]:
        n_sources, channels, frames = self.audio.shape
        return {
            "type": "result",
            "music-id": str(self.music_id),
            "job-id": str(self.job_id),
            "song-token": self.song_token,
            "attempt-token": self.attempt_token,
            "worker": self.worker,
            "attempt": str(self.attempt),
            "out-start": str(self.out_start),
            "sources": ",".join(self.sources),
            "channels": str(channels),
            "frames": str(frames),
            "compute-ms": str(self.compute_ms),
            "encoding": AUDIO_ENCODING,
        }

    def body(self) -> bytes:
        return encode_audio(self.audio)


@dataclass(frozen=True)
class FailureMessage:
    """A job that failed on a worker. The server counts failures; `final` is the worker's view only."""

    music_id: int
    job_id: int
    song_token: str
    worker: str
    attempt: int
    error: str
    final: bool
    attempt_token: str = ""

    def headers(self) -> dict[str, str]:
        return {
            "type": "failure",
            "music-id": str(self.music_id),
            "job-id": str(self.job_id),
            "song-token": self.song_token,
            "attempt-token": self.attempt_token,
            "worker": self.worker,
            "attempt": str(min(self.attempt, MAX_ATTEMPT)),
            # STOMP header values are one line; keep the reason readable and bounded
            "error": clean_text(self.error),
            "final": "true" if self.final else "false",
        }


def clean_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """One printable line of at most `limit` characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in " ".join(str(text).split()))[:limit]


@dataclass(frozen=True)
class ControlMessage:
    """Stop the work of these songs (`music_ids`), or of every song when empty."""

    action: str
    music_ids: tuple[int, ...] = ()

    def headers(self) -> dict[str, str]:
        return {"type": "control", "action": self.action, "music-ids": ",".join(map(str, self.music_ids))}


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
    music_id: int | None
    jobs_done: int
    mean_job_seconds: float | None
    model: str
    sent_at: float
    session: str = ""
    device: str = "cpu"  # where the worker runs its model: cpu | cuda

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


def _json_object(text: str | bytes, what: str, keys: Collection[str], limit: int) -> dict:
    if len(text) > limit:
        raise MalformedMessage(f"{what} is {len(text)} bytes, more than {limit}")
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedMessage(f"{what} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedMessage(f"{what} is not a JSON object")
    if set(data) != set(keys):
        raise MalformedMessage(f"{what} has fields {_show(sorted(map(str, data)))}, expected {sorted(keys)}")
    return data


def _check_encoding(headers: dict[str, str]) -> None:
    if headers.get("encoding") != AUDIO_ENCODING:
        raise MalformedMessage(f"unsupported body encoding {_show(headers.get('encoding'))}")


# -- whole messages ------------------------------------------------------------------------------

JOB_PARAMS = ("first_offset", "segments", "stride", "segment_frames", "segment", "mean", "std")


def _job_params(headers: dict[str, str], slice_start: int, frames: int, total_frames: int) -> dict[str, Any]:
    p = _json_object(_header(headers, "params"), "header 'params'", JOB_PARAMS, MAX_PARAMS_CHARS)
    for name in ("first_offset", "segments", "stride", "segment_frames"):
        _value(p, name, (int,))
    segment = _value(p, "segment", (int, float), nullable=True)
    mean, std = _value(p, "mean", (int, float)), _value(p, "std", (int, float))
    if segment is not None and not 0 < segment <= 3600:
        raise MalformedMessage(f"segment {segment} is outside (0, 3600] seconds")
    if not 0 < std < 1e6 or abs(mean) > 1e6:
        raise MalformedMessage(f"normalisation mean {mean}, std {std} is not usable")
    _in_range("segments", p["segments"], 1, MAX_SEGMENTS)
    _in_range("segment_frames", p["segment_frames"], 1, MAX_FRAMES)
    _in_range("stride", p["stride"], 1, p["segment_frames"])
    first, last = p["first_offset"], p["first_offset"] + (p["segments"] - 1) * p["stride"]
    # every segment starts inside the audio sent, and the output stays inside the song
    if not slice_start <= first <= last < min(slice_start + frames, total_frames):
        raise MalformedMessage(f"segments {first}..{last} do not lie in the audio sent "
                               f"[{slice_start}, {slice_start + frames}) of a song of {total_frames} frames")
    if min(last + p["segment_frames"], total_frames) - first > MAX_FRAMES:
        raise MalformedMessage("the job's output would be too long")
    return p


def _decode_job(headers: dict[str, str], body: bytes, models: Collection[str] | None) -> JobMessage:
    _check_encoding(headers)
    kind = _header(headers, "kind")
    if kind not in KINDS:
        raise MalformedMessage(f"unknown job kind {_show(kind)}")
    model = _match(headers, "model", NAME)
    if models is not None and model not in models:
        raise MalformedMessage(f"model {model!r} is not one this deployment runs ({', '.join(sorted(models))})")
    total_frames = _int(headers, "total-frames", 1, MAX_TOTAL_FRAMES)
    slice_start = _int(headers, "slice-start", 0, total_frames - 1)
    channels = _int(headers, "channels", 1, MAX_CHANNELS)
    frames = _int(headers, "frames", 1, min(MAX_FRAMES, total_frames - slice_start))
    params = _job_params(headers, slice_start, frames, total_frames)
    return JobMessage(
        music_id=_int(headers, "music-id", 1, MAX_ID),
        job_id=_int(headers, "job-id", 1, MAX_ID),
        chunk=_int(headers, "chunk", 0, MAX_SEGMENTS),
        song_token=_match(headers, "song-token", TOKEN),
        attempt_token=_match(headers, "attempt-token", TOKEN),
        kind=kind,
        model=model,
        samplerate=_int(headers, "samplerate", 1000, 384_000),
        total_frames=total_frames,
        slice_start=slice_start,
        audio=decode_audio(body, (channels, frames)),
        params=params,
    )


def _reply_to(headers: dict[str, str]) -> dict:
    """The fields by which a result or a failure names the job, song and attempt it answers."""
    return {
        "music_id": _int(headers, "music-id", 1, MAX_ID),
        "job_id": _int(headers, "job-id", 1, MAX_ID),
        "song_token": _match(headers, "song-token", TOKEN),
        "attempt_token": _match(headers, "attempt-token", TOKEN),
        "worker": _match(headers, "worker", NAME),
        "attempt": _int(headers, "attempt", 1, MAX_ATTEMPT),
    }


def _decode_result(headers: dict[str, str], body: bytes) -> ResultMessage:
    _check_encoding(headers)
    sources = tuple(_header(headers, "sources").split(","))
    if not 1 <= len(sources) <= MAX_SOURCES or not all(NAME.fullmatch(s) for s in sources):
        raise MalformedMessage(f"header 'sources' is not a list of source names: {_show(headers['sources'])}")
    shape = (len(sources), _int(headers, "channels", 1, MAX_CHANNELS), _int(headers, "frames", 1, MAX_FRAMES))
    return ResultMessage(
        **_reply_to(headers),
        out_start=_int(headers, "out-start", 0, MAX_TOTAL_FRAMES),
        sources=sources,
        compute_ms=_int(headers, "compute-ms", 0, 10**9),
        audio=decode_audio(body, shape, max_abs=MAX_SAMPLE),
    )


def _decode_failure(headers: dict[str, str], body: bytes) -> FailureMessage:
    if body:
        raise MalformedMessage("a failure has no body")
    error = _header(headers, "error")
    if len(error) > MAX_ERROR_CHARS or not PRINTABLE.fullmatch(error):
        raise MalformedMessage("header 'error' is not one printable line of at most 500 characters")
    final = _header(headers, "final")
    if final not in ("true", "false"):
        raise MalformedMessage(f"header 'final' is not true or false: {_show(final)}")
    return FailureMessage(
        **_reply_to(headers),
        error=error,
        final=final == "true",
    )


def _decode_control(headers: dict[str, str]) -> ControlMessage:
    action = _header(headers, "action")
    if action != "reset":
        raise MalformedMessage(f"unknown control action {_show(action)}")
    raw = headers.get("music-ids", "")
    items = raw.split(",") if raw else []
    if len(items) > MAX_CONTROL_IDS or not all(re.fullmatch(r"[0-9]{1,19}", i) for i in items):
        raise MalformedMessage(f"header 'music-ids' is not a list of song ids: {_show(raw)}")
    return ControlMessage(action, tuple(_in_range("music id", int(i), 1, MAX_ID) for i in items))


PRESENCE_FIELDS = tuple(f.name for f in fields(PresenceMessage))


def _decode_presence(body: bytes) -> PresenceMessage:
    data = _json_object(body, "presence body", PRESENCE_FIELDS, MAX_PRESENCE_BYTES)
    for name in ("worker", "model"):
        if not NAME.fullmatch(_value(data, name, (str,))):
            raise MalformedMessage(f"presence {name} is not a name: {_show(data[name])}")
    for name, limit in (("host", 255), ("address", 64)):
        value = _value(data, name, (str,))
        if len(value) > limit or not PRINTABLE.fullmatch(value):
            raise MalformedMessage(f"presence {name} is not one printable line of at most {limit} characters")
    if data["state"] not in ("idle", "busy", "leaving"):
        raise MalformedMessage(f"presence state {_show(data['state'])} is not idle, busy or leaving")
    _in_range("pid", _value(data, "pid", (int,)), 1, 2**31)
    _in_range("jobs_done", _value(data, "jobs_done", (int,)), 0, 2**31)
    for name in ("job_id", "music_id"):
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
    return PresenceMessage(**data)


def decode(headers: dict[str, str], body: bytes, models: Collection[str] | None = None):
    """The message a frame carries; MalformedMessage with the reason if it is not a valid one of ours.

    `models`: the model names a job may ask for (a worker passes its deployment's MODEL).
    """
    kind = headers.get("type")
    if kind == "job":
        return _decode_job(headers, body, models)
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
    """What the server expects of a job's result: the job as stored, its attempts, the model's shape."""

    music_id: int
    song_token: str
    attempt_tokens: frozenset[str]
    sources: tuple[str, ...]
    channels: int
    out_start: int
    frames: int


def result_mismatch(message: ResultMessage | FailureMessage, expected: Expected) -> str | None:
    """Why a decoded result or failure does not answer its job (None when it does)."""
    if message.music_id != expected.music_id or message.song_token != expected.song_token:
        return f"Job[{message.job_id}] does not belong to Music[{message.music_id}] with that song token"
    if message.attempt_token not in expected.attempt_tokens:
        return f"attempt token of Job[{message.job_id}] was not issued for an outstanding attempt"
    if isinstance(message, FailureMessage):
        return None
    shape = (len(expected.sources), expected.channels, expected.frames)
    if message.sources != expected.sources:
        return f"sources {','.join(message.sources)} are not the model's {','.join(expected.sources)}"
    if message.out_start != expected.out_start or message.audio.shape != shape:
        return (f"result covers {message.audio.shape} from frame {message.out_start}; Job[{message.job_id}] "
                f"implies {shape} from frame {expected.out_start}")
    return None
