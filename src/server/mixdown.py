"""From stored job results to the files a user downloads: stems, mixes, the original.

`write_stems` streams the merge (`src.separation.merge`) into one float32 file per
source and the mix of the chosen sources beside them; `render_mix` re-mixes a finished
song when the user picks other instruments (and saves that choice). `listening_mix`
renders any set of stems at any volumes, tempo and key for a download without touching
the song's saved choice. MP3, WAV and FLAC renderings of stems (also key-shifted for the
page's practice player), of the saved mix and of the original are made on first request
and cached until the stems change; `peaks` gives the page its waveforms without sending
it the audio.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import numpy as np

from src.separation.merge import merge_results
from src.separation.model import ModelSpec
from src.server import audio
from src.server.files import SongFiles
from src.server.store import Music, Store, Track

ORIGINAL = "original"
PEAK_POINTS = 800


def _selected_sources(store: Store, music_id: int, track_ids: list[int]) -> set[str]:
    chosen = set(track_ids)
    return {t.name for t in store.tracks(music_id) if t.id in chosen}


def _forget_renderings(files: SongFiles, music_id: int) -> None:
    for path in files.song_dir(music_id).glob("mix.*"):
        if path.suffix != ".f32":
            path.unlink(missing_ok=True)


def write_stems(store: Store, files: SongFiles, spec: ModelSpec, music_id: int) -> list[int]:
    """Merge every job result of a song into stems and the mix; returns the mixed track ids."""
    music = store.music(music_id)
    selection = music.selection or []
    chosen = _selected_sources(store, music_id, selection)
    jobs = {job.plan: job for job in store.jobs(music_id)}

    with ExitStack() as stack:
        stem_out: list[BinaryIO] = []
        for source in spec.sources:
            path = stack.enter_context(files.atomic(files.stem(music_id, source)))
            stem_out.append(stack.enter_context(path.open("wb")))
        mix_path = stack.enter_context(files.atomic(files.mix(music_id)))
        mix_out = stack.enter_context(mix_path.open("wb"))

        def emit(start: int, block: np.ndarray) -> None:
            mix = np.zeros(block.shape[1:], dtype=np.float32)
            for index, source in enumerate(spec.sources):
                block[index].T.astype("<f4").tofile(stem_out[index])
                if source in chosen:
                    mix += block[index]
            mix.T.astype("<f4").tofile(mix_out)

        merge_results(spec, list(jobs), music.frames, music.norm_mean, music.norm_std,
                      lambda plan: np.load(files.result(music_id, jobs[plan].id)), emit)
        for handle in (*stem_out, mix_out):
            handle.close()
    _forget_renderings(files, music_id)
    for path in files.stem(music_id, "-").parent.iterdir():  # renderings of the old stems, if any
        if path.suffix != ".f32":
            path.unlink(missing_ok=True)
    (files.song_dir(music_id) / "peaks.json").unlink(missing_ok=True)
    return selection


def render_mix(store: Store, files: SongFiles, music_id: int, track_ids: list[int]) -> None:
    """Re-mix a finished song from its stems with another choice of instruments."""
    music = store.music(music_id)
    chosen = [(t.name, 1.0) for t in store.tracks(music_id) if t.id in set(track_ids)]
    with files.atomic(files.mix(music_id)) as path, path.open("wb") as out:
        _write_mix(files, music, chosen, out)
    _forget_renderings(files, music_id)
    store.mark_done(music_id, track_ids)


def _write_mix(files: SongFiles, music: Music, parts: Sequence[tuple[str, float]], out: BinaryIO) -> None:
    """Write the sum of these stems, each times its gain, as float32 frames, block by block."""
    readers = [(audio.iter_blocks(files.stem(music.id, name), music.channels), np.float32(gain))
               for name, gain in parts]
    remaining = music.frames
    while remaining > 0:
        n = min(audio.BLOCK_FRAMES, remaining)
        mix = np.zeros((n, music.channels), dtype=np.float32)
        for reader, gain in readers:
            mix += gain * next(reader)  # a gain of 1 is exact: the saved mix stays the plain sum
        mix.astype("<f4").tofile(out)
        remaining -= n


def _raw(files: SongFiles, music_id: int, source: str | None) -> Path:
    """The float32 file of a stem, of the saved mix (None) or of the decoded original."""
    if source is None:
        return files.mix(music_id)
    return files.audio(music_id) if source == ORIGINAL else files.stem(music_id, source)


def rendering(store: Store, files: SongFiles, music: Music, source: str | None, fmt: str,
              semitones: int = 0) -> Path:
    """Path of a tagged rendering of a stem, of the saved mix (None) or of the original, cached.

    A key shift (`semitones`) is what the page's practice player streams; it keeps the tempo.
    """
    suffix = f"st{semitones:+d}.{fmt}" if semitones else fmt
    if source is None:
        target = files.mix(music.id, suffix)
        held = tuple(t.name for t in store.tracks(music.id) if t.id in set(music.mix_selection or []))
    elif source == ORIGINAL:
        target = files.song_dir(music.id) / f"original.{suffix}"
        held = (ORIGINAL,)
    else:
        target = files.stem(music.id, source, suffix)
        held = (source,)
    if not target.exists():
        with files.atomic(target) as temporary:
            audio.render(_raw(files, music.id, source), temporary, music.samplerate, music.channels, fmt,
                         audio.Tags(music.name, music.band, held), semitones=semitones)
    return target


def practice_source(files: SongFiles, music: Music, source: str, semitones: int = 0) -> Path:
    """The float32 file the page's player streams: a stem or the original, key-shifted if asked.

    A key shift is rendered once by rubberband (tempo kept) and cached beside the stems;
    the player goes on with the unshifted audio until it is there.
    """
    raw = _raw(files, music.id, source)
    if not semitones:
        return raw
    target = raw.with_name(f"{raw.stem}.st{semitones:+d}.pcm")
    if not target.exists():
        with files.atomic(target) as temporary:
            audio.stretch_raw(raw, temporary, music.samplerate, music.channels, semitones=semitones)
    return target


def listening_mix(files: SongFiles, music: Music, parts: Sequence[tuple[Track, float]], fmt: str,
                  tempo: float = 1.0, semitones: int = 0) -> Path:
    """A one-off rendering of these stems at these volumes, tempo and key: what the page plays.

    Nothing about the song changes (its saved selection, mix and times stay as they are). The
    file is temporary: the caller sends it and deletes it.
    """
    work = files.song_dir(music.id) / "renders"
    work.mkdir(parents=True, exist_ok=True)
    raw, target = work / f"{uuid.uuid4().hex}.f32", work / f"{uuid.uuid4().hex}.{fmt}"
    try:
        with raw.open("wb") as out:
            _write_mix(files, music, [(track.name, gain) for track, gain in parts], out)
        audio.render(raw, target, music.samplerate, music.channels, fmt,
                     audio.Tags(music.name, music.band, tuple(track.name for track, _ in parts)), tempo, semitones)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    finally:
        raw.unlink(missing_ok=True)
    return target


def peaks(store: Store, files: SongFiles, music: Music, points: int = PEAK_POINTS) -> dict:
    """Per stem (and the original), `points` (low, high) pairs of the first channel for a waveform.

    Read through a memory map in slices, so a long song costs the server no more memory
    than a short one, and the page draws its waveforms without downloading any audio.
    """
    cache = files.song_dir(music.id) / "peaks.json"
    if cache.exists():
        return json.loads(cache.read_text())
    edges = np.linspace(0, music.frames, points + 1).astype(np.int64)
    result = {"duration": music.duration, "points": points, "peaks": {}}
    for name in [*(t.name for t in store.tracks(music.id)), ORIGINAL]:
        data = np.memmap(_raw(files, music.id, name), dtype="<f4", mode="r").reshape(-1, music.channels)
        pairs = []
        for start, end in zip(edges[:-1], edges[1:], strict=True):
            piece = data[start:max(end, start + 1), 0]
            pairs.append((float(piece.min(initial=0)), float(piece.max(initial=0))))
        scale = max(1e-3, *(max(-low, high) for low, high in pairs))
        result["peaks"][name] = [[round(low / scale, 3), round(high / scale, 3)] for low, high in pairs]
        del data
    with files.atomic(cache) as temporary:
        temporary.write_text(json.dumps(result))
    return result
