"""From stored job results to the files a user downloads: whole stems and the final mix.

`write_stems` streams the merge (`src.separation.merge`) into one float32 file per
source and the mix of the chosen sources beside them; `render_mix` re-mixes a finished
song when the user picks other instruments. WAV and MP3 renderings are made on first
download and cached until the mix changes.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import BinaryIO

import numpy as np

from src.separation.merge import merge_results
from src.separation.model import ModelSpec
from src.server import audio
from src.server.files import SongFiles
from src.server.store import Store


def _selected_sources(store: Store, music_id: int, track_ids: list[int]) -> set[str]:
    chosen = set(track_ids)
    return {t.name for t in store.tracks(music_id) if t.id in chosen}


def _forget_renderings(files: SongFiles, music_id: int) -> None:
    for suffix in ("wav", "mp3"):
        files.mix(music_id, suffix).unlink(missing_ok=True)


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
    for source in spec.sources:
        for suffix in ("wav", "mp3"):
            files.stem(music_id, source, suffix).unlink(missing_ok=True)
    return selection


def render_mix(store: Store, files: SongFiles, music_id: int, track_ids: list[int]) -> None:
    """Re-mix a finished song from its stems with another choice of instruments."""
    music = store.music(music_id)
    chosen = [t.name for t in store.tracks(music_id) if t.id in set(track_ids)]
    with ExitStack() as stack:
        readers = [audio.iter_blocks(files.stem(music_id, name), music.channels) for name in chosen]
        path = stack.enter_context(files.atomic(files.mix(music_id)))
        out = stack.enter_context(path.open("wb"))
        remaining = music.frames
        while remaining > 0:
            n = min(audio.BLOCK_FRAMES, remaining)
            mix = np.zeros((n, music.channels), dtype=np.float32)
            for reader in readers:
                mix += next(reader)
            mix.astype("<f4").tofile(out)
            remaining -= n
        out.close()
    _forget_renderings(files, music_id)
    store.mark_done(music_id, track_ids)


def rendering(files: SongFiles, music_id: int, samplerate: int, channels: int, source: str | None, fmt: str):
    """Path of a WAV or MP3 rendering of a stem (or of the mix when `source` is None)."""
    raw = files.mix(music_id) if source is None else files.stem(music_id, source)
    target = files.mix(music_id, fmt) if source is None else files.stem(music_id, source, fmt)
    if not target.exists():
        with files.atomic(target) as temporary:
            render = audio.render_wav if fmt == "wav" else audio.render_mp3
            render(raw, temporary, samplerate, channels)
    return target
