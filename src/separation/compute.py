"""The processing: run demucs on the segments one job owns (this runs on a worker).

Each owned segment goes through demucs' own `apply_model(split=False)` on a
`TensorChunk` of the received audio, exactly as the whole-file call would run it, and
is weighted with apply_model's triangle. The job's output is the sum of those weighted
segments (the numerator of the blend); the server divides by the grid's weight sum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from demucs.apply import TensorChunk, apply_model

from src.messaging.schema import JobMessage
from src.separation.model import ModelUnavailable, bag_weights, describe, sub_models


class JobCancelled(Exception):
    """The job's song was reset while the job ran."""


def job_params(first_offset: int, segments: int, stride: int, segment_frames: int,
               segment_override: float | None, mean: float, std: float) -> dict[str, Any]:
    """What a worker needs besides the audio; travels as the job's `params` header."""
    return {
        "first_offset": first_offset,
        "segments": segments,
        "stride": stride,
        "segment_frames": segment_frames,
        "segment": segment_override,
        "mean": mean,
        "std": std,
    }


def model_mismatch(model: Any, job: JobMessage) -> str | None:
    """Why a (schema-valid) job does not fit the model that would run it, or None.

    The schema checks that the job's segments lie in its audio; this checks the grid
    itself against the model: segment length, stride, sample rate and channels.
    """
    p = job.params
    try:
        spec = describe(model, job.model, p["segment"])
    except ModelUnavailable as exc:
        return str(exc)
    if (p["segment_frames"], p["stride"]) != (spec.segment_frames, spec.stride):
        return (f"segment grid {p['segment_frames']}/{p['stride']} frames is not the model's "
                f"{spec.segment_frames}/{spec.stride}")
    if (job.samplerate, job.audio.shape[0]) != (spec.samplerate, spec.channels):
        return f"audio is {job.audio.shape[0]} channels at {job.samplerate} Hz, the model takes " \
               f"{spec.channels} at {spec.samplerate} Hz"
    return None


def _weight(segment_frames: int) -> torch.Tensor:
    # apply_model's own expression, so the products match it bit for bit
    weight = torch.cat([torch.arange(1, segment_frames // 2 + 1),
                        torch.arange(segment_frames - segment_frames // 2, 0, -1)])
    return weight / weight.max()


def run_job(model: Any, job: JobMessage, should_stop: Callable[[], bool] = lambda: False
            ) -> tuple[int, np.ndarray]:
    """(out_start, weighted sum of the job's segments as (sources, channels, frames))."""
    p = job.params
    stride, segment_frames = int(p["stride"]), int(p["segment_frames"])
    offsets = [int(p["first_offset"]) + i * stride for i in range(int(p["segments"]))]
    mean = torch.tensor(p["mean"], dtype=torch.float32)
    std = torch.tensor(p["std"], dtype=torch.float32)
    wav = torch.from_numpy(np.array(job.audio, dtype=np.float32))
    # Normalised on the CPU, as demucs.api does, then moved to wherever the model lives (DEVICE);
    # the weighted sum stays on the CPU, where the server's merge adds it up.
    mix = ((wav - mean) / std)[None].to(next(model.parameters()).device)

    out_start = offsets[0]
    out_end = min(offsets[-1] + segment_frames, job.total_frames)
    weight = _weight(segment_frames)
    members, weights = sub_models(model), bag_weights(model)
    estimate = torch.zeros(len(model.sources), mix.shape[1], out_end - out_start)

    for index, member in enumerate(members):
        partial = torch.zeros_like(estimate)
        for offset in offsets:
            if should_stop():
                raise JobCancelled()
            chunk = TensorChunk(mix, offset - job.slice_start, segment_frames)
            out = apply_model(member, chunk, shifts=0, split=False, segment=p["segment"])[0].cpu()
            n = out.shape[-1]
            partial[..., offset - out_start : offset - out_start + n] += weight[:n] * out
        if weights is None:
            estimate = partial
        else:
            for k, inst_weight in enumerate(weights[index]):
                partial[k] *= inst_weight
            estimate += partial
    return out_start, estimate.numpy()
