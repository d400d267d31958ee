"""Plain helpers for tests: HTTP calls with urllib, polling, and audio comparison."""

from __future__ import annotations

import io
import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import wave
from collections.abc import Callable
from email.message import Message
from pathlib import Path

import numpy as np
import pytest

from src.server.services import EXTENSION, Services

# Called with (method, url, status, response headers, body) after every answer request() gets:
# tests/openapi_check.py adds the check of each answer against the API's OpenAPI document.
observers: list[Callable[[str, str, int, Message, bytes], None]] = []


def request(method: str, url: str, body: bytes | None = None, content_type: str | None = None,
            timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, headers, data = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        status, headers, data = err.code, err.headers, err.read()
    for observe in observers:
        observe(method, url, status, headers, data)
    return status, data


def get(url: str) -> tuple[int, bytes]:
    return request("GET", url)


def get_json(url: str):
    status, body = get(url)
    assert status == 200, f"GET {url} -> {status} {body[:300]!r}"
    return json.loads(body)


def post_json(url: str, payload) -> tuple[int, dict]:
    status, body = request("POST", url, json.dumps(payload).encode(), "application/json")
    return status, json.loads(body)


def upload(url: str, path: Path) -> dict:
    status, body = request("POST", url + "/music", path.read_bytes(), "application/octet-stream")
    assert status == 200, body
    return json.loads(body)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_ready(client, music_id: int, timeout: float = 60) -> dict:
    """Wait (Flask test client) until an upload's background decode has ended, either way."""

    def decoded():
        status = client.get(f"/music/{music_id}").get_json()
        return status if status["ready"] or status["state"] == "failed" else None

    return wait_for(decoded, timeout, f"music {music_id} to be decoded")


def wav_array(data: bytes) -> tuple[np.ndarray, int]:
    """(frames, channels) float array in [-1, 1) and the sample rate of a 16-bit WAV."""
    with wave.open(io.BytesIO(data)) as w:
        assert w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
        return pcm.astype(np.float64) / 32767.0, w.getframerate()


def decode_with_ffmpeg(data: bytes, samplerate: int = 44100) -> np.ndarray:
    """Decode any audio (MP3...) with ffmpeg to (frames, 2) float32.

    From a file, not a pipe: only a seekable input lets ffmpeg honour the MP3's gapless
    header (encoder delay and padding), which is what makes its length exact.
    """
    with tempfile.NamedTemporaryFile(suffix=".audio") as f:
        f.write(data)
        f.flush()
        proc = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", f.name, "-ac", "2", "-ar", str(samplerate),
                               "-f", "f32le", "pipe:1"], capture_output=True, check=True, timeout=120)
    return np.frombuffer(proc.stdout, dtype="<f4").reshape(-1, 2)


def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Signal-to-distortion ratio in dB of `estimate` against `reference`."""
    reference, estimate = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
    noise = ((reference - estimate) ** 2).sum()
    return float(10 * np.log10((reference ** 2).sum() / max(noise, 1e-30)))


def reference_stems(song: Path, segment: float = 2.0) -> dict[str, np.ndarray]:
    """Whole-file demucs_unittest (the fault-free result) as 16-bit WAV values, (frames, channels)."""
    import torch
    from demucs.api import Separator

    torch.manual_seed(0)  # the same random weights every worker builds
    separator = Separator(model="demucs_unittest", shifts=0, overlap=0.25, split=True, segment=segment, device="cpu")
    wav = decode_with_ffmpeg(song.read_bytes()).T.copy()
    _, stems = separator.separate_tensor(torch.from_numpy(wav))
    return {name: np.clip(np.round(s.numpy().T * 32767), -32768, 32767) / 32767 for name, s in stems.items()}


def served_stems(base: str, music_id: int) -> dict[str, np.ndarray]:
    status = get_json(f"{base}/music/{music_id}")
    return {i["name"]: wav_array(get(i["track"] + "?format=wav")[1])[0] for i in status["instruments"]}


def metric(base: str, name: str) -> float:
    """A counter or gauge's value from /metrics."""
    text = get(base + "/metrics")[1].decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def queue_depth(prefix: str, name: str) -> int:
    """Messages on one of a test's queues, ready or unacknowledged."""
    return sum(queue_counts(prefix, name))


def queue_counts(prefix: str, name: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of one of a test's queues."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged"],
                         capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == f"{prefix}.{name}":
            return int(parts[1]), int(parts[2])
    return 0, 0


def services_of(app) -> Services:
    """The services of an app made by the factory."""
    return app.extensions[EXTENSION]
