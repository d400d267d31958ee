"""The karaoke façade's files: from a finished `separate` task to what a user downloads.

The kind (`src.kinds.separation`) writes one float32 file per stem and the mix of the
chosen sources; this module only reads them. `render_mix` re-mixes a finished song when
the user picks other instruments (the façade saves that choice). `listening_mix`
renders any set of stems at any volumes, tempo and key for a download without touching
the song's saved choice (the page's player shifts the key itself as it plays; the server
renders a key only for this download). MP3, WAV and FLAC renderings of stems, of the
saved mix and of the original are made on first request and cached until the stems
change; `peaks` gives the page its waveforms without sending it the audio.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from src.kinds.separation import MIX
from src.media.atomic import atomic
from src.media.pcm import BLOCK_FRAMES, iter_blocks
from src.server import audio


@dataclass(frozen=True)
class Song:
    """A `separate` task as the karaoke façade sees it: its audio facts and its folder."""

    id: int
    name: str
    band: str
    frames: int
    samplerate: int
    channels: int
    folder: Path
    mix_selection: tuple[str, ...]  # the sources in the saved mix

    @property
    def duration(self) -> float:
        return self.frames / self.samplerate

    def audio(self) -> Path:
        return self.folder / "audio.f32"

    def stem(self, source: str, suffix: str = "f32") -> Path:
        return self.folder / "stems" / f"{source}.{suffix}"

    def mix(self, suffix: str = "f32") -> Path:
        return self.stem(MIX, suffix)


ORIGINAL = "original"
PEAK_POINTS = 800
# Key-shifted renderings kept per song (each about the song's size), the least recently used
# evicted: without a cap, 6 sources x 3 formats x 24 keys could be cached for every song.
MAX_KEY_RENDERINGS = 12


def _used(song: Song, target: Path) -> None:
    """Mark a key-shifted rendering used now; evict the least recently used beyond MAX_KEY_RENDERINGS."""
    target.touch()
    shifted = [p for folder in (song.folder, song.folder / "stems") for p in folder.glob("[!.]*.st[+-]*")]
    for old in sorted(shifted, key=_last_used, reverse=True)[MAX_KEY_RENDERINGS:]:
        old.unlink(missing_ok=True)


def _last_used(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:  # evicted by another request meanwhile
        return 0


def _forget_renderings(song: Song) -> None:
    for path in song.mix().parent.glob(f"{MIX}.*"):
        if path.suffix != ".f32":
            path.unlink(missing_ok=True)


def render_mix(song: Song, sources: Sequence[str]) -> None:
    """Re-mix a finished song from its stems with another choice of instruments."""
    with atomic(song.mix()) as path, path.open("wb") as out:
        _write_mix(song, [(name, 1.0) for name in sources], out)
    _forget_renderings(song)
    (song.folder / "outputs" / f"{MIX}.wav").unlink(missing_ok=True)


def _write_mix(song: Song, parts: Sequence[tuple[str, float]], out: BinaryIO) -> None:
    """Write the sum of these stems, each times its gain, as float32 frames, block by block."""
    readers = [(iter_blocks(song.stem(name), song.channels), np.float32(gain)) for name, gain in parts]
    remaining = song.frames
    while remaining > 0:
        n = min(BLOCK_FRAMES, remaining)
        mix = np.zeros((n, song.channels), dtype=np.float32)
        for reader, gain in readers:
            mix += gain * next(reader)  # a gain of 1 is exact: the saved mix stays the plain sum
        mix.astype("<f4").tofile(out)
        remaining -= n


def _raw(song: Song, source: str | None) -> Path:
    """The float32 file of a stem, of the saved mix (None) or of the decoded original."""
    if source is None:
        return song.mix()
    return song.audio() if source == ORIGINAL else song.stem(source)


def rendering(song: Song, source: str | None, fmt: str, semitones: int = 0) -> Path:
    """Path of a tagged rendering of a stem, of the saved mix (None) or of the original, cached.

    A key shift (`semitones`, `?semitones=` on a download) keeps the tempo.
    """
    suffix = f"st{semitones:+d}.{fmt}" if semitones else fmt
    if source is None:
        target = song.mix(suffix)
        held = song.mix_selection
    elif source == ORIGINAL:
        target = song.folder / f"original.{suffix}"
        held = (ORIGINAL,)
    else:
        target = song.stem(source, suffix)
        held = (source,)
    if not target.exists():
        with atomic(target) as temporary:
            audio.render(_raw(song, source), temporary, song.samplerate, song.channels, fmt,
                         audio.Tags(song.name, song.band, held), semitones=semitones)
    if semitones:
        _used(song, target)
    return target


def practice_source(song: Song, source: str) -> Path:
    """The float32 file the page's player streams: a stem or the original (the page shifts the key)."""
    return _raw(song, source)


def listening_mix(song: Song, parts: Sequence[tuple[str, float]], fmt: str, tempo: float = 1.0,
                  semitones: int = 0) -> Path:
    """A one-off rendering of these stems at these volumes, tempo and key: what the page plays.

    Nothing about the song changes (its saved selection, mix and times stay as they are). The
    file is temporary: the caller sends it and deletes it.
    """
    work = song.folder / "renders"
    work.mkdir(parents=True, exist_ok=True)
    raw, target = work / f"{uuid.uuid4().hex}.f32", work / f"{uuid.uuid4().hex}.{fmt}"
    stretched = raw.with_suffix(".stretched.f32")
    try:
        with raw.open("wb") as out:
            _write_mix(song, parts, out)  # the audible stems summed first: one stretch, not one per stem
        if audio.stretch_filter(tempo, semitones):
            audio.stretch_raw_parallel(raw, stretched, song.samplerate, song.channels, tempo, semitones)
            raw.unlink()
            stretched.rename(raw)
        audio.render(raw, target, song.samplerate, song.channels, fmt,
                     audio.Tags(song.name, song.band, tuple(name for name, _ in parts)))
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    finally:
        raw.unlink(missing_ok=True)
        stretched.unlink(missing_ok=True)
    return target


def peaks(song: Song, sources: Sequence[str], points: int = PEAK_POINTS) -> dict:
    """Per stem (and the original), `points` (low, high) pairs of the first channel for a waveform.

    Read through a memory map in slices, so a long song costs the server no more memory
    than a short one, and the page draws its waveforms without downloading any audio.
    """
    cache = song.folder / "peaks.json"
    if cache.exists():
        return json.loads(cache.read_text())
    edges = np.linspace(0, song.frames, points + 1).astype(np.int64)
    result = {"duration": song.duration, "points": points, "peaks": {}}
    for name in [*sources, ORIGINAL]:
        data = np.memmap(_raw(song, name), dtype="<f4", mode="r").reshape(-1, song.channels)
        pairs = []
        for start, end in zip(edges[:-1], edges[1:], strict=True):
            piece = data[start:max(end, start + 1), 0]
            pairs.append((float(piece.min(initial=0)), float(piece.max(initial=0))))
        scale = max(1e-3, *(max(-low, high) for low, high in pairs))
        result["peaks"][name] = [[round(low / scale, 3), round(high / scale, 3)] for low, high in pairs]
        del data
    with atomic(cache) as temporary:
        temporary.write_text(json.dumps(result))
    return result
