"""The splitter: which grid segments each job owns and which audio it is sent.

The grid is apply_model's: segments of `segment_frames` at offsets `range(0, L, stride)`.
A job owns a run of consecutive offsets, at most `CHUNK_SECONDS` of audio, and is sent
the union of what those segments read (`ModelSpec.input_window`). Its output, the
weighted sum of its segments, covers [first offset, last offset + segment) clipped to
the song; neighbouring jobs' outputs overlap by a quarter segment, where the merger
adds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from src.kinds.separation.model import ModelSpec
from src.media.pcm import SAMPLE_BYTES

# A result carries every source as raw float32 through the data store: keep it under what the
# data plane takes of one result whatever CHUNK_SECONDS says.
MAX_RESULT_BYTES = 96 * 1024 * 1024


@dataclass(frozen=True)
class JobPlan:
    chunk: int
    first_offset: int
    segments: int
    slice_start: int  # audio sent: [slice_start, slice_end)
    slice_end: int
    out_start: int  # output covers [out_start, out_end)
    out_end: int


def grid(spec: ModelSpec, total_frames: int) -> list[int]:
    return list(range(0, total_frames, spec.stride))


def segments_per_job(spec: ModelSpec, chunk_seconds: float) -> int:
    """Grid offsets per job: CHUNK_SECONDS rounded to the grid, capped by message size."""
    wanted = max(1, round(chunk_seconds * spec.samplerate / spec.stride))
    bytes_per_frame = len(spec.sources) * spec.channels * SAMPLE_BYTES
    fits = int((MAX_RESULT_BYTES / bytes_per_frame - spec.segment_frames) // spec.stride) + 1
    return max(1, min(wanted, fits))


def plan_jobs(spec: ModelSpec, total_frames: int, chunk_seconds: float, workers: int = 1) -> list[JobPlan]:
    """The song's jobs: CHUNK_SECONDS each at most, and no more than a `workers`-th of the song, so
    that every live worker gets work (16 workers: 16 jobs at least, where the song has 16 segments)."""
    if total_frames <= 0:
        raise ValueError("a song needs at least one frame of audio")
    offsets = grid(spec, total_frames)
    per_job = min(segments_per_job(spec, chunk_seconds), max(1, -(-len(offsets) // max(1, workers))))
    plans, first = [], 0
    while first < len(offsets):
        # Guided self-scheduling: full-size jobs first, then ever smaller ones (never more
        # than a quarter of what is left), so the song's last jobs are short and no worker
        # is left with a long job while the others have nothing to do.
        size = min(per_job, max(1, -(-(len(offsets) - first) // 4)))
        owned, chunk, first = offsets[first : first + size], len(plans), first + size
        windows = [spec.input_window(o, total_frames) for o in owned]
        plans.append(
            JobPlan(
                chunk=chunk,
                first_offset=owned[0],
                segments=len(owned),
                slice_start=min(w[0] for w in windows),
                slice_end=max(w[1] for w in windows),
                out_start=owned[0],
                out_end=min(owned[-1] + spec.segment_frames, total_frames),
            )
        )
    return plans


def triangle_weight(segment_frames: int) -> np.ndarray:
    """apply_model's blending weight for one segment (transition_power 1), float32."""
    half = segment_frames // 2
    ramp = np.concatenate([np.arange(1, half + 1), np.arange(segment_frames - half, 0, -1)])
    return ramp.astype(np.float32) / np.float32(ramp.max())


def weight_sum(spec: ModelSpec, total_frames: int, start: int, end: int) -> np.ndarray:
    """sum(w) over every grid segment, for frames [start, end), summed in grid order."""
    weight = triangle_weight(spec.segment_frames)
    total = np.zeros(end - start, dtype=np.float32)
    first = max(0, (start - spec.segment_frames) // spec.stride)
    for offset in range(first * spec.stride, min(end, total_frames), spec.stride):
        seg_end = min(offset + spec.segment_frames, total_frames)
        lo, hi = max(offset, start), min(seg_end, end)
        if lo < hi:
            total[lo - start : hi - start] += weight[lo - offset : hi - offset]
    return total


def job_params(spec: ModelSpec, plan: JobPlan, total_frames: int, mean: float, std: float) -> dict:
    """What a worker needs besides the audio of `plan`: the job message's params."""
    return {
        "model": spec.name, "samplerate": spec.samplerate, "channels": spec.channels,
        "total_frames": total_frames, "slice_start": plan.slice_start, "frames": plan.slice_end - plan.slice_start,
        "first_offset": plan.first_offset, "segments": plan.segments, "stride": spec.stride,
        "segment_frames": spec.segment_frames, "segment": spec.segment_override, "mean": mean, "std": std,
    }
