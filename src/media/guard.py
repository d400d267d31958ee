"""The one gate every input of the server's ffmpeg and ffprobe passes: what may be read, and how.

ffmpeg guesses a file's format from its content, and some formats open further files: an
HLS playlist or a concat list "chunk" from a worker made the stitch copy a file from
outside the storage into a task's output. So every input is given here, for its *role*:

- the demuxers its role allows (`-format_whitelist`), forced with `-f` where the role has
  exactly one format (a worker's chunk can only be NUT: a playlist is then not even parsed);
- the `file` protocol only (`-protocol_whitelist file`, and the path as a `file:` URL, so a
  name like `concat:a|b` or `http://...` is a file name, never a protocol);
- a path that is a regular file (never a symlink) inside the folder the caller names (the
  task's or the upload's): a path outside that folder is refused before ffmpeg runs;
- `-max_pixels` for roles whose pictures may be decoded, so no decoder allocates a frame
  larger than MAX_PIXELS, and `-threads 1` where only a header is read.

The server's own concat lists (the stitch, the split) are written here too: every line
names a file checked as above, and each file may only be NUT (`option format_whitelist`),
so a list can never reach a playlist or another list.

`limited()` is the `preexec_fn` that caps a probing child's address space (RLIMIT_AS):
whatever a demuxer or decoder is talked into allocating, the child fails, the server not.

`run()` is how the server's ffmpeg and ffprobe run (a drop-in for `subprocess.run`), and
`accounted()` the block that measures the server's own work: the calling thread's CPU and
the CPU of every child that `run()` reaped inside the block (the serial share of a task,
issue 22: stats["serial"] and karaoke_server_cpu_seconds_total).
"""

from __future__ import annotations

import contextvars
import locale
import os
import resource
import select
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# Demuxers an upload may be read with: media containers only, never a playlist (hls,
# concat) or anything else that opens further files or the network. Without this list
# ffmpeg guesses the format from the content, and an uploaded HLS playlist naming a file
# on the server became a song holding that file's audio.
UPLOAD_DEMUXERS = ",".join([
    "mp3", "wav", "w64", "flac", "ogg", "mov", "matroska", "aac", "aiff", "caf", "asf", "wv", "ape",
    "tta", "au", "amr", "ac3", "eac3", "mpc", "mpc8", "tak", "dsf", "shorten", "voc",
    "avi", "mpegts", "ivf", "flv",  # video containers (mp4 is "mov", webm is "matroska")
])
# A worker's chunk, by the format its kind expects: ffmpeg's demuxer name for each.
CHUNK_DEMUXERS = {"nut": "nut", "mp4": "mov"}
# The probe's address-space cap: ffprobe and a demux pass of a 4K H.264 file need under 512 MiB
# (measured with prlimit); 1 GiB leaves room for any demuxer we allow, and a 16000x16000 PNG
# (800 MB of RSS unguarded) cannot be decoded within it.
PROBE_MEMORY_BYTES = 1 << 30


class OutsideFolder(ValueError):
    """An input is not a regular file inside the folder its role is confined to."""


@dataclass(frozen=True)
class Role:
    """What one kind of input may be: its demuxers, the one format forced (if any), whether
    its pictures may be decoded (then `-max_pixels` applies)."""

    name: str
    demuxers: str
    forced: str | None = None
    decodes: bool = True


UPLOAD = Role("upload", UPLOAD_DEMUXERS)  # an upload, or the original it was kept as
PIECE = Role("piece", "nut", "nut")  # a source segment or piece the server cut itself (NUT)
OUTPUT = Role("output", "mov,matroska", decodes=False)  # a stitched output (mp4, mkv, webm)


def chunk(fmt: str) -> Role:
    """A worker's result: only ever the chunk format its kind expects, forced."""
    if fmt not in CHUNK_DEMUXERS:
        raise ValueError(f"no chunk format {fmt!r}")
    return Role(f"{fmt} chunk", CHUNK_DEMUXERS[fmt], CHUNK_DEMUXERS[fmt])


def pixels(width: int, height: int) -> int:
    """`-max_pixels` for pictures planned at width x height: decoders allocate their coded size,
    rounded up to the codec's block (up to AV1's 128-pixel superblocks)."""
    return (int(width) + 128) * (int(height) + 128)


def confined(path: Path, folder: Path) -> Path:
    """`path` made absolute, once it is checked to be a regular file (not a symlink, nor under one)
    inside `folder`; OutsideFolder otherwise."""
    path = Path(os.path.abspath(path))
    try:
        info = os.lstat(path)
    except OSError:
        raise OutsideFolder(f"{path.name} is not there") from None
    if not stat.S_ISREG(info.st_mode):
        raise OutsideFolder(f"{path.name} is not a regular file")
    real = Path(os.path.realpath(path))  # a symlinked folder on the way shows here
    if not real.is_relative_to(os.path.realpath(folder)):
        raise OutsideFolder(f"{path.name} lies outside its folder")
    return real


def flags(role: Role, max_pixels: int = 0) -> list[str]:
    """The options that go before one input of this role."""
    args = ["-protocol_whitelist", "file", "-format_whitelist", role.demuxers]
    if role.forced:
        args += ["-f", role.forced]
    if role.decodes and max_pixels:
        args += ["-max_pixels", str(int(max_pixels))]
    return args


def probe_input(path: Path, role: Role, folder: Path, max_pixels: int = 0) -> list[str]:
    """ffprobe's arguments for one input: the role's flags, then the checked path as a file: URL."""
    return [*flags(role, max_pixels), "file:" + str(confined(path, folder))]


def ffmpeg_input(path: Path, role: Role, folder: Path, max_pixels: int = 0) -> list[str]:
    """ffmpeg's arguments for one input: the role's flags, `-i`, the checked path as a file: URL."""
    return [*flags(role, max_pixels), "-i", "file:" + str(confined(path, folder))]


def concat_input(files: list[tuple[Path, str | None]], listing: Path, folder: Path) -> list[str]:
    """ffmpeg's arguments to read NUT `files` ((path, duration or None) in order) as one input.

    The list is written to `listing`; every file in it is checked to lie in `folder` and may
    only be read as NUT (`option format_whitelist`, which the concat demuxer's `-safe 1`
    would forbid, hence `-safe 0` with absolute, checked paths).
    """
    lines = ["ffconcat version 1.0"]
    for path, duration in files:
        real = str(confined(path, folder))
        if "'" in real or "\n" in real:
            raise OutsideFolder(f"{path.name}: a path the concat list cannot quote")
        lines += [f"file '{real}'", "option format_whitelist nut", "option protocol_whitelist file"]
        if duration is not None:
            lines.append(f"duration {duration}")
    listing.write_text("\n".join(lines) + "\n")
    return ["-protocol_whitelist", "file", "-format_whitelist", "concat", "-f", "concat", "-safe", "0",
            "-i", "file:" + str(confined(listing, folder))]


def limited(memory_bytes: int = PROBE_MEMORY_BYTES):
    """A `preexec_fn` capping the child's address space: a C call, no Python run in the fork."""
    return partial(resource.setrlimit, resource.RLIMIT_AS, (memory_bytes, memory_bytes))


# -- what the server's own ffmpeg and ffprobe cost ---------------------------------------------
#
# Why os.wait4 per child, and not getrusage(RUSAGE_CHILDREN) deltas: RUSAGE_CHILDREN is one
# figure for the whole process, and the server reaps children on several threads at once (the
# preparer, the publisher, the results and merge threads, uploads in request threads), so a
# delta around one phase would take in the children of every other phase that ended meanwhile.
# wait4 returns the rusage of exactly the child it reaps, on the thread that ran it; the block
# that thread is in (a context variable, so each thread sees its own) adds it up. The child's
# own figure includes its waited-for descendants (ffmpeg has none).


@dataclass
class Work:
    """What one `accounted()` block cost: the thread's CPU, its children's, the wall time."""

    thread_cpu_seconds: float = 0.0
    children_cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    children: int = 0  # ffmpeg/ffprobe runs reaped in the block

    @property
    def cpu_seconds(self) -> float:
        return self.thread_cpu_seconds + self.children_cpu_seconds


_work: contextvars.ContextVar[Work | None] = contextvars.ContextVar("guard_work", default=None)


@contextmanager
def accounted() -> Iterator[Work]:
    """Measure the block: the calling thread's CPU (time.thread_time), the CPU of the children
    `run()` reaped in it, and its wall time. Blocks nest: an outer block counts an inner one's
    children too (its thread time already holds the inner's)."""
    work, outer = Work(), _work.get()
    token = _work.set(work)
    cpu, wall = time.thread_time(), time.perf_counter()
    try:
        yield work
    finally:
        work.thread_cpu_seconds = time.thread_time() - cpu
        work.wall_seconds = time.perf_counter() - wall
        _work.reset(token)
        if outer is not None:
            outer.children_cpu_seconds += work.children_cpu_seconds
            outer.children += work.children


def _reap(process: subprocess.Popen, timeout: float | None) -> resource.struct_rusage | None:
    """Wait for the child and reap it with wait4 (its own rusage); None when it outlived `timeout`.
    A pidfd makes the wait interruptible by the timeout without reaping early."""
    if timeout is not None:
        try:
            fd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):  # no pidfd (an old kernel): poll instead
            deadline = time.monotonic() + timeout
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    process.returncode = os.waitstatus_to_exitcode(status)
                    return usage
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.005)
        try:
            if not select.select([fd], [], [], max(0.0, timeout))[0]:
                return None
        finally:
            os.close(fd)
    _, status, usage = os.wait4(process.pid, 0)
    # reaped here: the Popen object must not wait for it again
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage


def run(args: list[str], *, timeout: float | None = None, check: bool = False, capture_output: bool = False,
        text: bool = False, preexec_fn=None, stdout=None, stderr=None) -> subprocess.CompletedProcess:
    """`subprocess.run` for the server's ffmpeg and ffprobe. Inside an `accounted()` block the
    child is reaped with wait4 and its CPU added to the block; outside one it is subprocess.run.

    Output goes through temporary files rather than pipes, so the child can never stall on a
    full pipe while this thread waits for it to end."""
    work = _work.get()
    if work is None:
        return subprocess.run(args, timeout=timeout, check=check, capture_output=capture_output, text=text,
                              preexec_fn=preexec_fn, stdout=stdout, stderr=stderr)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out if capture_output else stdout,
                                   stderr=err if capture_output else stderr, preexec_fn=preexec_fn)
        usage = _reap(process, timeout)
        expired = usage is None
        if expired:
            process.kill()
            usage = _reap(process, None)
        work.children_cpu_seconds += usage.ru_utime + usage.ru_stime
        work.children += 1
        outputs = []
        for stream in (out, err):
            stream.seek(0)
            data = stream.read() if capture_output else None
            if data is not None and text:  # as subprocess's text mode: the locale's encoding, universal newlines
                data = data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")
            outputs.append(data)
    if expired:
        raise subprocess.TimeoutExpired(args, timeout, outputs[0], outputs[1])
    done = subprocess.CompletedProcess(args, process.returncode, outputs[0], outputs[1])
    if check:
        done.check_returncode()
    return done
