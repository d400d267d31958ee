"""The server's judgement of an encoded chunk before it is accepted.

By default the server reads a chunk's packets only, never its pictures (one ffprobe
pass over the container; no decoder runs): the stream header must name the planned codec
and size, there must be exactly one packet per frame the job owns, the first a keyframe,
every packet one frame long with the timestamps one frame apart and none repeated or
missing (the plan's frames at the task's rate), every packet inside the file, and the file
little more than its packets (a bound on the container's overhead, so nothing else rides
along). ffprobe must say nothing on stderr: a truncated or garbled NUT file makes its
demuxer complain (a lost index or syncpoint, a frame header without its checksum).
That is a stream copy's worth of reading, not a decode: what the stitch itself relies on.

What packets cannot show is a damaged picture inside a well-formed packet, or a wrong
picture (a broken encoder, a lazy worker). `decode` adds the old full check: a decode with
no error at all (ffmpeg `-xerror`, anything on stderr counting), counting the frames it
gives (`framecrc`, one line a frame). It runs under VERIFY=psnr and on the chunks
VERIFY_SAMPLE picks (`sampled`): a fraction of the chunks chosen by a keyed hash of the
task and the chunk, so a restarted server picks the same ones and a worker cannot tell
which. `psnr` (VERIFY=psnr, and the sampled chunks of a transcode) measures the chunk
against the frames of the source it stands for, decoded from the job's piece and scaled
the same way: that is what catches a clean chunk of the wrong pictures.

The worker decodes its piece anyway and reports what it decoded (`decoded_frames`, the first
and last timestamps); `decoded_problem` holds that report to the plan.
"""

from __future__ import annotations

import hashlib
import json
import os
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
from src.media.atomic import atomic

# NUT spends a few bytes a frame on headers, plus syncpoints and an index: measured 485 bytes
# for 50 small frames. A chunk whose file is more than its packets by this much carries something else.
OVERHEAD_BYTES, OVERHEAD_PER_FRAME = 65536, 64
# The first timestamp may sit a few frames after 0 (x264's B-frame delay puts it at 2 frames):
# the stitch shifts each chunk to its place, so only an offset beyond any encoder's delay is refused.
MAX_LEAD_FRAMES = 64
SALT = "verify-sample.key"  # in the task's folder: what keys VERIFY_SAMPLE's choice of chunks


def echo_problem(params: Any, job: dict[str, Any], task: dict[str, Any], codec: str) -> str | None:
    """Why a result's params do not echo its job's plan (codec, frames, range, size), or None."""
    if not isinstance(params, dict):
        return "the result's params are not an object"
    planned = {"codec": codec, "frames": job["frames"], "start": job["start"], "end": job["end"],
               "width": task["width"], "height": task["height"]}
    for name, value in planned.items():
        if params.get(name) != value:
            return f"the result says {name}={params.get(name)!r}, the job planned {value!r}"
    return decoded_problem(params, job)


def decoded_problem(params: dict[str, Any], job: dict[str, Any]) -> str | None:
    """Why what the worker says it decoded (`decoded_frames`, `decoded_first_pts`,
    `decoded_last_pts`) does not match the job's plan, or None. Every figure the plan names
    (`frames`; `first_pts`, `last_pts` where packets proved the piece) must be reported, and equal."""
    planned = {"decoded_frames": job.get("frames"), "decoded_first_pts": job.get("first_pts"),
               "decoded_last_pts": job.get("last_pts")}
    for name, value in planned.items():
        if value is None:
            continue
        if name not in params:
            return f"the result does not report {name} (the job planned {value!r})"
        got = params[name]
        if isinstance(got, bool) or not isinstance(got, int) or got != value:
            return f"the worker decoded {name}={got!r}, the job planned {value!r}"
    return None


def sampled(folder: Path, chunk: int, fraction: float) -> bool:
    """Whether VERIFY_SAMPLE's `fraction` picks this chunk of the task in `folder` for a full check.

    The choice is a hash of a random key kept in the task's folder and the chunk's index: the
    same chunks after a restart, and none a worker could predict (task ids and tokens travel in
    the jobs it receives). 0 picks none, 1 every chunk."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    key_file = folder / SALT
    if not key_file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic(key_file) as partial:
            partial.write_bytes(os.urandom(32))
    digest = hashlib.sha256(key_file.read_bytes() + str(int(chunk)).encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def check_body(body: bytes, scratch: Path, frames: int, width: int, height: int, codec: str, max_bytes: int,
               also: Callable[[Path], str | None] | None = None, decode: bool = False,
               fps: str | None = None) -> str | None:
    """Why a result's body is not an acceptable chunk, or None: written to a file in `scratch`,
    checked by `check_chunk` (with a full decode when `decode`), then by `also` (a kind's
    further check of the file)."""
    if not body:
        return "the result is empty"
    if len(body) > max_bytes:
        return f"the chunk is {len(body)} bytes, more than the {max_bytes} a result may carry"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=scratch, suffix=".nut") as chunk:
        chunk.write(body)
        chunk.flush()
        reason = check_chunk(Path(chunk.name), frames, width, height, codec, decode=decode, fps=fps)
        return reason if reason or also is None else also(Path(chunk.name))


def check_chunk(path: Path, frames: int, width: int, height: int, codec: str, timeout: float = 300,
                fmt: str = CHUNK_FORMAT, decode: bool = False, fps: str | None = None) -> str | None:
    """Why the chunk at `path` is unacceptable, or None: its packets (see the module's doc) at
    the plan's rate `fps` (default: the chunk's own), then, when `decode`, a clean decode of
    exactly `frames` frames.

    The chunk is read only as `fmt` (forced: a playlist or a concat list is not even parsed),
    from the file protocol, from its own folder, with no picture larger than the plan's.
    """
    role, pixels = guard.chunk(fmt), guard.pixels(width, height)
    try:
        info = guard.run([*tools.FFPROBE, "-v", "error", "-threads", "1", "-of", "json", "-select_streams",
                          "v:0", "-show_entries", "stream=codec_name,width,height,time_base,r_frame_rate:"
                          "packet=pts,dts,duration,size,pos,flags",
                          *guard.probe_input(path, role, path.parent, pixels)],
                         capture_output=True, timeout=timeout, check=False, preexec_fn=guard.limited())
    except guard.OutsideFolder as exc:
        return f"the chunk cannot be read: {exc}"
    except subprocess.TimeoutExpired:
        return f"the chunk's packets could not be read within {timeout:.0f} s"
    if info.returncode != 0:
        return f"the chunk is not a readable video: {tools.tail(info.stderr, 300)}"
    try:
        found = json.loads(info.stdout or b"{}")
    except ValueError:
        found = {}
    stream = (found.get("streams") or [None])[0]
    if not stream:
        return "the chunk holds no video stream"
    reason = packets_problem(found.get("packets") or [], stream, frames, width, height, codec,
                             path.stat().st_size, fps)
    if reason is None and info.stderr.strip():
        reason = f"the chunk's container is damaged: {tools.tail(info.stderr, 300)}"
    if reason or not decode:
        return reason
    return decode_problem(path, frames, width, height, timeout, fmt)


def packets_problem(packets: list[dict], stream: dict, frames: int, width: int, height: int, codec: str,
                    file_bytes: int, fps: str | None = None) -> str | None:
    """Why a chunk's packets (ffprobe's, in file order) and stream header are not the job's
    frames at the task's rate `fps` (default: the stream's own) and size, or None."""
    if len(packets) != frames:
        return f"the chunk has {len(packets)} frames, the job owns {frames}"
    if stream.get("codec_name") != codec:
        return f"the chunk is {stream.get('codec_name')}, the task asked for {codec}"
    if (stream.get("width"), stream.get("height")) != (width, height):
        return f"the chunk is {stream.get('width')}x{stream.get('height')}, the plan says {width}x{height}"
    try:
        step = 1 / tools.fraction(fps or stream["r_frame_rate"]) / tools.fraction(stream["time_base"])
        pts = [int(packet["pts"]) for packet in packets]
        sizes = [int(packet["size"]) for packet in packets]
        ends = [int(packet["pos"]) + int(packet["size"]) for packet in packets]
        durations = [int(packet["duration"]) for packet in packets]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return "the chunk's packets lack a timestamp, a duration, a size or a position"
    if step.denominator != 1 or step <= 0:
        return (f"the chunk's time base {stream.get('time_base')} does not hold the rate "
                f"{fps or stream.get('r_frame_rate')}")
    if "K" not in str(packets[0].get("flags", "")):
        return "the chunk does not open with a keyframe"
    if any(duration != step for duration in durations):
        return f"the chunk's packets are not all one frame long ({step} ticks of {stream['time_base']})"
    first = min(pts)
    if sorted(pts) != [first + index * int(step) for index in range(frames)]:
        return "the chunk's timestamps are not one frame apart: a frame is missing, repeated or out of place"
    if not 0 <= first <= MAX_LEAD_FRAMES * step:
        return f"the chunk starts {Fraction(first, 1) / step} frames after 0, not with the job's first frame"
    dts = [int(packet["dts"]) for packet in packets if str(packet.get("dts", "N/A")).lstrip("-").isdigit()]
    if any(later <= earlier for earlier, later in zip(dts, dts[1:], strict=False)):
        return "the chunk's decoding timestamps do not increase"
    if max(ends) > file_bytes:
        return "the chunk is cut short: a packet ends past the end of the file"
    overhead = file_bytes - sum(sizes)
    if overhead > OVERHEAD_BYTES + OVERHEAD_PER_FRAME * frames:
        return f"the chunk's file is {overhead} bytes more than its video packets"
    return None


def decode_problem(path: Path, frames: int, width: int, height: int, timeout: float = 300,
                   fmt: str = CHUNK_FORMAT) -> str | None:
    """Why the chunk at `path` does not decode cleanly to exactly `frames` frames, or None."""
    try:
        decoded = guard.run([*tools.FFMPEG, "-v", "error", "-xerror",
                             *guard.ffmpeg_input(path, guard.chunk(fmt), path.parent, guard.pixels(width, height)),
                             "-map", "0:v:0", "-f", "framecrc", "-"], capture_output=True, timeout=timeout, check=False)
    except guard.OutsideFolder as exc:
        return f"the chunk cannot be read: {exc}"
    except subprocess.TimeoutExpired:
        return f"the chunk did not decode within {timeout:.0f} s"
    if decoded.returncode != 0 or decoded.stderr.strip():
        return f"the chunk does not decode cleanly: {tools.tail(decoded.stderr, 300)}"
    got = sum(1 for line in decoded.stdout.splitlines() if line and not line.startswith(b"#"))
    if got != frames:
        return f"the chunk decodes to {got} frames, the job owns {frames}"
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
