"""Audio as float32 files: decoding an upload into one, and reading it back in blocks.

ffmpeg decodes straight into the file, so no process holds a whole song in memory;
frames are interleaved little-endian float32 at the rate and channels asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from src.media import guard
from src.media.probe import RefusedMedia, UnreadableMedia, last_line

BLOCK_FRAMES = 1 << 20
SAMPLE_BYTES = 4  # float32


def decode(source: Path, target: Path, samplerate: int, channels: int, max_duration_s: float) -> int:
    """Decode `source` into float32 interleaved frames at `target`; returns the frame count.

    Output is capped at MAX_DURATION_S (a header can lie about the length), by time and
    by bytes, so no upload can make the server write more than that.
    """
    cap_frames = int(max_duration_s * samplerate)
    try:
        source_input = guard.ffmpeg_input(source, guard.UPLOAD, source.parent)
    except guard.OutsideFolder as exc:
        raise UnreadableMedia(f"the audio cannot be decoded ({exc})") from None
    proc = guard.run(  # guard.run: a server phase counts the child's CPU
        ["ffmpeg", "-nostdin", "-v", "error", "-xerror", *source_input, "-map", "0:a:0",
         "-t", f"{max_duration_s + 1:.3f}", "-fs", str((cap_frames + samplerate) * channels * SAMPLE_BYTES),
         "-ac", str(channels), "-ar", str(samplerate), "-f", "f32le", "-acodec", "pcm_f32le", "-y", str(target)],
        capture_output=True, text=True, timeout=3600,
    )
    if proc.returncode != 0:
        detail = last_line(proc.stderr, source) or f"ffmpeg exit {proc.returncode}"
        raise UnreadableMedia(f"the audio cannot be decoded ({detail})")
    frames = target.stat().st_size // (SAMPLE_BYTES * channels)
    if frames == 0:
        raise UnreadableMedia("the file decodes to no audio at all")
    if frames > cap_frames:
        raise RefusedMedia(f"the audio lasts longer than {max_duration_s:.0f} s (MAX_DURATION_S)")
    return frames


def read_frames(path: Path, channels: int, start: int, count: int) -> np.ndarray:
    """Frames [start, start+count) of a float32 interleaved file, as (channels, frames)."""
    with path.open("rb") as f:
        f.seek(start * channels * SAMPLE_BYTES)
        data = np.fromfile(f, dtype="<f4", count=count * channels)
    return data.reshape(-1, channels).T


def iter_blocks(path: Path, channels: int, block_frames: int = BLOCK_FRAMES):
    with path.open("rb") as f:
        while True:
            data = np.fromfile(f, dtype="<f4", count=block_frames * channels)
            if data.size == 0:
                return
            yield data.reshape(-1, channels)


def to_pcm16(block: np.ndarray) -> bytes:
    return np.clip(np.round(block * 32767.0), -32768, 32767).astype("<i2").tobytes()
