"""Audio out of the server, through ffmpeg: the files a user downloads.

Downloads are rendered from the float32 files block by block (the exact 16-bit samples)
and by ffmpeg (MP3, FLAC, tags, and rubberband for tempo and key). Subprocesses get
argument lists, never a shell.
"""

from __future__ import annotations

import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.media.pcm import iter_blocks, to_pcm16

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


def stretch_raw_parallel(source: Path, target: Path, samplerate: int, channels: int, tempo: float = 1.0,
                         semitones: int = 0) -> None:
    """A float32 file re-timed or re-keyed by rubberband, into another float32 file, one process per channel.

    Rubberband stretches the channels of a file apart anyway (its default), so running each
    in its own ffmpeg gives the same samples in about 1/channels of the time on as many cores:
    the download of a 5-minute stereo mix in a key stays under 10 s on two cores.
    """
    raw = ["-f", "f32le", "-ar", str(samplerate)]
    parts = [target.with_name(f"{target.name}.c{c}") for c in range(channels)]
    try:
        procs = [subprocess.Popen(
            ["ffmpeg", "-nostdin", "-v", "error", *raw, "-ac", str(channels), "-i", str(source),
             "-af", f"pan=mono|c0=c{c},{stretch_filter(tempo, semitones)}", *raw, "-ac", "1", "-y", str(part)],
            stderr=subprocess.PIPE, text=True) for c, part in enumerate(parts)]
        errors = [proc.communicate(timeout=3600)[1] for proc in procs]
        failed = [e for proc, e in zip(procs, errors, strict=True) if proc.returncode != 0]
        if failed:
            raise RuntimeError(f"rubberband failed: {failed[0].strip()[-300:]}")
        planes = [np.fromfile(part, dtype="<f4") for part in parts]
        frames = min(len(p) for p in planes)
        np.stack([p[:frames] for p in planes], axis=1).astype("<f4").tofile(target)
    finally:
        for part in parts:
            part.unlink(missing_ok=True)


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
