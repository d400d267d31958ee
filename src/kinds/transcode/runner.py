"""The worker half of `transcode`: check a job's params, encode its piece, return the chunk.

Params and body arrive from the broker and are untrusted: `problem` refuses anything
outside the ranges the server ever sends before a byte reaches ffmpeg, and the command line
is built from validated values only (a list, never a shell string).

The proof that a piece holds its job's frames is made here, not on the server: the worker
decodes the piece anyway, so the encode's filter graph also notes every frame it keeps (its
pts, in the source's time base: `proof_filter`). The result reports them (`decoded_frames`,
`decoded_first_pts`, `decoded_last_pts`), and a piece whose frames are not the planned ones
(the job's `frames`, `first_pts`, `last_pts`) is refused with the reason (`PieceRefused`):
the job fails rather than return a chunk with a frame missing, doubled or shifted.
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
TIME_BASE = re.compile(r"[1-9][0-9]{0,9}/[1-9][0-9]{0,9}")
MAX_PTS = 1 << 62
FRAME = re.compile(rb"^frame=(\d+)", re.M)  # ffmpeg -progress: frames written so far
NOTED = re.compile(rb"^frame:\s*\d+\s+pts:\s*(-?\d+|NOPTS)", re.M)  # a line of the metadata filter's print
SAFE_PATH = re.compile(r"[A-Za-z0-9/_.-]+")  # a path a filter graph's option can hold unescaped
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
    if reason := proof_problem(params):
        return reason
    if not isinstance(body, bytes | bytearray) or not body:
        return "the body (the source piece) is empty"
    if len(body) > MAX_BODY:
        return f"the body is {len(body)} bytes, more than {MAX_BODY}"
    return None


class PieceRefused(ValueError):
    """The job's piece does not decode to the frames its job planned."""


def proof_problem(params: dict[str, Any]) -> str | None:
    """Why a job's planned frame timestamps (`first_pts`, `last_pts`, `time_base`) are unusable."""
    base = params.get("time_base")
    if base is not None and not (isinstance(base, str) and TIME_BASE.fullmatch(base)):
        return f"time_base must be a fraction like '1/12800', got {base!r}"
    for name in ("first_pts", "last_pts"):
        value = params.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not -MAX_PTS <= value <= MAX_PTS):
            return f"{name} must be an integer or null, got {value!r}"
        if value is not None and base is None:
            return f"{name} needs the time_base it counts in"
    return None


def proof_filter(params: dict[str, Any], noted: Path) -> str:
    """Filters for the point where a job's frames are chosen: each frame is noted in the file
    `noted` with its pts in the source's time base (the piece's is at least as fine: exact)."""
    if not SAFE_PATH.fullmatch(str(noted)):
        raise tools.ToolError(f"the scratch path {str(noted)!r} cannot be named in a filter graph")
    retime = f"settb={params['time_base']}," if params.get("time_base") else ""
    return f"{retime}metadata=mode=add:key=decoded:value=1,metadata=mode=print:file={noted}"


def decoded(noted: Path) -> list[int | None]:
    """The pts of every frame `proof_filter` noted, in order (None where a frame had none)."""
    try:
        text = noted.read_bytes()
    except OSError:
        return []
    return [None if stamp == b"NOPTS" else int(stamp) for stamp in NOTED.findall(text)]


def account(params: dict[str, Any], stamps: list[int | None]) -> dict[str, Any]:
    """The result's account of the frames decoded for the job; PieceRefused where they are not
    the planned ones (count, and the first and last pts where the job names them)."""
    found = {"decoded_frames": len(stamps), "decoded_first_pts": stamps[0] if stamps else None,
             "decoded_last_pts": stamps[-1] if stamps else None}
    planned = {"decoded_frames": params["frames"], "decoded_first_pts": params.get("first_pts"),
               "decoded_last_pts": params.get("last_pts")}
    wrong = [f"{name.removeprefix('decoded_')} {found[name]} (planned {value})" for name, value in planned.items()
             if value is not None and found[name] != value]
    if wrong:
        raise PieceRefused(f"the piece does not hold the job's frames {params['start']}-{params['end']}: decoded "
                           f"{', '.join(wrong)}")
    return found


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
            noted = Path(scratch) / "decoded.txt"
            command, polled = progressed(encode.command(params, encoder, str(piece), str(chunk),
                                                        proof_filter(params, noted)),
                                         Path(scratch) / "progress", params["frames"], should_stop)
            tools.run_stoppable(command, polled, timeout=timeout, what=f"encoding with {encoder}")
            proven = account(params, decoded(noted))  # PieceRefused: no chunk of the wrong frames leaves
            data = chunk.read_bytes()
        result = {name: params[name] for name in ECHOED}
        result["encoder"] = encoder
        result.update(proven)
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
