"""The worker half of `transcode`: check a job's params, encode its piece, return the chunk.

Params and body arrive from the broker and are untrusted: `problem` refuses anything
outside the ranges the server ever sends before a byte reaches ffmpeg, and the command line
is built from validated values only (a list, never a shell string).
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from src.config import Settings
from src.kinds.base import report_progress
from src.kinds.transcode import encode, tools

MAX_BODY = 64 * 1024 * 1024  # a piece the planner keeps under 48 MB, plus headroom
MAX_FRAMES = 1_000_000
BITRATE = re.compile(r"[1-9][0-9]{0,8}[kM]?")  # fullmatch: "$" also matches before a final newline
FPS = re.compile(r"[1-9][0-9]{0,8}/[1-9][0-9]{0,8}")
ECHOED = ("codec", "frames", "start", "end", "width", "height")
FRAME = re.compile(rb"^frame=(\d+)", re.M)  # ffmpeg -progress: frames written so far
PROGRESS_SECONDS = 0.5  # how often the progress file is read (ffmpeg writes it every 0.5 s)


def available() -> str | None:
    """Why this host cannot run transcode jobs, or None."""
    return tools.missing()


def worker(settings: Settings) -> Runner:
    return Runner(settings)


def integer_problem(params: dict[str, Any], name: str, low: int, high: int) -> str | None:
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return f"{name} must be an integer in [{low}, {high}], got {value!r}"
    return None


def piece_problem(params: dict[str, Any], body: bytes, max_frames: int = MAX_FRAMES, min_side: int = 16) -> str | None:
    """Why a video job's frames, rate, size or source piece are unusable: the checks every kind
    whose jobs are runs of frames of a piece shares."""
    fps = params.get("fps")
    if not (isinstance(fps, str) and FPS.fullmatch(fps) and Fraction(fps) <= 1000):
        return f"fps must be a fraction like '30000/1001', at most 1000, got {fps!r}"
    for name, low, high in (("threads", 1, 64), ("width", min_side, 8192), ("height", min_side, 4320),
                            ("skip", 0, MAX_FRAMES), ("frames", 1, max_frames),
                            ("start", 0, MAX_FRAMES * 100), ("end", 1, MAX_FRAMES * 100)):
        if reason := integer_problem(params, name, low, high):
            return reason
    if params["width"] % 2 or params["height"] % 2:
        return "width and height must be even (yuv420p)"
    if params["end"] - params["start"] != params["frames"]:
        return "end - start must equal frames"
    if not isinstance(body, bytes | bytearray) or not body:
        return "the body (the source piece) is empty"
    if len(body) > MAX_BODY:
        return f"the body is {len(body)} bytes, more than {MAX_BODY}"
    return None


def progressed(command: list[str], report: Path, frames: int,
               should_stop: Callable[[], bool]) -> tuple[list[str], Callable[[], bool]]:
    """The ffmpeg command with `-progress` into the file `report` (a global option: right after
    the program), and a `should_stop` that also tells the worker how many of the job's `frames`
    are out (kinds.base.report_progress): the stop check is polled while ffmpeg runs anyway."""
    read_at = [0.0]

    def polled() -> bool:
        if time.monotonic() - read_at[0] >= PROGRESS_SECONDS:
            read_at[0] = time.monotonic()
            try:
                text = report.read_bytes()[-4096:]
            except OSError:
                text = b""
            found = FRAME.findall(text)
            if found:
                report_progress(int(found[-1]) / max(1, frames))
        return should_stop()

    return [command[0], "-progress", f"file:{report}", *command[1:]], polled


class Runner:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings

    def offers(self) -> dict[str, str]:
        """The codecs this host's ffmpeg can encode, each with its encoder's version."""
        found = tools.encoders()
        return {codec: tools.encoder_version(encoder) for codec in encode.CODECS
                if (encoder := encode.encoder_for(codec, found)) is not None}

    def problem(self, params: dict[str, Any], body: bytes) -> str | None:
        if not isinstance(params, dict):
            return "params must be an object"
        codec = params.get("codec")
        if codec not in encode.CODECS:
            return f"codec must be one of {', '.join(encode.CODECS)}, got {codec!r}"
        if encode.encoder_for(codec, tools.encoders()) is None:
            return f"this worker's ffmpeg has no {codec} encoder"
        crf, bitrate = params.get("crf"), params.get("bitrate")
        if (crf is None) == (bitrate is None):
            return "exactly one of crf and bitrate must be set"
        if crf is not None and (reason := integer_problem(params, "crf", *encode.CRF_RANGE[codec])):
            return reason
        if bitrate is not None and not (isinstance(bitrate, str) and BITRATE.fullmatch(bitrate)):
            return f"bitrate must look like '2500k', got {bitrate!r}"
        if params.get("preset") not in encode.PRESETS:
            return f"preset must be one of {', '.join(encode.PRESETS)}"
        return piece_problem(params, body)

    def run(self, params: dict[str, Any], body: bytes,
            should_stop: Callable[[], bool]) -> tuple[dict[str, Any], bytes]:
        reason = self.problem(params, body)
        if reason:
            raise ValueError(reason)
        encoder = encode.encoder_for(params["codec"], tools.encoders())
        assert encoder is not None  # problem() said so
        # Generous: even AV1 at its slowest preset encodes more than a frame a minute.
        timeout = 600 + 60 * params["frames"]
        with tempfile.TemporaryDirectory(prefix="transcode-") as scratch:
            piece, chunk = Path(scratch) / "piece", Path(scratch) / f"chunk.{encode.CHUNK_FORMAT}"
            piece.write_bytes(body)
            command, polled = progressed(encode.command(params, encoder, str(piece), str(chunk)),
                                         Path(scratch) / "progress", params["frames"], should_stop)
            tools.run_stoppable(command, polled, timeout=timeout, what=f"encoding with {encoder}")
            data = chunk.read_bytes()
        result = {name: params[name] for name in ECHOED}
        result["encoder"] = encoder
        return result, data

    def tamper(self, params: dict[str, Any], body: bytes) -> bytes:
        """A chunk that passes every structural check (codec, size, frames, a clean decode) but
        shows flat grey: what a broken encoder or a lazy worker could ship. Only VERIFY=psnr or
        VERIFY_REPLICAS catch it."""
        encoder = encode.encoder_for(params["codec"], tools.encoders())
        with tempfile.TemporaryDirectory(prefix="tamper-") as scratch:
            chunk = Path(scratch) / f"chunk.{encode.CHUNK_FORMAT}"
            grey = f"color=c=gray:s={params['width']}x{params['height']}:r={params['fps']}"
            tools.run([*tools.FFMPEG, "-v", "error", "-f", "lavfi", "-i", grey, "-frames:v", str(params["frames"]),
                       "-r", str(params["fps"]), *encode.encoder_args(params, encoder), "-pix_fmt", "yuv420p",
                       "-f", encode.CHUNK_FORMAT, "-y", str(chunk)], timeout=600, what="tampering")
            return chunk.read_bytes()

    def corrupt(self, body: bytes) -> bytes:
        """Damaged bytes for WORKER_SIMULATE=corrupt: the middle eighth inverted, and the
        last quarter cut off, so both the decode and the frame count fail."""
        data = bytearray(body[: max(1, len(body) * 3 // 4)])
        middle = len(data) // 2
        for index in range(middle, min(len(data), middle + max(1, len(body) // 8))):
            data[index] ^= 0xFF
        return bytes(data)
