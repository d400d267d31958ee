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

from src.kinds.base import Cancelled
from src.kinds.separation.model import bag_weights, sub_models


def _weight(segment_frames: int) -> torch.Tensor:
    # apply_model's own expression, so the products match it bit for bit
    weight = torch.cat([torch.arange(1, segment_frames // 2 + 1),
                        torch.arange(segment_frames - segment_frames // 2, 0, -1)])
    return weight / weight.max()


def run_job(model: Any, p: dict[str, Any], audio: np.ndarray, should_stop: Callable[[], bool] = lambda: False
            ) -> tuple[int, np.ndarray]:
    """(out_start, weighted sum of the job's segments as (sources, channels, frames)).

    `p` is the job's params (see `kind.SeparationKind.payload`), `audio` the (channels,
    frames) float32 audio it was sent, starting at frame `p["slice_start"]` of the song.
    """
    stride, segment_frames = int(p["stride"]), int(p["segment_frames"])
    offsets = [int(p["first_offset"]) + i * stride for i in range(int(p["segments"]))]
    mean = torch.tensor(p["mean"], dtype=torch.float32)
    std = torch.tensor(p["std"], dtype=torch.float32)
    wav = torch.from_numpy(np.array(audio, dtype=np.float32))
    # Normalised on the CPU, as demucs.api does, then moved to wherever the model lives (DEVICE);
    # the weighted sum stays on the CPU, where the server's merge adds it up.
    mix = ((wav - mean) / std)[None].to(next(model.parameters()).device)

    out_start = offsets[0]
    out_end = min(offsets[-1] + segment_frames, int(p["total_frames"]))
    weight = _weight(segment_frames)
    members, weights = sub_models(model), bag_weights(model)
    estimate = torch.zeros(len(model.sources), mix.shape[1], out_end - out_start)

    for index, member in enumerate(members):
        partial = torch.zeros_like(estimate)
        for offset in offsets:
            if should_stop():
                raise Cancelled()
            chunk = TensorChunk(mix, offset - int(p["slice_start"]), segment_frames)
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
