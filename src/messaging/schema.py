"""The messages server and workers exchange, and how they look on the wire.

Every message is a STOMP frame whose headers say what it is and whose body, if any,
is lossless audio: little-endian float32, planar (channel-major; for results
source-major, then channel), base64-encoded. Base64 because audio bodies are full of
NUL bytes, and stomp.py's reader re-scans its whole buffer at every NUL it sees,
which turns a raw 40 MB frame quadratic; base64 has no NUL and keeps reading linear
for a third more bytes.

- `JobMessage` (server → jobs queue): one chunk of one song for one job kind.
- `ResultMessage` (worker → results queue): the job's output.
- `FailureMessage` (worker → results queue): why a job failed, and whether for good.
- `ControlMessage` (server → control topic): stop work for some or all songs.
- `PresenceMessage` (worker → presence topic): who is alive and what it is doing.

`decode(headers, body)` turns a frame back into one of these or raises
`MalformedMessage`, so a message that is not ours is refused without crashing anyone.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

AUDIO_ENCODING = "base64;float32le;planar"


class MalformedMessage(ValueError):
    """A frame that is not one of ours, or is damaged."""


def encode_audio(array: np.ndarray) -> bytes:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes())


def decode_audio(body: bytes, shape: tuple[int, ...]) -> np.ndarray:
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedMessage(f"body is not base64: {exc}") from None
    expected = int(np.prod(shape)) * 4
    if len(raw) != expected:
        raise MalformedMessage(f"body holds {len(raw)} bytes of audio, headers announce {expected}")
    return np.frombuffer(raw, dtype="<f4").reshape(shape)


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

    def headers(self) -> dict[str, str]:
        channels, frames = self.audio.shape
        return {
            "type": "job",
            "kind": self.kind,
            "music-id": str(self.music_id),
            "job-id": str(self.job_id),
            "chunk": str(self.chunk),
            "song-token": self.song_token,
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

    def headers(self) -> dict[str, str]:
        n_sources, channels, frames = self.audio.shape
        return {
            "type": "result",
            "music-id": str(self.music_id),
            "job-id": str(self.job_id),
            "song-token": self.song_token,
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
    """A job that failed on a worker; `final` when no further attempt will be made."""

    music_id: int
    job_id: int
    song_token: str
    worker: str
    attempt: int
    error: str
    final: bool

    def headers(self) -> dict[str, str]:
        return {
            "type": "failure",
            "music-id": str(self.music_id),
            "job-id": str(self.job_id),
            "song-token": self.song_token,
            "worker": self.worker,
            "attempt": str(self.attempt),
            # STOMP header values are one line; keep the reason readable and bounded
            "error": " ".join(self.error.split())[:500],
            "final": "true" if self.final else "false",
        }


@dataclass(frozen=True)
class ControlMessage:
    """Stop the work of these songs (`music_ids`), or of every song when empty."""

    action: str
    music_ids: tuple[int, ...] = ()

    def headers(self) -> dict[str, str]:
        return {"type": "control", "action": self.action, "music-ids": ",".join(map(str, self.music_ids))}


@dataclass(frozen=True)
class PresenceMessage:
    """A worker's periodic 'I am alive' with what it is doing, for the operator panel."""

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

    def headers(self) -> dict[str, str]:
        return {"type": "presence", "content-type": "application/json"}

    def body(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def _int(headers: dict[str, str], name: str) -> int:
    try:
        return int(headers[name])
    except KeyError:
        raise MalformedMessage(f"header {name!r} is missing") from None
    except ValueError:
        raise MalformedMessage(f"header {name!r} is not an integer: {headers[name]!r}") from None


def _str(headers: dict[str, str], name: str) -> str:
    if name not in headers:
        raise MalformedMessage(f"header {name!r} is missing")
    return headers[name]


def _check_encoding(headers: dict[str, str]) -> None:
    if headers.get("encoding") != AUDIO_ENCODING:
        raise MalformedMessage(f"unsupported body encoding {headers.get('encoding')!r}")


def decode(headers: dict[str, str], body: bytes):
    """The message a frame carries; MalformedMessage if it is not one of ours."""
    kind = headers.get("type")
    if kind == "job":
        _check_encoding(headers)
        channels, frames = _int(headers, "channels"), _int(headers, "frames")
        try:
            params = json.loads(_str(headers, "params"))
        except json.JSONDecodeError:
            raise MalformedMessage("header 'params' is not JSON") from None
        if not isinstance(params, dict):
            raise MalformedMessage("header 'params' is not a JSON object")
        return JobMessage(
            music_id=_int(headers, "music-id"),
            job_id=_int(headers, "job-id"),
            chunk=_int(headers, "chunk"),
            song_token=_str(headers, "song-token"),
            kind=_str(headers, "kind"),
            model=_str(headers, "model"),
            samplerate=_int(headers, "samplerate"),
            total_frames=_int(headers, "total-frames"),
            slice_start=_int(headers, "slice-start"),
            audio=decode_audio(body, (channels, frames)),
            params=params,
        )
    if kind == "result":
        _check_encoding(headers)
        sources = tuple(s for s in _str(headers, "sources").split(",") if s)
        shape = (len(sources), _int(headers, "channels"), _int(headers, "frames"))
        return ResultMessage(
            music_id=_int(headers, "music-id"),
            job_id=_int(headers, "job-id"),
            song_token=_str(headers, "song-token"),
            worker=_str(headers, "worker"),
            attempt=_int(headers, "attempt"),
            out_start=_int(headers, "out-start"),
            sources=sources,
            compute_ms=_int(headers, "compute-ms"),
            audio=decode_audio(body, shape),
        )
    if kind == "failure":
        return FailureMessage(
            music_id=_int(headers, "music-id"),
            job_id=_int(headers, "job-id"),
            song_token=_str(headers, "song-token"),
            worker=_str(headers, "worker"),
            attempt=_int(headers, "attempt"),
            error=_str(headers, "error"),
            final=headers.get("final") == "true",
        )
    if kind == "control":
        ids = tuple(int(x) for x in headers.get("music-ids", "").split(",") if x.strip().isdigit())
        return ControlMessage(action=_str(headers, "action"), music_ids=ids)
    if kind == "presence":
        try:
            return PresenceMessage(**json.loads(body))
        except (json.JSONDecodeError, TypeError) as exc:
            raise MalformedMessage(f"presence body is not valid: {exc}") from None
    raise MalformedMessage(f"unknown message type {kind!r}")
