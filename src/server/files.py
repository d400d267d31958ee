"""Where a song's audio lives under STORAGE_DIR, and writing it safely.

Paths are built from numeric IDs and fixed names only: an uploaded file's name is
never part of a path. Every file is written to a temporary name and renamed into
place, so a crash mid-write never leaves a half file under the real name.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SongFiles:
    def __init__(self, storage_dir: Path):
        self.root = storage_dir
        self.songs = storage_dir / "songs"
        self.incoming = storage_dir / "incoming"
        for folder in (self.songs, self.incoming):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def database(self) -> Path:
        return self.root / "karaoke.sqlite3"

    def song_dir(self, music_id: int) -> Path:
        return self.songs / str(int(music_id))

    def original(self, music_id: int) -> Path:
        """The file as uploaded, kept: it is decoded in the background, again after a restart."""
        return self.song_dir(music_id) / "original"

    def audio(self, music_id: int) -> Path:
        """The decoded song: float32, interleaved, model sample rate and channels."""
        return self.song_dir(music_id) / "audio.f32"

    def result(self, music_id: int, job_id: int) -> Path:
        return self.song_dir(music_id) / "results" / f"{int(job_id)}.npy"

    def stem(self, music_id: int, source: str, suffix: str = "f32") -> Path:
        return self.song_dir(music_id) / "stems" / f"{source}.{suffix}"

    def mix(self, music_id: int, suffix: str = "f32") -> Path:
        return self.song_dir(music_id) / f"mix.{suffix}"

    @contextmanager
    def atomic(self, target: Path) -> Iterator[Path]:
        """Yield a temporary path; rename it to `target` if the block succeeds."""
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            yield temporary
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    def sweep_incoming(self) -> int:
        """Delete what unfinished uploads left behind (a crash, a kill); returns how many files."""
        leftovers = [p for p in self.incoming.iterdir() if p.is_file()]
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def delete_song(self, music_id: int) -> None:
        shutil.rmtree(self.song_dir(music_id), ignore_errors=True)

    def delete_everything(self) -> None:
        for folder in (self.songs, self.incoming):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
