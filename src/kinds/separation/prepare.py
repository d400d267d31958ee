"""What the server does to a song before planning: decode it and measure it.

The upload is decoded by ffmpeg into a float32 file at the model's sample rate and
channels (src.media.pcm), and its normalisation (mean and deviation of the mono sum, as
demucs.api computes them) is measured block by block; both travel in every job.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from src.media.pcm import iter_blocks


def normalisation(path: Path, channels: int) -> tuple[float, float]:
    """Mean and standard deviation (+1e-8) of the mono sum, as demucs.api normalises a song."""
    count, total = 0, 0.0
    for block in iter_blocks(path, channels):
        mono = block.mean(axis=1, dtype=np.float64)
        count, total = count + mono.size, total + mono.sum()
    mean = total / count
    squares = 0.0
    for block in iter_blocks(path, channels):
        squares += float(((block.mean(axis=1, dtype=np.float64) - mean) ** 2).sum())
    std = (squares / max(1, count - 1)) ** 0.5
    return float(np.float32(mean)), float(np.float32(np.float32(std) + np.float32(1e-8)))
