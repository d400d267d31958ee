"""The merger: stored job results → whole stems, streamed, never the whole song in memory.

Jobs are visited in song order. Each job's output is added to the tail the previous
job left over the quarter segment they share; the frames no later job touches are then
final: divided by the grid's weight sum (and a bag's weight totals), de-normalised
(`* std + mean`, as demucs.api does) and handed to `emit`. At most two jobs' results
are in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from src.kinds.separation.model import ModelSpec
from src.kinds.separation.plan import JobPlan, weight_sum


def merge_results(
    spec: ModelSpec,
    plans: Sequence[JobPlan],
    total_frames: int,
    mean: float,
    std: float,
    load_result: Callable[[JobPlan], np.ndarray],
    emit: Callable[[int, np.ndarray], None],
) -> None:
    """Call `emit(start, block)` with consecutive (sources, channels, n) blocks of the song."""
    ordered = sorted(plans, key=lambda plan: plan.out_start)
    mean32, std32 = np.float32(mean), np.float32(std)
    carry: np.ndarray | None = None
    for index, plan in enumerate(ordered):
        result = np.array(load_result(plan), dtype=np.float32)
        expected = plan.out_end - plan.out_start
        if result.shape[-1] != expected:
            raise ValueError(f"result of chunk {plan.chunk} has {result.shape[-1]} frames, expected {expected}")
        if carry is not None:
            result[..., : carry.shape[-1]] = carry + result[..., : carry.shape[-1]]
        final_end = ordered[index + 1].out_start if index + 1 < len(ordered) else total_frames
        settled = final_end - plan.out_start
        block = result[..., :settled] / weight_sum(spec, total_frames, plan.out_start, final_end)
        if spec.bag_totals is not None:
            block /= np.array(spec.bag_totals, dtype=np.float32)[:, None, None]
        emit(plan.out_start, block * std32 + mean32)
        carry = result[..., settled:] if settled < expected else None
