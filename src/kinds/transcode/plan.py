"""Cutting a video's frames into jobs: pure functions, no ffmpeg.

A job owns the frames [start, end) of the source, in display order; the jobs' ranges tile
[0, frames) with no gap or overlap, so the stitched output has every frame exactly once.
The worker gets a *source piece*: the packets from a keyframe up to the next keyframe at
or after `end`, cut by the server with stream copy (a copy can only start at a keyframe,
and decoding needs everything from there). So each job starts at a source keyframe where
the keyframes allow it, and its piece is then exactly its own frames. Where keyframes are
sparse (a GOP longer than a chunk), a job starts mid-GOP: its piece starts at the keyframe
before its range and the worker decodes and drops the leading frames it carries.

A job's facts, as `plan_jobs` returns them (JSON-able):

- `start`, `end`: the frames the job owns, display-order indices, end exclusive;
- `frames`: end - start, the frames its chunk must hold;
- `key`: the source keyframe its piece starts at (≤ start);
- `piece`: [key, piece_end], the source frames its piece spans (piece_end: the first
  keyframe at or after `end`, or the frame count);
- `piece_bytes`: the piece's size, from the packet sizes (the job's `size`).

`split` proves each piece from the packets (or, where they cannot, by a decode), may widen it
(open GOPs) and adds which packets it is, where its file is and how many decoded frames the
worker must skip.

How long a job is (`job_seconds`): CHUNK_SECONDS at most, and at most the clip's length over
the live workers, so that a short clip still gives every worker a part; but never below
MIN_JOB_SECONDS (unless CHUNK_SECONDS is lower), where a job's fixed cost would dominate.
"""

from __future__ import annotations

import bisect
from typing import Any

from src.media.probe import RefusedMedia

# A piece travels whole through the data plane and into the worker's memory: the planner
# halves jobs whose piece would be larger.
MAX_PIECE_BYTES = 48 * 1024 * 1024
# The jobs' pieces may add up to this many times the source's video bytes. A job starting
# mid-GOP carries the GOP's head again, so sparse keyframes multiply what the broker carries
# (a 600 s clip with one keyframe sent 18.6x its size). Ordinary sources stay near 1x
# (a keyframe every 2-10 s against 30 s chunks: 1.0-1.4x, an open-GOP widening one GOP more).
MAX_AMPLIFICATION = 4.0
# The shortest job worth sending, in seconds of media: below it a job's fixed cost (the
# server's cut and check, the worker's ffmpeg start and the encoder's first keyframe; measured
# about 0.27 CPU-s, docs/VIDEO_PREPARE.md) is a large share of its work: 2 s of 1080p H.264
# (veryfast, ~24 ms a frame) spend about 18 % on it, 2 s of a 360p output more.
MIN_JOB_SECONDS = 2.0


class PlanError(ValueError):
    """The source cannot be cut within the limits (e.g. one GOP larger than a body)."""


class TooMuchTraffic(RefusedMedia):
    """The jobs would send many times the source's size: its keyframes are too sparse."""


def check_traffic(jobs: list[dict[str, Any]], total_bytes: int, limit: float = MAX_AMPLIFICATION) -> None:
    """TooMuchTraffic when the jobs' pieces add up to more than `limit` times the source's bytes."""
    sent = sum(int(job["piece_bytes"]) for job in jobs)
    if total_bytes > 0 and sent > limit * total_bytes:
        raise TooMuchTraffic(f"its jobs would send {sent / total_bytes:.1f}x the video's {total_bytes} bytes (at "
                             f"most {limit:g}x): its keyframes are too far apart; re-encode it with a keyframe "
                             "every few seconds")


def job_seconds(duration: float, workers: int, chunk_seconds: float, floor: float = MIN_JOB_SECONDS) -> float:
    """Target seconds of one job: `chunk_seconds` at most, a `workers`-th of the clip where that
    is shorter (every live worker gets a part), but not below `floor` (nor above `chunk_seconds`)."""
    share = duration / max(1, int(workers))
    return min(float(chunk_seconds), max(float(floor), share))


def chunk_frames(chunk_seconds: float, fps: float) -> int:
    """Frames in one chunk of `chunk_seconds` at `fps`, at least one."""
    return max(1, round(chunk_seconds * fps))


def boundaries(frames: int, keyframes: list[int], chunk: int) -> list[int]:
    """Job start frames: 0, then about every `chunk` frames, snapped to a keyframe when one
    lies within half a chunk of the target, else mid-GOP. The last job takes the tail, so
    it is between half a chunk and one and a half chunks long (or the whole short video).
    """
    if frames <= 0:
        raise PlanError("the video has no frames")
    starts = [0]
    half = max(1, chunk // 2)
    while frames - starts[-1] > chunk + half:
        target = starts[-1] + chunk
        low = bisect.bisect_left(keyframes, starts[-1] + half)
        high = bisect.bisect_right(keyframes, min(starts[-1] + chunk + half, frames - half))
        nearby = keyframes[low:high]
        starts.append(min(nearby, key=lambda k: (abs(k - target), k)) if nearby else target)
    return starts


def _key_at_or_before(keyframes: list[int], frame: int) -> int:
    return keyframes[bisect.bisect_right(keyframes, frame) - 1]


def _key_at_or_after(keyframes: list[int], frame: int, frames: int) -> int:
    index = bisect.bisect_left(keyframes, frame)
    return keyframes[index] if index < len(keyframes) else frames


def piece_bytes(keyframes: list[int], key_bytes: list[int], total: int, first: int, last: int) -> int:
    """Bytes of the packets from keyframe `first` up to keyframe `last` (or the end)."""
    start = key_bytes[bisect.bisect_left(keyframes, first)]
    index = bisect.bisect_left(keyframes, last)
    end = key_bytes[index] if index < len(keyframes) and keyframes[index] == last else total
    return end - start


def job(start: int, end: int, frames: int, keyframes: list[int], key_bytes: list[int], total: int) -> dict[str, Any]:
    key = _key_at_or_before(keyframes, start)
    piece_end = _key_at_or_after(keyframes, end, frames)
    return {
        "start": start,
        "end": end,
        "frames": end - start,
        "key": key,
        "piece": [key, piece_end],
        "piece_bytes": piece_bytes(keyframes, key_bytes, total, key, piece_end),
    }


def plan_jobs(frames: int, keyframes: list[int], chunk: int, key_bytes: list[int] | None = None,
              total_bytes: int = 0, max_bytes: int = MAX_PIECE_BYTES) -> list[dict[str, Any]]:
    """The jobs for `frames` frames with keyframes at `keyframes` (display indices, with 0),
    about `chunk` frames each, every piece at most `max_bytes` (PlanError where one GOP alone
    is larger). `key_bytes[i]` is the bytes before keyframe i in decode order."""
    if not keyframes or keyframes[0] != 0 or keyframes != sorted(set(keyframes)):
        raise PlanError("keyframes must be ascending, unique and start at frame 0")
    if keyframes[-1] >= frames:
        raise PlanError("a keyframe lies beyond the last frame")
    key_bytes = key_bytes if key_bytes is not None else [0] * len(keyframes)
    starts = boundaries(frames, keyframes, chunk)
    planned: list[dict[str, Any]] = []
    pending = [job(s, e, frames, keyframes, key_bytes, total_bytes)
               for s, e in zip(starts, [*starts[1:], frames], strict=True)]
    while pending:
        current = pending.pop(0)
        if current["piece_bytes"] <= max_bytes:
            planned.append(current)
            continue
        # Too big to send: split at the keyframe nearest the middle of the job. Without a
        # keyframe inside, both halves would still carry the same GOP, so that cannot help.
        start, end = current["start"], current["end"]
        inner = [k for k in keyframes if start < k < end]
        if not inner:
            raise PlanError(f"frames {start}-{end} lie in one GOP of {current['piece_bytes']} bytes, more than "
                            f"the {max_bytes} bytes a job can carry; re-encode the source with more keyframes")
        middle = min(inner, key=lambda k: abs(k - (start + end) / 2))
        pending[:0] = [job(start, middle, frames, keyframes, key_bytes, total_bytes),
                       job(middle, end, frames, keyframes, key_bytes, total_bytes)]
    check_traffic(planned, total_bytes)
    return planned
