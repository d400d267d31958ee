"""Audio in and out of the server, through ffmpeg: probe, decode, statistics, render.

The server never holds a whole song in memory: the upload is decoded by ffmpeg straight
into a float32 file, statistics are computed in blocks, and downloads are rendered from
the float32 files block by block (WAV) or by ffmpeg (MP3). Subprocesses get argument
lists, never a shell.
"""

from __future__ import annotations

import json
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK_FRAMES = 1 << 20


class UnreadableAudio(ValueError):
    """The upload is not audio ffmpeg can decode; the message says why."""


@dataclass(frozen=True)
class Tags:
    title: str | None
    artist: str | None


def probe(path: Path) -> Tags:
    """The file's title and artist tags; UnreadableAudio if it holds no audio stream."""
    proc = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_type:format_tags:stream_tags",
         "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "ffprobe failed"
        raise UnreadableAudio(f"not a readable audio file ({reason.split(': ')[-1]})")
    info = json.loads(proc.stdout or "{}")
    streams = info.get("streams", [])
    if not any(s.get("codec_type") == "audio" for s in streams):
        raise UnreadableAudio("the file holds no audio stream")
    tags: dict[str, str] = {}
    for source in [info.get("format", {}).get("tags", {})] + [s.get("tags", {}) for s in streams]:
        for key, value in source.items():
            tags.setdefault(key.lower(), str(value).strip())
    return Tags(title=tags.get("title") or None, artist=tags.get("artist") or None)


def decode(source: Path, target: Path, samplerate: int, channels: int) -> int:
    """Decode `source` into float32 interleaved frames at `target`; returns the frame count."""
    proc = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-xerror", "-i", str(source), "-map", "0:a:0",
         "-ac", str(channels), "-ar", str(samplerate), "-f", "f32le", "-acodec", "pcm_f32le", "-y", str(target)],
        capture_output=True, text=True, timeout=3600,
    )
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"ffmpeg exit {proc.returncode}"
        raise UnreadableAudio(f"the audio cannot be decoded ({detail})")
    frames = target.stat().st_size // (4 * channels)
    if frames == 0:
        raise UnreadableAudio("the file decodes to no audio at all")
    return frames


def read_frames(path: Path, channels: int, start: int, count: int) -> np.ndarray:
    """Frames [start, start+count) of a float32 interleaved file, as (channels, frames)."""
    with path.open("rb") as f:
        f.seek(start * channels * 4)
        data = np.fromfile(f, dtype="<f4", count=count * channels)
    return data.reshape(-1, channels).T


def iter_blocks(path: Path, channels: int, block_frames: int = BLOCK_FRAMES):
    with path.open("rb") as f:
        while True:
            data = np.fromfile(f, dtype="<f4", count=block_frames * channels)
            if data.size == 0:
                return
            yield data.reshape(-1, channels)


def normalisation(path: Path, channels: int) -> tuple[float, float]:
    """Mean and standard deviation (+1e-8) of the mono sum, as demucs.api normalises a song."""
    count, total = 0, 0.0
    for block in iter_blocks(path, channels):
        mono = block.mean(axis=1, dtype=np.float64)
        count, total = count + mono.size, total + mono.sum()
    mean = total / count
    squares = 0.0
    for block in iter_blocks(path, channels):
        squares += float(((block.mean(axis=1, dtype=np.float64) - mean) ** 2).sum())
    std = (squares / max(1, count - 1)) ** 0.5
    return float(np.float32(mean)), float(np.float32(np.float32(std) + np.float32(1e-8)))


def to_pcm16(block: np.ndarray) -> bytes:
    return np.clip(np.round(block * 32767.0), -32768, 32767).astype("<i2").tobytes()


def render_wav(source: Path, target: Path, samplerate: int, channels: int) -> None:
    with wave.open(str(target), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(samplerate)
        for block in iter_blocks(source, channels):
            out.writeframes(to_pcm16(block))


def render_mp3(source: Path, target: Path, samplerate: int, channels: int) -> None:
    proc = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "f32le", "-ar", str(samplerate), "-ac", str(channels),
         "-i", str(source), "-codec:a", "libmp3lame", "-b:a", "192k", "-f", "mp3", "-y", str(target)],
        capture_output=True, text=True, timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"MP3 encoding failed: {proc.stderr.strip()[-300:]}")
