"""The server's judgement of an encoded chunk before it is accepted.

A chunk must decode without a single error (ffmpeg `-xerror`, with anything on stderr
counting as an error), hold exactly the frames its job owns, and have the planned size and
codec: anything else would put a seam, a missing frame or a repeated one in the stitched
video. One decode does it all: `framecrc` writes one line per decoded frame, so counting
lines counts frames, and the stream header gives the codec and size.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from src.kinds.transcode import tools


def check_chunk(path: Path, frames: int, width: int, height: int, codec: str, timeout: float = 300) -> str | None:
    """Why the chunk at `path` is unacceptable, or None."""
    try:
        info = subprocess.run([*tools.FFPROBE, "-v", "error", "-of", "json", "-select_streams", "v:0",
                               "-show_entries", "stream=codec_name,width,height", str(path)],
                              capture_output=True, timeout=timeout, check=False)
        decoded = subprocess.run([*tools.FFMPEG, "-v", "error", "-xerror", "-i", str(path), "-map", "0:v:0",
                                  "-f", "framecrc", "-"], capture_output=True, timeout=timeout, check=False)
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
