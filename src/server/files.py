"""Where media and task files live under STORAGE_DIR, and writing them safely.

    STORAGE_DIR/media.sqlite3      the store
    STORAGE_DIR/incoming/          uploads being received
    STORAGE_DIR/media/{id}/original   each upload as it came
    STORAGE_DIR/tasks/{id}/        each task's folder: its kind's results, outputs, scratch
    STORAGE_DIR/cache/             the results cache (src/server/cache.py)

Paths are built from numeric IDs and fixed names only: an uploaded file's name is
never part of a path. Every file is written to a temporary name and renamed into
place (src.media.atomic), so a crash mid-write never leaves a half file under the real name.
"""

from __future__ import annotations

import shutil
from pathlib import Path


class Storage:
    def __init__(self, storage_dir: Path):
        self.root = storage_dir
        self.incoming = storage_dir / "incoming"
        self.media = storage_dir / "media"
        self.tasks = storage_dir / "tasks"
        for folder in (self.incoming, self.media, self.tasks):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def database(self) -> Path:
        return self.root / "media.sqlite3"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def original(self, media_id: int) -> Path:
        """The file as uploaded, kept: every task of it reads it."""
        return self.media / str(int(media_id)) / "original"

    def task_dir(self, task_id: int) -> Path:
        return self.tasks / str(int(task_id))

    def sweep_incoming(self) -> int:
        """Delete what unfinished uploads left behind (a crash, a kill); returns how many files."""
        leftovers = [p for p in self.incoming.iterdir() if p.is_file()]
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def delete_task(self, task_id: int) -> None:
        shutil.rmtree(self.task_dir(task_id), ignore_errors=True)

    def delete_media(self, media_id: int) -> None:
        shutil.rmtree(self.media / str(int(media_id)), ignore_errors=True)

    def delete_everything(self) -> None:
        for folder in (self.media, self.tasks, self.incoming):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
