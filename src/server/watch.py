"""The watch folder: a file dropped into WATCH_DIR becomes a task, its output lands in done/.

    WATCH_DIR/             files are dropped here (the folder is scanned, not its subfolders)
    WATCH_DIR/originals/   each input, once taken
    WATCH_DIR/done/        the outputs: done/<stem>.<ext>, or done/<stem>/<output>.<ext> for several
    WATCH_DIR/failed/      inputs that could not be done, each with <name>.error.txt beside it
    STORAGE_DIR/watch-ledger.json   the files taken and not finished yet

The watcher is one more entry into the pipeline, like HTTP: it calls the orchestrator's
`upload` and `create_task` and reads the task from the store, never the broker. A thread
polls the folder about once a second. A regular file (not a dotfile, not a partial such
as `*.part`, not empty) is taken once its size, mtime and inode were the same at three
polls in a row (unchanged over two polls: about two seconds), so a file still being copied
in waits until the copy ends. The task is WATCH_TASK (JSON kind and params), checked at start.

Every step is recorded in the ledger (written atomically) before it is made, and each
step can be done again, so a server stopped at any point finishes the work at its next
start, once:

1. record the entry (its name in originals/, chosen free), then rename the file there;
   resumed: rename it if that did not happen yet, forget it if the file is gone.
2. record "uploading", hard-link the input into STORAGE_DIR/incoming (a copy across file
   systems), upload it (the orchestrator probes it and keeps it as a medium), record the
   medium; resumed: a medium made since "uploading" that holds the same file is adopted.
3. create the task, record it; resumed: the medium's task, if one was made, is adopted.
4. once the task is done: record the names in done/ (chosen free, never overwriting), then
   copy each output there (by a temporary name); a recorded name that exists is delivered. Then
   the entry is finished and leaves the ledger; the input stays in originals/.

A file that is not media (or that the task refuses: bad params, no video for a
transcode) goes to failed/ with the reason in `.error.txt`: the failure is recorded first,
then the note written, then the input moved. A task that failed, was cancelled (DELETE
/tasks/{id}) or deleted (POST /reset) is not made again: its input goes to failed/ with the
task's error, so nothing loops; drop the file again to retry. Names are kept as
dropped but only ever as one path component, with " (2)", " (3)"... added when taken.

Files are never followed. A dropped file is opened with O_NOFOLLOW and must still be the
regular file whose size, mtime and inode were seen stable; it is then hard-linked (or
copied) into originals/ *from that descriptor*, never by its path, so a file swapped for a
symlink between the checks and the move is refused, not stored (a link to /etc/shadow
was once served as an "original"). originals/, done/ and failed/ are opened with
O_NOFOLLOW|O_DIRECTORY and written through those descriptors: when one is a symlink,
nothing is written and the watcher says why. A file over MAX_UPLOAD_MB, or one the
storage quota (STORAGE_MAX_GB) has no room for, goes to failed/ like any refused upload.
Names in the log are quoted (repr), so a newline in a file name cannot forge a log line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from src.kinds.base import BadParams, Media, NotApplicable
from src.media import probe
from src.server import quota
from src.server.orchestrator import NotFound, Orchestrator
from src.server.pipeline import Pipeline
from src.server.store import Task

log = logging.getLogger("server")

POLL_SECONDS = 1.0
STABLE_POLLS = 3  # the same size, mtime and inode at this many polls in a row
PARTIAL = (".part", ".partial", ".tmp", ".crdownload", ".download")
ERROR_SUFFIX = ".error.txt"
MAX_TROUBLES = 5  # unexpected errors in a row on one file before it is given up (failed/)
NAME_BYTES = 200  # a name's bytes at most, leaving room for " (n)" and ".error.txt"
LEDGER = "watch-ledger.json"
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO never hangs us
FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MB = 1024 * 1024


class Refused(Exception):
    """A dropped file that cannot be taken safely: a symlink, not a regular file, or changed meanwhile."""


class UnsafeFolder(OSError):
    """originals/, done/ or failed/ is not a plain folder (a symlink): nothing is written through it."""


def task_spec(raw: str, pipeline: Pipeline) -> tuple[str, dict[str, Any]]:
    """WATCH_TASK as (kind, params); ValueError naming WATCH_TASK if it cannot be a task."""
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"WATCH_TASK is not JSON ({exc}): {raw!r}") from None
    if (not isinstance(spec, dict) or set(spec) - {"kind", "params"} or not isinstance(spec.get("kind"), str)
            or not isinstance(spec.get("params", {}), dict)):
        raise ValueError(f'WATCH_TASK must be {{"kind": "<kind>", "params": {{...}}}}, got {raw!r}')
    try:
        kind = pipeline.kind(spec["kind"])
    except KeyError as exc:
        raise ValueError(f"WATCH_TASK: {exc.args[0]}") from None
    params = spec.get("params", {})
    try:  # params that depend on the medium are checked per file; the rest is checked now
        kind.parameters(params, Media(0, "", Path(os.devnull), 0, None, None, None))
    except BadParams as exc:
        raise ValueError(f"WATCH_TASK: bad params for {spec['kind']}: {exc}") from None
    except Exception:  # the placeholder medium was not enough to judge them
        pass
    return spec["kind"], params


def safe_name(name: str) -> str:
    """`name` as one path component: no separators, never "." or "..", at most NAME_BYTES bytes."""
    name = name.replace("/", "_").replace("\0", "_").lstrip(".") or "untitled"
    stem, ext = split_name(name)
    if len(os.fsencode(ext)) > 16:
        stem, ext = name, ""
    while len(os.fsencode(stem + ext)) > NAME_BYTES:
        stem = stem[:-1]
    return (stem or "untitled") + ext


def split_name(name: str) -> tuple[str, str]:
    """("holiday clip", ".mp4") of "holiday clip.mp4"; (name, "") without an extension."""
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if stem else (name, "")


def free_name(folder: Path, name: str, claimed: set[str], companion: str = "", whole: bool = False) -> str:
    """`name`, or "stem (2).ext", "stem (3).ext"... ("name (2)" if `whole`): the first not in `folder`
    (nor its companion) nor claimed."""
    stem, ext = (safe_name(name), "") if whole else split_name(safe_name(name))
    for n in range(1, 100_000):
        candidate = f"{stem}{ext}" if n == 1 else f"{stem} ({n}){ext}"
        if (candidate not in claimed and not os.path.lexists(folder / candidate)
                and not (companion and os.path.lexists(folder / (candidate + companion)))):
            return candidate
    raise OSError(f"no free name for {name!r} in {folder}")


class Ledger:
    """The entries the watcher took and has not finished, in a JSON file replaced atomically.

    An entry: source (the name as dropped), original (its name in originals/), uploading
    (when the upload began), media_id, task_id, targets ({output: path under done/}),
    error and failed_as (its name in failed/) once it failed.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries: list[dict[str, Any]] = json.loads(path.read_text())["entries"] if path.exists() else []
            for entry in self.entries:  # names only, never a way out of the watch folder's subfolders
                names = [entry["source"], entry["original"], entry.get("failed_as") or "x",
                         *(part for target in (entry.get("targets") or {}).values() for part in target.split("/"))]
                if any(name in ("", ".", "..") or "/" in name or "\0" in name for name in names):
                    raise ValueError(f"an entry names {names}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"the watch folder's ledger {path} is unreadable ({exc}); move it aside") from None

    def save(self) -> None:
        write_atomically(self.path, json.dumps({"version": 1, "entries": self.entries}, indent=1))

    def claimed(self, key: str) -> set[str]:
        """The names entries hold in one folder: original, failed_as, or the first part of targets."""
        if key == "targets":
            return {path.split("/")[0] for e in self.entries for path in (e.get("targets") or {}).values()}
        return {e[key] for e in self.entries if e.get(key)}


def write_atomically(target: Path, text: str) -> None:
    """`text` into `target` by a temporary name and a rename, synced: a crash leaves the old or the new file."""
    temporary = target.with_name(f".watch-{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8", errors="replace") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def open_file(path: Path | str, expected: tuple[int, int, int] | None = None, dir_fd: int | None = None) -> int:
    """A descriptor of the regular file at `path`, never through a symlink; Refused when it is a link,
    not a regular file, or not the (size, mtime, inode) `expected`. FileNotFoundError when gone."""
    try:
        fd = os.open(path, FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            raise Refused("it is a symbolic link") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise Refused("it is not a regular file")
    if expected is not None and (info.st_size, info.st_mtime_ns, info.st_ino) != expected:
        os.close(fd)
        raise Refused("it changed between the checks and the move")
    return fd


def open_folder(path: Path | str, dir_fd: int | None = None) -> int:
    """A descriptor of the folder at `path`; UnsafeFolder when it is a symlink or not a folder."""
    try:
        return os.open(path, FOLDER_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise UnsafeFolder(exc.errno, f"{path} is not a plain folder (a symlink?): nothing is written "
                                          "through it") from None
        raise


def exists_in(folder_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def place(fd: int, folder_fd: int, name: str, link: bool = True) -> None:
    """The open file `fd` at `name` (a free name the caller reserved) in the folder `folder_fd`: a
    hard link made from the descriptor, or a copy read from it by a temporary name where links
    cannot be made (another file system) or are not wanted. Never by a path that could be swapped."""
    if link:
        try:
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=folder_fd, follow_symlinks=True)
            return
        except FileExistsError:
            raise
        except OSError:
            pass

    def copy(out: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, 1 << 20):
            os.write(out, chunk)

    _write_by_rename(folder_fd, name, copy)


def write_note(folder_fd: int, name: str, text: str) -> None:
    """`text` at `name` in the folder `folder_fd`, by a temporary name and a rename, synced."""
    _write_by_rename(folder_fd, name, lambda out: os.write(out, text.encode("utf-8", "replace")))


def _write_by_rename(folder_fd: int, name: str, write: Callable[[int], object]) -> None:
    """`name` in the folder `folder_fd`, written by `write(descriptor)` to a temporary name (never
    following a link), synced, then renamed over it: a reader never sees half a file."""
    temporary = f".watch-{uuid.uuid4().hex}.tmp"
    out = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                  dir_fd=folder_fd)
    try:
        try:
            write(out)
            os.fsync(out)
        finally:
            os.close(out)
        os.replace(temporary, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    finally:
        try:
            os.unlink(temporary, dir_fd=folder_fd)
        except FileNotFoundError:
            pass


class Watcher:
    """Polls WATCH_DIR on a thread of its own; `start()` resumes the ledger, `stop()` ends the thread."""

    def __init__(self, pipeline: Pipeline, orchestrator: Orchestrator, interval: float = POLL_SECONDS):
        self.p = pipeline
        self.store = pipeline.store
        self.orchestrator = orchestrator
        self.interval = interval
        self.kind, self.params = task_spec(pipeline.settings.watch_task, pipeline)  # fails at startup
        self.folder = pipeline.settings.watch_dir
        self.originals, self.done, self.failed = (self.folder / n for n in ("originals", "done", "failed"))
        self.ledger = Ledger(pipeline.files.root / LEDGER)  # an unreadable one fails at startup too
        self._seen: dict[str, tuple[tuple[int, int, int], int]] = {}  # name → (size, mtime, inode), polls
        self._troubles: dict[str, int] = {}
        self._warned: set[str] = set()  # links and unsafe folders already reported (once each)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="watch", daemon=True)

    def start(self) -> None:
        self._folders()
        for folder in (self.done, self.failed):  # copies a stopped server left half made
            for leftover in folder.glob("**/.watch-*.tmp"):
                leftover.unlink(missing_ok=True)
        if self.ledger.entries:
            log.info("Watch - resuming %d file(s) taken before the restart", len(self.ledger.entries))
        log.info("Watch - watching %s: each file becomes a %s task with %s", self.folder, self.kind, self.params)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self.poll()
            except UnsafeFolder as exc:
                self._warn_once(str(exc), "Watch - %s; the watcher waits until it is a folder again")
            except Exception:
                log.exception("Watch - polling %s failed; trying again", self.folder)
            self._stopped.wait(self.interval)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, key, *args)

    def _folders(self) -> None:
        """Make the folders if missing; UnsafeFolder when originals/, done/ or failed/ is a symlink."""
        for folder in (self.folder, self.originals, self.done, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        for folder in (self.originals, self.done, self.failed):
            os.close(open_folder(folder))

    def poll(self) -> None:
        """One round: move every unfinished entry on, then take the files that stopped growing."""
        self._folders()  # made again if someone removed them
        for entry in list(self.ledger.entries):
            if self._stopped.is_set():
                return
            self._step(entry)
        for name in self._stable():
            if self._stopped.is_set():
                return
            self._take(name)

    # -- taking files ----------------------------------------------------------------

    def _stable(self) -> list[str]:
        waiting = {e["source"] for e in self.ledger.entries if not os.path.lexists(self.originals / e["original"])}
        seen, ready = {}, []
        with os.scandir(self.folder) as found:
            for item in found:
                name = item.name
                if name.startswith(".") or name.lower().endswith(PARTIAL) or name in waiting:
                    continue
                try:
                    info = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISLNK(info.st_mode):
                    self._warn_once(name, "Watch - %r is a symbolic link: never followed, not taken")
                    continue
                if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
                    continue  # folders (done/ ...), devices; empty: a copy not begun
                signature = (info.st_size, info.st_mtime_ns, info.st_ino)
                before, polls = self._seen.get(name, (None, 0))
                polls = polls + 1 if before == signature else 1
                seen[name] = (signature, polls)
                if polls >= STABLE_POLLS:
                    ready.append(name)
        self._seen = seen
        return sorted(ready)

    def _take(self, name: str) -> None:
        signature = self._seen.pop(name, (None, 0))[0]
        try:  # the file seen stable, opened without following a link: what is placed is what was checked
            fd = open_file(self.folder / name, signature)
        except FileNotFoundError:
            return
        except Refused as exc:
            log.warning("Watch - %r not taken: %s", name, exc)
            return
        try:
            original = free_name(self.originals, name, self.ledger.claimed("original"))
            entry = {"source": name, "original": original, "uploading": None, "media_id": None, "task_id": None,
                     "targets": None, "error": None, "failed_as": None}
            self.ledger.entries.append(entry)
            self.ledger.save()
            self._place_original(entry, fd)
        finally:
            os.close(fd)
        log.info("Watch - took %r into %r", name, f"originals/{original}")
        self._step(entry)

    def _place_original(self, entry: dict[str, Any], fd: int) -> None:
        """The open dropped file into originals/ (linked from its descriptor), then its dropped name
        removed, if that name is still this file (a name swapped meanwhile is another file: left)."""
        originals = open_folder(self.originals)
        try:
            place(fd, originals, entry["original"])
        finally:
            os.close(originals)
        placed, dropped = os.fstat(fd), self.folder / entry["source"]
        try:
            now = os.lstat(dropped)
        except FileNotFoundError:
            return
        if (now.st_dev, now.st_ino) == (placed.st_dev, placed.st_ino):
            dropped.unlink(missing_ok=True)

    # -- moving an entry on ------------------------------------------------------------

    def _step(self, entry: dict[str, Any]) -> None:
        key = entry["original"]
        try:
            self._advance(entry)
            self._troubles.pop(key, None)
        except Exception as exc:
            count = self._troubles[key] = self._troubles.get(key, 0) + 1
            log.exception("Watch - %r: step failed (%d of %d)", entry["source"], count, MAX_TROUBLES)
            if count < MAX_TROUBLES:
                return
            self._troubles.pop(key, None)
            if entry.get("error") is None:
                self._fail(entry, f"the watch folder failed: {type(exc).__name__}: {exc}")
            else:
                self._forget(entry, f"giving up moving it to failed/ ({exc})")

    def _advance(self, entry: dict[str, Any]) -> None:
        if entry.get("error") is not None:
            self._finish_failed(entry)
            return
        original = self.originals / entry["original"]
        if entry["media_id"] is None:
            if not os.path.lexists(original):  # stopped between recording the entry and moving the file
                try:
                    fd = open_file(self.folder / entry["source"])
                except FileNotFoundError:
                    self._forget(entry, "the file is gone")
                    return
                except Refused as exc:
                    self._forget(entry, f"not taken: {exc}")
                    return
                try:
                    self._place_original(entry, fd)
                finally:
                    os.close(fd)
                log.info("Watch - took %r into %r", entry["source"], f"originals/{entry['original']}")
            elif _same_file(self.folder / entry["source"], original):  # stopped before its dropped name went
                (self.folder / entry["source"]).unlink(missing_ok=True)
            if not self._upload(entry, original):
                return
        if entry["task_id"] is None and not self._create_task(entry):
            return
        task = self.store.task(entry["task_id"])
        if task is None:
            self._fail(entry, f"task {entry['task_id']} was deleted before it was done")
        elif task.state == "failed":
            self._fail(entry, f"task {task.id} failed: {task.error}")
        elif task.state == "cancelled":
            self._fail(entry, f"task {task.id} was cancelled")
        elif task.state == "done":
            self._deliver(entry, task)

    def _upload(self, entry: dict[str, Any], original: Path) -> bool:
        if entry["uploading"] is not None and self._adopt_media(entry, original):
            return True
        originals = open_folder(self.originals)
        try:
            fd = open_file(entry["original"], dir_fd=originals)
        except Refused as exc:  # replaced by a link since it was taken: never followed
            self._fail(entry, f"originals/{entry['original']!r} was replaced: {exc}")
            return False
        finally:
            os.close(originals)
        incoming = self.p.files.incoming / f"watch-{uuid.uuid4().hex}.upload"
        try:
            size, settings = os.fstat(fd).st_size, self.p.settings
            if size > settings.max_upload_mb * MB:
                self._fail(entry, f"the file is {size / MB:.1f} MB; at most {settings.max_upload_mb} MB are taken "
                                  "(MAX_UPLOAD_MB)")
                return False
            try:
                quota.check(settings.storage_dir, settings.storage_max_gb, size)
            except quota.StorageFull as exc:
                self._fail(entry, str(exc))
                return False
            entry["uploading"] = time.time()
            self.ledger.save()
            folder = open_folder(incoming.parent)
            try:
                place(fd, folder, incoming.name)
            finally:
                os.close(folder)
        finally:
            os.close(fd)
        try:
            # the name as text the store can hold (a name that is not UTF-8 gets U+FFFD)
            shown = os.fsencode(entry["source"]).decode("utf-8", "replace")
            media = self.orchestrator.upload(incoming, shown)
        except (probe.UnreadableMedia, probe.RefusedMedia) as exc:
            self._fail(entry, str(exc))
            return False
        finally:
            incoming.unlink(missing_ok=True)  # moved into the medium's folder, unless it was refused
        entry["media_id"] = media.id
        self.ledger.save()
        log.info("Watch - %r is Media[%d]", entry["source"], media.id)
        return True

    def _adopt_media(self, entry: dict[str, Any], original: Path) -> bool:
        """The medium an upload made before the server stopped, found by its file (a hard link of ours)."""
        for row in self.store.all_media():
            kept = self.p.files.original(row.id)
            if row.created_at >= entry["uploading"] - 1 and _same_file(kept, original):
                entry["media_id"] = row.id
                self.ledger.save()
                log.info("Watch - %r is Media[%d] (uploaded before the restart)", entry["source"], row.id)
                return True
        return False

    def _create_task(self, entry: dict[str, Any]) -> bool:
        made = [t for t in self.store.tasks_of(entry["media_id"]) if t.kind == self.kind]
        adopted = " (made before the restart)" if made else ""
        if made:  # created before the server stopped, not yet recorded
            task = made[0]
        elif self.store.media(entry["media_id"]) is None:
            self._fail(entry, f"media {entry['media_id']} was deleted before its task was made")
            return False
        else:
            try:
                task = self.orchestrator.create_task(self.kind, entry["media_id"], self.params)
            except (BadParams, NotApplicable, NotFound) as exc:
                self._fail(entry, str(exc))
                return False
        entry["task_id"] = task.id
        self.ledger.save()
        log.info("Watch - %r is Task[%d] (%s)%s", entry["source"], task.id, task.kind, adopted)
        return True

    def _deliver(self, entry: dict[str, Any], task: Task) -> None:
        kind, view = self.p.kind(task.kind), self.p.view(task)
        outputs = {row.name: kind.output(view, row.name) for row in self.store.outputs(task.id)}
        if entry["targets"] is None:
            stem, _ = split_name(safe_name(entry["source"]))
            claimed = self.ledger.claimed("targets")
            if len(outputs) == 1:
                (name, found), = outputs.items()
                entry["targets"] = {name: free_name(self.done, stem + found.path.suffix, claimed)}
            else:
                folder = free_name(self.done, stem, claimed, whole=True)
                entry["targets"] = {name: f"{folder}/{safe_name(name + found.path.suffix)}"
                                    for name, found in outputs.items()}
            self.ledger.save()
        done = open_folder(self.done)
        try:
            for name, path in entry["targets"].items():
                folder, leaf = done, path
                if "/" in path:  # several outputs: done/<stem>/<output>, the subfolder opened unfollowed too
                    sub, leaf = path.split("/", 1)
                    try:
                        os.mkdir(sub, dir_fd=done)
                    except FileExistsError:
                        pass
                    folder = open_folder(sub, dir_fd=done)
                try:
                    if not exists_in(folder, leaf):  # one that exists was placed before a restart
                        # a copy: done/ is the user's to edit, and a task's output may be the results cache's file
                        fd = open_file(outputs[name].path)
                        try:
                            place(fd, folder, leaf, link=False)
                        finally:
                            os.close(fd)
                finally:
                    if folder != done:
                        os.close(folder)
        finally:
            os.close(done)
        log.info("Watch - %r done: %s", entry["source"], [f"done/{p}" for p in entry["targets"].values()])
        self._forget(entry)

    # -- failing -----------------------------------------------------------------------

    def _fail(self, entry: dict[str, Any], reason: str) -> None:
        entry["error"] = reason
        entry["failed_as"] = free_name(self.failed, entry["source"], self.ledger.claimed("failed_as"), ERROR_SUFFIX)
        self.ledger.save()
        log.warning("Watch - %r failed: %s", entry["source"], reason)
        self._finish_failed(entry)

    def _finish_failed(self, entry: dict[str, Any]) -> None:
        name = entry["failed_as"]
        failed = open_folder(self.failed)
        try:
            if not exists_in(failed, name + ERROR_SUFFIX):
                write_note(failed, name + ERROR_SUFFIX, f"{entry['source']}: {entry['error']}\n")
            originals = open_folder(self.originals)
            try:  # a rename between two unfollowed folders: a link in originals/ moves as a link
                if exists_in(originals, entry["original"]):
                    os.replace(entry["original"], name, src_dir_fd=originals, dst_dir_fd=failed)
            finally:
                os.close(originals)
        finally:
            os.close(failed)
        log.info("Watch - %r moved to %r", entry["source"], f"failed/{name}")
        self._forget(entry)

    def _forget(self, entry: dict[str, Any], why: str = "") -> None:
        if why:
            log.info("Watch - %r forgotten: %s", entry["source"], why)
        self.ledger.entries.remove(entry)
        self.ledger.save()


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths are one file (hard links), neither followed if it is a link."""
    try:
        first, second = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(first.st_mode) and (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
