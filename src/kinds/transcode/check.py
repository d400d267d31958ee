"""The server's judgement of an encoded chunk before it is accepted.

A chunk must decode without a single error (ffmpeg `-xerror`, with anything on stderr
counting as an error), hold exactly the frames its job owns, and have the planned size and
codec: anything else would put a seam, a missing frame or a repeated one in the stitched
video. One decode does it all: `framecrc` writes one line per decoded frame, so counting
lines counts frames, and the stream header gives the codec and size.

That catches a damaged chunk, not a wrong one: a worker with a broken encoder could ship a
clean chunk of the wrong pictures. `psnr` (VERIFY=psnr) measures the chunk against the
frames of the source it stands for, decoded from the job's piece and scaled the same way.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from src.kinds.transcode import tools
from src.kinds.transcode.encode import CHUNK_FORMAT
from src.media import guard


def echo_problem(params: Any, job: dict[str, Any], task: dict[str, Any], codec: str) -> str | None:
    """Why a result's params do not echo its job's plan (codec, frames, range, size), or None."""
    if not isinstance(params, dict):
        return "the result's params are not an object"
    planned = {"codec": codec, "frames": job["frames"], "start": job["start"], "end": job["end"],
               "width": task["width"], "height": task["height"]}
    for name, value in planned.items():
        if params.get(name) != value:
            return f"the result says {name}={params.get(name)!r}, the job planned {value!r}"
    return None


def check_body(body: bytes, scratch: Path, frames: int, width: int, height: int, codec: str, max_bytes: int,
               also: Callable[[Path], str | None] | None = None) -> str | None:
    """Why a result's body is not an acceptable chunk, or None: written to a file in `scratch`,
    checked by `check_chunk`, then by `also` (a kind's further check of the file)."""
    if not body:
        return "the result is empty"
    if len(body) > max_bytes:
        return f"the chunk is {len(body)} bytes, more than the {max_bytes} a result may carry"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=scratch, suffix=".nut") as chunk:
        chunk.write(body)
        chunk.flush()
        reason = check_chunk(Path(chunk.name), frames, width, height, codec)
        return reason if reason or also is None else also(Path(chunk.name))


def check_chunk(path: Path, frames: int, width: int, height: int, codec: str, timeout: float = 300,
                fmt: str = CHUNK_FORMAT) -> str | None:
    """Why the chunk at `path` is unacceptable, or None.

    The chunk is read only as `fmt` (forced: a playlist or a concat list is not even parsed),
    from the file protocol, from its own folder, with no picture larger than the plan's.
    """
    role, pixels = guard.chunk(fmt), guard.pixels(width, height)
    try:
        info = subprocess.run([*tools.FFPROBE, "-v", "error", "-threads", "1", "-of", "json", "-select_streams",
                               "v:0", "-show_entries", "stream=codec_name,width,height",
                               *guard.probe_input(path, role, path.parent, pixels)],
                              capture_output=True, timeout=timeout, check=False,
                              preexec_fn=guard.limited())
        decoded = subprocess.run([*tools.FFMPEG, "-v", "error", "-xerror",
                                  *guard.ffmpeg_input(path, role, path.parent, pixels), "-map", "0:v:0",
                                  "-f", "framecrc", "-"], capture_output=True, timeout=timeout, check=False)
    except guard.OutsideFolder as exc:
        return f"the chunk cannot be read: {exc}"
    except subprocess.TimeoutExpired:
        return f"the chunk did not decode within {timeout:.0f} s"
    if info.returncode != 0:
        return f"the chunk is not a readable video: {tools.tail(info.stderr, 300)}"
    try:
        stream = (json.loads(info.stdout or b"{}").get("streams") or [None])[0]
    except ValueError:
        stream = None
    if not stream:
        return "the chunk holds no video stream"
    if decoded.returncode != 0 or decoded.stderr.strip():
        return f"the chunk does not decode cleanly: {tools.tail(decoded.stderr, 300)}"
    got = sum(1 for line in decoded.stdout.splitlines() if line and not line.startswith(b"#"))
    if got != frames:
        return f"the chunk has {got} frames, the job owns {frames}"
    if stream.get("codec_name") != codec:
        return f"the chunk is {stream.get('codec_name')}, the task asked for {codec}"
    if (stream.get("width"), stream.get("height")) != (width, height):
        return f"the chunk is {stream.get('width')}x{stream.get('height')}, the plan says {width}x{height}"
    return None


PSNR_AVERAGE = re.compile(rb"PSNR .*average:(inf|[0-9.]+)")


def psnr(chunk: Path, piece: Path, skip: int, frames: int, width: int, height: int, fps: str,
         timeout: float = 600) -> float:
    """Mean PSNR (dB, all planes) of the chunk against source frames skip..skip+frames-1 of the
    piece, scaled as the worker scales them; inf when identical."""
    rate = Fraction(fps)
    retime = f"settb=AVTB,setpts=N*{rate.denominator}/{rate.numerator}/TB"
    graph = (f"[1:v]select='between(n\\,{skip}\\,{skip + frames - 1})',{retime},"
             f"scale={width}:{height}:flags=bicubic,format=yuv420p[source];"
             f"[0:v]{retime},format=yuv420p[chunk];[chunk][source]psnr")
    try:
        inputs = [*guard.ffmpeg_input(chunk, guard.chunk(CHUNK_FORMAT), chunk.parent, guard.pixels(width, height)),
                  *guard.ffmpeg_input(piece, guard.PIECE, piece.parent)]
    except guard.OutsideFolder as exc:
        raise tools.ToolError(f"measuring PSNR: {exc}") from None
    done = tools.run([*tools.FFMPEG, "-v", "info", "-nostats", *inputs,
                      "-filter_complex", graph, "-f", "null", "-"], timeout=timeout, what="measuring PSNR")
    found = PSNR_AVERAGE.search(done.stderr)
    if found is None:
        raise tools.ToolError(f"measuring PSNR: no figure in ffmpeg's output: {tools.tail(done.stderr, 300)}")
    return float(found.group(1))
