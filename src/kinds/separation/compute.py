"""The processing: run demucs on the segments that jobs own (this runs on a worker).

Each owned segment is cut from the received audio as demucs' own `apply_model(split=False)`
cuts it (a `TensorChunk` padded to the model's valid length), so a segment's output is the
whole-file call's. Segments are fed to the model in batches of up to SEGMENT_BATCH, taken
across the segments of one job and across every job handed over at once (a GPU worker
pools the jobs it holds): on a GPU one call on 16 segments costs about a third per segment
of 16 calls on one. Each output is weighted with apply_model's triangle and added up on
the model's device; a job's sum (the numerator of the blend) moves back to the CPU once,
and the server divides by the grid's weight sum.

Precision is explicit (PRECISION): `fp32` turns TF32 off, so a GPU's answer is plain
float32; `tf32` allows it; `bf16` runs the model under autocast. A batch that runs the
device out of memory is halved and retried (down to one segment) instead of failing the
job.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from demucs.apply import TensorChunk
from demucs.htdemucs import HTDemucs
from demucs.utils import center_trim

from src.kinds.base import Cancelled
from src.kinds.separation.model import bag_weights, sub_models

log = logging.getLogger("worker")

@dataclass(frozen=True)
class JobInput:
    """One job handed to `run_jobs`: its params, its (channels, frames) float32 audio starting at
    `params["slice_start"]`, and how to tell it was stopped."""

    params: dict[str, Any]
    audio: np.ndarray
    should_stop: Callable[[], bool] = lambda: False


class Batcher:
    """How many segments go to the model at once, and what happens when that runs out of memory.

    `size` is SEGMENT_BATCH; after an out-of-memory error it halves (and stays halved: the
    next job would hit the same wall). `calls` and `segments` count what was fed, for tests
    and benchmarks.
    """

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a batch holds at least one segment, not {size}")
        self.size = size
        self.calls = 0
        self.segments = 0
        self.halvings = 0

    def shrink(self, error: BaseException) -> None:
        if self.size == 1:
            raise error
        self.size //= 2
        self.halvings += 1
        log.warning("Out of memory with a batch of %d segments (%s); retrying with %d", self.size * 2,
                    str(error).splitlines()[0][:120] if str(error) else type(error).__name__, self.size)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def configure_precision(precision: str) -> None:
    """TF32 on or off for this process, as PRECISION (checked by config) says: torch allows it for
    convolutions by default."""
    allowed = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Past 32 segments a call, an H200 gains under 10 % per segment (docs/BENCHMARKS.md): more only costs memory.
MAX_AUTO_BATCH = 32


def auto_batch(model: Any, params: dict[str, Any], precision: str = "fp32", share: float = 0.5) -> int:
    """SEGMENT_BATCH=auto: 1 on a CPU (batching saves nothing there); on a GPU, as many segments as
    `share` of the free device memory holds, from one segment's peak memory measured on silence."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return 1
    member = sub_models(model)[0]
    valid = _valid_length(member, int(params["segment_frames"]), params["segment"])
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad(), autocast(device, precision):
        member(torch.zeros(1, int(params["channels"]), valid, device=device))
    per_segment = max(1, torch.cuda.max_memory_allocated(device) - before)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(MAX_AUTO_BATCH, int(free * share / per_segment)))


def weight(segment_frames: int, device: torch.device | str = "cpu") -> torch.Tensor:
    # apply_model's own expression, so the products match it bit for bit
    ramp = torch.cat([torch.arange(1, segment_frames // 2 + 1, device=device),
                      torch.arange(segment_frames - segment_frames // 2, 0, -1, device=device)])
    return ramp / ramp.max()


def _valid_length(member: Any, length: int, segment: float | None) -> int:
    """What apply_model pads a chunk of `length` frames to before calling `member`."""
    if isinstance(member, HTDemucs) and segment is not None:
        return int(segment * member.samplerate)
    if hasattr(member, "valid_length"):
        return member.valid_length(length)
    return length


@dataclass
class _Segment:
    job: int
    offset: int  # in the song
    chunk: TensorChunk
    valid: int  # padded length fed to the model


def _segments(jobs: Sequence[JobInput], mixes: list[torch.Tensor], member: Any) -> list[_Segment]:
    found = []
    for index, (job, mix) in enumerate(zip(jobs, mixes, strict=True)):
        p = job.params
        for i in range(int(p["segments"])):
            offset = int(p["first_offset"]) + i * int(p["stride"])
            chunk = TensorChunk(mix, offset - int(p["slice_start"]), int(p["segment_frames"]))
            found.append(_Segment(index, offset, chunk, _valid_length(member, chunk.length, p["segment"])))
    return found


def _next_batch(segments: list[_Segment], size: int) -> list[_Segment]:
    """The leading segments one model call takes: the same padded length, at most `size` of them."""
    end = 1
    while end < min(size, len(segments)) and segments[end].valid == segments[0].valid:
        end += 1
    return segments[:end]


def _forward(member: Any, batch: list[_Segment], precision: str, device: torch.device) -> torch.Tensor:
    inputs = torch.cat([s.chunk.padded(s.valid) for s in batch])
    with torch.no_grad(), autocast(device, precision):
        return member(inputs).float()


def run_jobs(model: Any, jobs: Sequence[JobInput], batcher: Batcher | None = None, precision: str = "fp32"
             ) -> list[tuple[int, np.ndarray] | Cancelled]:
    """For each job, (out_start, weighted sum of its segments as (sources, channels, frames)), or
    Cancelled when its should_stop said so. Jobs of one model, same grid."""
    batcher = batcher or Batcher(1)
    device = next(model.parameters()).device
    members, weights = sub_models(model), bag_weights(model)
    mixes, starts, estimates = [], [], []
    for job in jobs:
        p = job.params
        mean = torch.tensor(p["mean"], dtype=torch.float32)
        std = torch.tensor(p["std"], dtype=torch.float32)
        # Normalised on the CPU, as demucs.api does, then moved to the model's device.
        mixes.append(((torch.from_numpy(np.array(job.audio, dtype=np.float32)) - mean) / std)[None].to(device))
        last = int(p["first_offset"]) + (int(p["segments"]) - 1) * int(p["stride"])
        starts.append(int(p["first_offset"]))
        out_end = min(last + int(p["segment_frames"]), int(p["total_frames"]))
        estimates.append(torch.zeros(len(model.sources), mixes[-1].shape[1], out_end - starts[-1], device=device))
    stopped = [False] * len(jobs)
    grids = {(int(j.params["segment_frames"]), int(j.params["stride"])) for j in jobs}
    if len(grids) > 1:
        raise ValueError(f"jobs pooled together share one segment grid, not {sorted(grids)}")
    ramp = weight(int(jobs[0].params["segment_frames"]), device) if jobs else None

    for index, member in enumerate(members):
        partials = [torch.zeros_like(e) for e in estimates]
        pending = _segments(jobs, mixes, member)
        while pending:
            for number, job in enumerate(jobs):
                stopped[number] = stopped[number] or job.should_stop()
            pending = [s for s in pending if not stopped[s.job]]
            if not pending:
                break
            batch = _next_batch(pending, batcher.size)
            try:
                out = _forward(member, batch, precision, device)
            except torch.OutOfMemoryError as error:
                batcher.shrink(error)
                continue
            batcher.calls += 1
            batcher.segments += len(batch)
            for row, segment in zip(out, batch, strict=True):
                trimmed = center_trim(row, segment.chunk.length)
                n = trimmed.shape[-1]
                at = segment.offset - starts[segment.job]
                partials[segment.job][..., at:at + n] += ramp[:n] * trimmed
            pending = pending[len(batch):]
        for number, partial in enumerate(partials):
            if weights is None:
                estimates[number] = partial
            else:
                for k, inst_weight in enumerate(weights[index]):
                    partial[k] *= inst_weight
                estimates[number] += partial
    return [Cancelled() if stopped[n] else (starts[n], estimates[n].cpu().numpy()) for n in range(len(jobs))]


def run_job(model: Any, p: dict[str, Any], audio: np.ndarray, should_stop: Callable[[], bool] = lambda: False,
            batcher: Batcher | None = None, precision: str = "fp32") -> tuple[int, np.ndarray]:
    """One job: (out_start, weighted sum of its segments as (sources, channels, frames)).

    `p` is the job's params (see `kind.SeparationKind.payload`), `audio` the (channels,
    frames) float32 audio it was sent, starting at frame `p["slice_start"]` of the song.
    """
    (result,) = run_jobs(model, [JobInput(p, audio, should_stop)], batcher, precision)
    if isinstance(result, Cancelled):
        raise result
    return result
