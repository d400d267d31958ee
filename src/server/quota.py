"""What STORAGE_DIR may hold: never a symlink, and never more than STORAGE_MAX_GB.

Links: every path the server reads back from storage (an original, a chunk, an output) is
a file it wrote itself, so a symlink there can only be planted, and serving it would serve
whatever it names (the watch folder once stored a link to /etc/shadow as an "original").
The server refuses to start on a storage that holds one (`refuse_links`); the watch
folder, where users drop files, is left to the watcher, which never follows one.

Quota: uploads are refused with 507 once the storage's disk use, with what the upload
will be decoded to, would pass STORAGE_MAX_GB (`check`), before anything is decoded. Disk
use is measured by walking the storage (blocks actually used, each hard-linked file once):
a few milliseconds for thousands of files, and always the truth.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

GB = 1024**3


class StorageFull(Exception):
    """An upload would take the storage past STORAGE_MAX_GB; the message says by how much."""


def _scan(root: Path, skip: Iterable[Path] = ()) -> tuple[int, list[Path]]:
    """(bytes on disk, symlinks) under `root`, not descending into `skip` for links."""
    skipped = {os.path.abspath(p) for p in skip}
    used, links, seen = 0, [], set()
    for folder, dirs, files in os.walk(root):
        inside_skip = any(folder == s or folder.startswith(s + os.sep) for s in skipped)
        for name in [*dirs, *files]:
            path = os.path.join(folder, name)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue  # removed meanwhile
            if stat.S_ISLNK(info.st_mode):
                if not inside_skip:
                    links.append(Path(path))
                continue
            if stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                used += info.st_blocks * 512
    return used, links


def used_bytes(root: Path) -> int:
    return _scan(root)[0]


def refuse_links(root: Path, skip: Iterable[Path] = ()) -> None:
    """ValueError naming the symlinks under `root` (outside `skip`): the server will not start on them."""
    links = _scan(root, skip)[1]
    if links:
        shown = ", ".join(repr(str(p)) for p in links[:5]) + (" ..." if len(links) > 5 else "")
        raise ValueError(f"STORAGE_DIR holds {len(links)} symlink(s), which the server never makes: {shown}; "
                         "remove them (a link there would be served as the file it names)")


def check(root: Path, max_gb: float, adding: int = 0) -> None:
    """StorageFull when the storage's disk use plus `adding` bytes is over `max_gb`."""
    used = used_bytes(root)
    if used + adding > max_gb * GB:
        need = f" and this upload needs {adding / GB:.2f} GB more" if adding else ""
        raise StorageFull(f"the storage is full: {used / GB:.2f} GB used of STORAGE_MAX_GB {max_gb:g} GB{need}; "
                          "delete songs or media to make room")
