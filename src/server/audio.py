"""Audio in and out of the server, through ffmpeg: probe, decode, statistics, render.

The server never holds a whole song in memory: the upload is decoded by ffmpeg straight
into a float32 file, statistics are computed in blocks, and downloads are rendered from
the float32 files block by block (the exact 16-bit samples) and by ffmpeg (MP3, FLAC, tags,
and rubberband for tempo and key). Subprocesses get argument lists, never a shell.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK_FRAMES = 1 << 20


class UnreadableAudio(ValueError):
    """The upload is not audio ffmpeg can decode; the message says why."""


class RefusedAudio(ValueError):
    """Readable audio that this server will not take (too long, too many channels...)."""


# Demuxers an upload may be read with: audio containers only, never a playlist (hls,
# concat) or anything else that opens further files or the network. Without this list
# ffmpeg guesses the format from the content, and an uploaded HLS playlist naming a file
# on the server became a song holding that file's audio.
AUDIO_DEMUXERS = ",".join([
    "mp3", "wav", "w64", "flac", "ogg", "mov", "matroska", "aac", "aiff", "caf", "asf", "wv", "ape",
    "tta", "au", "amr", "ac3", "eac3", "mpc", "mpc8", "tak", "dsf", "shorten", "voc",
])
INPUT_GUARD = ["-protocol_whitelist", "file", "-format_whitelist", AUDIO_DEMUXERS]
SAMPLERATES = (8000, 192000)
TAG_CHARACTERS = 200


@dataclass(frozen=True)
class Probe:
    """What ffprobe says of an upload, read before anything is decoded."""

    title: str | None
    artist: str | None
    duration: float | None
    samplerate: int
    channels: int
    codec: str


def clean_tag(value: object) -> str | None:
    """A tag value fit to show and to put in a file name: one line, printable, bounded."""
    text = " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", str(value)).split())
    return text[:TAG_CHARACTERS].strip() or None


def _last_line(stderr: str, path: Path) -> str:
    """ffmpeg's last complaint, without the server's paths in it."""
    lines = stderr.strip().splitlines()
    reason = lines[-1] if lines else ""
    return reason.replace(str(path), "the upload").replace(path.name, "the upload").split(": ")[-1].strip()


def probe(path: Path) -> Probe:
    """Streams, duration and tags of the upload; UnreadableAudio if it holds no audio we read."""
    proc = subprocess.run(
        ["ffprobe", "-v", "error", *INPUT_GUARD, "-show_entries",
         "format=duration:format_tags:stream=codec_type,codec_name,sample_rate,channels,duration:stream_tags",
         "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    if proc.returncode != 0:
        raise UnreadableAudio(f"not a readable audio file ({_last_line(proc.stderr, path) or 'ffprobe failed'})")
    info = json.loads(proc.stdout or "{}")
    streams = info.get("streams", [])
    audio_streams = [s for s in streams if s.get("codec_type") == "audio"]
    if not audio_streams:
        raise UnreadableAudio("the file holds no audio stream")
    first = audio_streams[0]
    tags: dict[str, str] = {}
    for source in [info.get("format", {}).get("tags", {})] + [s.get("tags", {}) for s in streams]:
        for key, value in source.items():
            tags.setdefault(key.lower(), value)
    duration = _number(info.get("format", {}).get("duration")) or _number(first.get("duration"))
    return Probe(title=clean_tag(tags.get("title", "")), artist=clean_tag(tags.get("artist", "")),
                 duration=duration, samplerate=int(_number(first.get("sample_rate")) or 0),
                 channels=int(first.get("channels") or 0), codec=str(first.get("codec_name", "")))


def _number(value: object) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def check_limits(found: Probe, max_duration_s: float, max_channels: int) -> None:
    """RefusedAudio for what would be too costly to decode, before decoding any of it."""
    low, high = SAMPLERATES
    if not low <= found.samplerate <= high:
        raise RefusedAudio(f"the sample rate {found.samplerate} Hz is outside {low}–{high} Hz")
    if not 1 <= found.channels <= max_channels:
        raise RefusedAudio(f"{found.channels} channels; at most {max_channels} are taken (MAX_CHANNELS)")
    if found.duration is not None and found.duration > max_duration_s:
        raise RefusedAudio(f"the audio lasts {found.duration:.0f} s; at most {max_duration_s:.0f} s are taken "
                           "(MAX_DURATION_S)")


def decode(source: Path, target: Path, samplerate: int, channels: int, max_duration_s: float) -> int:
    """Decode `source` into float32 interleaved frames at `target`; returns the frame count.

    Output is capped at MAX_DURATION_S (a header can lie about the length), by time and
    by bytes, so no upload can make the server write more than that.
    """
    cap_frames = int(max_duration_s * samplerate)
    proc = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-xerror", *INPUT_GUARD, "-i", str(source), "-map", "0:a:0",
         "-t", f"{max_duration_s + 1:.3f}", "-fs", str((cap_frames + samplerate) * channels * 4),
         "-ac", str(channels), "-ar", str(samplerate), "-f", "f32le", "-acodec", "pcm_f32le", "-y", str(target)],
        capture_output=True, text=True, timeout=3600,
    )
    if proc.returncode != 0:
        detail = _last_line(proc.stderr, source) or f"ffmpeg exit {proc.returncode}"
        raise UnreadableAudio(f"the audio cannot be decoded ({detail})")
    frames = target.stat().st_size // (4 * channels)
    if frames == 0:
        raise UnreadableAudio("the file decodes to no audio at all")
    if frames > cap_frames:
        raise RefusedAudio(f"the audio lasts longer than {max_duration_s:.0f} s (MAX_DURATION_S)")
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


FORMATS = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac"}
ENCODERS = {"mp3": ["-codec:a", "libmp3lame", "-b:a", "192k"], "wav": ["-codec:a", "pcm_s16le"],
            "flac": ["-codec:a", "flac"]}


@dataclass(frozen=True)
class Tags:
    """What every downloaded file says of itself: the song, its band, and the stems it holds."""

    title: str
    artist: str
    stems: tuple[str, ...]

    def ffmpeg_args(self) -> list[str]:
        held = "+".join(self.stems)
        # `comment` reaches every container (ID3 COMM, Vorbis COMMENT, WAV ICMT); `stems` is
        # a custom key for the containers that keep one (ID3 TXXX, Vorbis comments)
        pairs = {"title": self.title, "artist": self.artist, "comment": f"stems: {held}", "stems": held}
        return [arg for key, value in pairs.items() if value for arg in ("-metadata", f"{key}={value}")]


def stretch_filter(tempo: float = 1.0, semitones: int = 0) -> str | None:
    """ffmpeg's rubberband filter for a tempo factor and a key shift, or None for neither."""
    if tempo == 1.0 and semitones == 0:
        return None
    return f"rubberband=tempo={tempo:.4f}:pitch={2 ** (semitones / 12):.6f}"


def render(source: Path, target: Path, samplerate: int, channels: int, fmt: str, tags: Tags,
           tempo: float = 1.0, semitones: int = 0) -> None:
    """Encode a float32 file as MP3, WAV or FLAC, tagged, optionally re-timed or re-keyed.

    Without a stretch, WAV and FLAC hold exactly the 16-bit samples `to_pcm16` makes (the
    contract's lossless download, sample for sample); ffmpeg only adds the tags or packs
    them into FLAC. A stretch goes through rubberband, which keeps pitch when it changes
    tempo and tempo when it changes pitch.
    """
    stretch = stretch_filter(tempo, semitones)
    if stretch is None and fmt in ("wav", "flac"):
        pcm = target.with_name(target.name + ".pcm.wav")
        try:
            _render_pcm_wav(source, pcm, samplerate, channels)
            _ffmpeg(["-i", str(pcm), "-codec:a", "copy" if fmt == "wav" else "flac"], target, fmt, tags)
        finally:
            pcm.unlink(missing_ok=True)
        return
    raw_input = ["-f", "f32le", "-ar", str(samplerate), "-ac", str(channels), "-i", str(source)]
    _ffmpeg([*raw_input, *(["-af", stretch] if stretch else []), *ENCODERS[fmt]], target, fmt, tags)


def stretch_raw(source: Path, target: Path, samplerate: int, channels: int, tempo: float = 1.0,
                semitones: int = 0) -> None:
    """A float32 file re-timed or re-keyed by rubberband, into another float32 file."""
    raw = ["-f", "f32le", "-ar", str(samplerate), "-ac", str(channels)]
    proc = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", *raw, "-i", str(source), "-af", stretch_filter(tempo, semitones),
         *raw, "-y", str(target)], capture_output=True, text=True, timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"rubberband failed: {proc.stderr.strip()[-300:]}")


def _ffmpeg(arguments: list[str], target: Path, fmt: str, tags: Tags) -> None:
    proc = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", *arguments, *tags.ffmpeg_args(), "-f", fmt, "-y", str(target)],
        capture_output=True, text=True, timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{fmt} encoding failed: {proc.stderr.strip()[-300:]}")


def _render_pcm_wav(source: Path, target: Path, samplerate: int, channels: int) -> None:
    with wave.open(str(target), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(samplerate)
        for block in iter_blocks(source, channels):
            out.writeframes(to_pcm16(block))
