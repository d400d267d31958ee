"""Cutting a video into faceblur jobs: pure functions, no ffmpeg.

A job owns the frames [start, end) of the source (display order); the jobs tile
[0, frames). Smoothing masks frame t with the faces found in frames t-h..t+h (h =
window // 2), so a job also needs the detections of up to h frames on each side of its
own: its *context* [cstart, cend) = [max(0, start - h), min(frames, end + h)). The worker
decodes and detects on every context frame and writes only its own, so each own frame sees
exactly the neighbours it would see in a whole-file run: the output does not depend on
where the jobs were cut.

The piece a job gets is transcode's: the source packets from the keyframe at or before
`cstart` to the keyframe at or after `cend` (`src.kinds.transcode.plan.job` on the context
range). To waste as little of it as possible, job starts are snapped to `keyframe + h`
rather than to a keyframe, so the context starts on the keyframe itself (no leading GOP
carried for nothing).

How many jobs: about CHUNK_SECONDS each at most, and a workers-th of a shorter clip so that
every live worker gets a part (transcode's `plan.job_seconds`, with this kind's floor).

A job owns at most MAX_JOB_FRAMES frames: its result carries a record (milliseconds and
faces) for every own frame in the params header, which the backbone limits to
`src.messaging.schema.MAX_PARAMS_CHARS` (4096) characters.
"""

from __future__ import annotations

import math
from typing import Any

from src.kinds.transcode import plan as transcode_plan

MAX_JOB_FRAMES = 300  # two int lists of this length fit the 4096-character params header
# The shortest job worth sending, in seconds of media (transcode's plan.job_seconds applies it).
# Measured (docs/VIDEO_PREPARE.md): a job's fixed cost is about 0.4 CPU-s (the server's cut and
# check, two ffmpeg starts, the context frames detected and never output) against ~0.1 CPU-s a
# 640x360 frame, so a 1 s job (25 frames) spends about 14 % of its CPU on being a job.
MIN_JOB_SECONDS = 1.0
# transcode's boundaries() lets a job reach 1.5 chunks; this chunk keeps it within the cap
MAX_CHUNK_FRAMES = MAX_JOB_FRAMES * 2 // 3


def reach(window: int) -> int:
    """h: frames on each side of a frame whose faces mask it."""
    return int(window) // 2


def context(start: int, end: int, frames: int, window: int) -> tuple[int, int]:
    """The frames a job owning [start, end) must detect on: [cstart, cend)."""
    h = reach(window)
    return max(0, start - h), min(frames, end + h)


def ranges(frames: int, keyframes: list[int], chunk: int, window: int) -> list[tuple[int, int]]:
    """Own ranges [start, end) tiling [0, frames), about `chunk` frames each (at most
    MAX_JOB_FRAMES), starting at keyframe + h where one lies within half a chunk."""
    if frames <= 0:
        raise transcode_plan.PlanError("the video has no frames")
    h = reach(window)
    shifted = sorted({0} | {k + h for k in keyframes if 0 < k and k + h < frames})
    starts = transcode_plan.boundaries(frames, shifted, max(1, min(int(chunk), MAX_CHUNK_FRAMES)))
    owned = []
    for start, end in zip(starts, [*starts[1:], frames], strict=True):
        parts = math.ceil((end - start) / MAX_JOB_FRAMES)
        cuts = [start + (end - start) * i // parts for i in range(parts + 1)]
        owned.extend(zip(cuts, cuts[1:], strict=False))
    return owned


def context_job(start: int, end: int, frames: int, window: int, keyframes: list[int], key_bytes: list[int],
                total_bytes: int) -> dict[str, Any]:
    """transcode's job on the context range (its piece: keyframe at or before cstart to the
    keyframe at or after cend), with the job's own range beside it."""
    cstart, cend = context(start, end, frames, window)
    piece = transcode_plan.job(cstart, cend, frames, keyframes, key_bytes, total_bytes)
    return {"own": [start, end], **piece}


def plan_jobs(frames: int, keyframes: list[int], chunk: int, window: int, key_bytes: list[int] | None = None,
              total_bytes: int = 0, max_bytes: int = transcode_plan.MAX_PIECE_BYTES) -> list[dict[str, Any]]:
    """The context jobs (see `context_job`) for a video, each piece at most `max_bytes`:
    a job whose piece is larger is halved (PlanError once a half could no longer shrink it)."""
    if not keyframes or keyframes[0] != 0 or keyframes != sorted(set(keyframes)):
        raise transcode_plan.PlanError("keyframes must be ascending, unique and start at frame 0")
    key_bytes = key_bytes if key_bytes is not None else [0] * len(keyframes)
    pending = [context_job(s, e, frames, window, keyframes, key_bytes, total_bytes)
               for s, e in ranges(frames, keyframes, chunk, window)]
    planned: list[dict[str, Any]] = []
    while pending:
        current = pending.pop(0)
        if current["piece_bytes"] <= max_bytes:
            planned.append(current)
            continue
        start, end = current["own"]
        middle = (start + end) // 2
        halves = [context_job(s, e, frames, window, keyframes, key_bytes, total_bytes)
                  for s, e in ((start, middle), (middle, end))]
        if end - start < 2 or max(half["piece_bytes"] for half in halves) >= current["piece_bytes"]:
            raise transcode_plan.PlanError(
                f"frames {start}-{end} need a piece of {current['piece_bytes']} bytes, more than the {max_bytes} "
                "bytes a job can carry; re-encode the source with more keyframes")
        pending[:0] = halves
    transcode_plan.check_traffic(planned, total_bytes)
    return planned
