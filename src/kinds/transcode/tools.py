"""Running ffmpeg and ffprobe: one place for the command line flags every call shares.

Every call is a subprocess with a timeout (or a stop check), `-nostdin` so a child never
reads the server's terminal, and stderr captured so a failure carries ffmpeg's own words.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache

from src.kinds.base import Cancelled
from src.media import guard

FFMPEG = ["ffmpeg", "-nostdin", "-hide_banner"]
FFPROBE = ["ffprobe", "-hide_banner"]


class ToolError(RuntimeError):
    """ffmpeg or ffprobe failed; the message ends with the tail of its stderr."""


def missing() -> str | None:
    """Why ffmpeg cannot run here (a program not on PATH), or None."""
    for program in ("ffmpeg", "ffprobe"):
        if shutil.which(program) is None:
            return f"{program} is not on PATH"
    return None


def run(args: list[str], timeout: float, what: str, memory: int = 0,
        quiet: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion; ToolError with stderr's tail on failure or timeout.

    `memory`: the child's address space in bytes at most (0: no cap). `quiet`: anything on
    stderr is a failure too (ffmpeg's concat demuxer ends early, exit 0, on a file it refuses).
    """
    try:
        done = guard.run(args, capture_output=True, timeout=timeout, check=False,  # counts a server phase's CPU
                              preexec_fn=guard.limited(memory) if memory else None)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{what}: gave no answer within {timeout:.0f} s") from None
    except OSError as error:
        raise ToolError(f"{what}: cannot start {args[0]}: {error}") from None
    if done.returncode != 0 or (quiet and done.stderr.strip()):
        raise ToolError(f"{what}: exit {done.returncode}: {tail(done.stderr)}")
    return done


def run_stoppable(args: list[str], should_stop: Callable[[], bool], timeout: float, what: str) -> bytes:
    """Run a command, polling `should_stop` while it runs: kill it and raise Cancelled when true.

    stdout goes to DEVNULL (outputs are files), stderr to a file so a chatty encoder can
    never fill a pipe and stall while we poll.
    """
    started = time.monotonic()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            while process.poll() is None:
                if should_stop():
                    raise Cancelled("the job's task was cancelled")
                if time.monotonic() - started > timeout:
                    raise ToolError(f"{what}: still running after {timeout:.0f} s")
                time.sleep(0.1)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        errors.seek(0)
        stderr = errors.read()
    if process.returncode != 0:
        raise ToolError(f"{what}: exit {process.returncode}: {tail(stderr)}")
    return stderr


def tail(stderr: bytes, limit: int = 600) -> str:
    text = stderr.decode("utf-8", "replace").strip()
    return text[-limit:] if text else "(no message)"


@lru_cache(maxsize=1)
def encoders() -> frozenset[str]:
    """The video encoders this ffmpeg was built with (libx264, libsvtav1, ...)."""
    if missing():
        return frozenset()
    done = run([*FFMPEG, "-v", "error", "-encoders"], timeout=30, what="ffmpeg -encoders")
    names = set()
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0].startswith("V"):
            names.add(parts[1])
    return frozenset(names)


@lru_cache(maxsize=1)
def ffmpeg_version() -> str:
    """This ffmpeg's version and its libavcodec's, e.g. "5.1.8-0+deb12u1 libavcodec 59.37.100"."""
    if missing():
        return "none"
    lines = run([*FFMPEG, "-version"], timeout=30, what="ffmpeg -version").stdout.decode("utf-8", "replace")
    version = next((line.split()[2] for line in lines.splitlines() if line.startswith("ffmpeg version")), "unknown")
    # "libavcodec     59. 37.100 / 59. 37.100": the numbers before the slash, spaces removed
    codec = next(("libavcodec " + "".join(line.split("/")[0].split()[1:])
                  for line in lines.splitlines() if line.startswith("libavcodec")), "")
    return f"{version} {codec}".strip()


def encoder_version(encoder: str) -> str:
    """What names the bytes an encoder makes: the encoder and the ffmpeg build it is in. (Two
    hosts with the same string give the same chunk for the same job: the cache relies on it.)"""
    return f"{encoder} ffmpeg {ffmpeg_version()}"


def fraction(text: str) -> Fraction:
    """An exact frame rate from ffprobe's "30000/1001" (or "25"); ValueError when not positive."""
    value = Fraction(str(text).strip())
    if value <= 0:
        raise ValueError(f"frame rate {text!r} is not positive")
    return value


def seconds(value: Fraction) -> str:
    """A duration for ffmpeg's parsers, to the microsecond they read (never in float's exponent form)."""
    return f"{float(value):.6f}"
