"""Masking faces for `faceblur`: temporal smoothing of the detections, and the masks themselves.

`smooth` makes masking stable in time and independent of chunking: frame t is masked with
every box found in frames t-h..t+h (h = window // 2), so a face the detector misses in one
frame is still covered by its neighbours' boxes. A job that owns frames [a, b) detects on
[a-h, b+h) (clipped at the video's ends), smooths, and keeps the middle: the boxes of each
frame then depend only on the video, never on where the chunks were cut.

`anonymize` masks each box scaled about its centre by `mask_scale`, inside the ellipse
inscribed in the scaled box (deface's style; note that deface grows each side by
`mask_scale - 1`, so deface's 1.3 is 1.6 here, and an ellipse covers the corners of the box
it was scaled from only for mask_scale >= sqrt(2)). All arithmetic is integer (numpy, no
OpenCV filter, no floating-point rounding after the box's pixel rectangle is fixed), so
the same frame and boxes give the same bytes on any worker:

- the pixel rectangle of a box is [floor(cx - w*s/2), ceil(cx + w*s/2)) (and the same in y),
  computed once in `rectangle`; the ellipse is the one inscribed in that rectangle;
- `blur`: a box blur (integral image, rounded half up) whose kernel is half the rectangle's
  width and height (deface's blur factor 2), edge pixels replicated at the frame's border;
- `mosaic`: blocks of an eighth of the rectangle's shorter side (at least 2 px), each the
  rounded mean of its pixels, on a grid anchored at the rectangle's corner;
- `solid`: black.

Every box is computed from the input frame (not from an earlier box's output); where masks
overlap, the later box in sorted order wins. Pixels outside every ellipse are copied.
"""

from __future__ import annotations

import math

import numpy as np

from src.kinds.faceblur.detect import Box

MODES = ("blur", "mosaic", "solid")
BLUR_FACTOR = 2  # kernel = rectangle // 2, as deface
MOSAIC_BLOCKS = 8  # blocks across the rectangle's shorter side
MOSAIC_MIN = 2  # px
MAX_SCALE = 10.0  # mask_scale's ceiling
MAX_SIDE = 32768  # px, a scaled box's largest side: the ellipse's integer test stays within int64


def smooth(found: list[list[Box]], window: int) -> list[list[Box]]:
    """For each frame t of `found`, the sorted union of the boxes found in frames t-h..t+h
    (h = window // 2) that lie inside `found`."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 1, got {window!r}")
    half = window // 2
    smoothed = []
    for t in range(len(found)):
        union = {tuple(box) for boxes in found[max(0, t - half):t + half + 1] for box in boxes}
        smoothed.append(sorted(union))
    return smoothed


def rectangle(box: Box, mask_scale: float) -> tuple[int, int, int, int]:
    """The box scaled about its centre by mask_scale, as whole pixels [x1, x2) x [y1, y2),
    not clipped to the frame: the one rounding of box coordinates, used everywhere."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    half_w, half_h = (x2 - x1) * mask_scale / 2.0, (y2 - y1) * mask_scale / 2.0
    left, top = math.floor(cx - half_w), math.floor(cy - half_h)
    right, bottom = max(math.ceil(cx + half_w), left + 1), max(math.ceil(cy + half_h), top + 1)
    return left, top, right, bottom


def _ellipse(left: int, top: int, right: int, bottom: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Pixels of [x0, x1) x [y0, y1) whose centres lie in the ellipse inscribed in the
    rectangle [left, right) x [top, bottom), in exact integer arithmetic."""
    w, h = right - left, bottom - top
    dx = 2 * np.arange(x0, x1, dtype=np.int64) + 1 - (left + right)  # 2 * (x + 0.5 - cx)
    dy = 2 * np.arange(y0, y1, dtype=np.int64) + 1 - (top + bottom)
    return (dx[None, :] * h) ** 2 + (dy[:, None] * w) ** 2 <= (w * h) ** 2


def _window_sums(values: np.ndarray, offset: int, n: int, first: int, stop: int, before: int,
                 after: int) -> np.ndarray:
    """Along axis 0 of an extent of length n, of which `values` holds [offset, offset + len):
    for each i in [first, stop), the sum over i - before .. i + after, indices beyond either
    end replaced by that end (edge replication). `values` must hold every index a window
    reaches inside the extent. Exact integers (int64)."""
    index = np.arange(first, stop)
    low, high = index - before, index + after
    prefix = np.zeros((values.shape[0] + 1, *values.shape[1:]), dtype=np.int64)
    np.cumsum(values, axis=0, dtype=np.int64, out=prefix[1:])
    sums = prefix[np.minimum(high, n - 1) + 1 - offset] - prefix[np.maximum(low, 0) - offset]
    shape = (-1,) + (1,) * (values.ndim - 1)
    if low[0] < 0:  # then offset == 0: the first index is held
        sums += np.maximum(0, -low).reshape(shape) * values[0].astype(np.int64)
    if high[-1] > n - 1:  # then the last index is held
        sums += np.maximum(0, high - (n - 1)).reshape(shape) * values[n - 1 - offset].astype(np.int64)
    return sums


def _box_blur(frame: np.ndarray, x0: int, y0: int, x1: int, y1: int, kw: int, kh: int) -> np.ndarray:
    """The mean of the kw x kh window around each pixel of [x0, x1) x [y0, y1), the frame's
    edge pixels replicated beyond its border, rounded half up: exact integers."""
    height, width = frame.shape[:2]
    left, top = kw // 2, kh // 2
    right, bottom = kw - 1 - left, kh - 1 - top
    ry0, ry1 = max(y0 - top, 0), min(y1 + bottom, height)  # the rows and columns the windows reach
    cx0, cx1 = max(x0 - left, 0), min(x1 + right, width)
    across = _window_sums(frame[ry0:ry1, cx0:cx1].transpose(1, 0, 2), cx0, width, x0, x1, left, right)
    total = _window_sums(across.transpose(1, 0, 2), ry0, height, y0, y1, top, bottom)
    area = kw * kh
    return ((total + area // 2) // area).astype(np.uint8)


def _mosaic(frame: np.ndarray, left: int, top: int, x0: int, y0: int, x1: int, y1: int, block: int) -> np.ndarray:
    """[x0, x1) x [y0, y1) as blocks of block x block px on a grid anchored at (left, top),
    each block the rounded mean of its pixels inside the frame."""
    region = frame[y0:y1, x0:x1].astype(np.int64)
    row_starts = np.unique(np.r_[0, np.arange(block - (y0 - top) % block, y1 - y0, block)])
    col_starts = np.unique(np.r_[0, np.arange(block - (x0 - left) % block, x1 - x0, block)])
    row_starts, col_starts = row_starts[row_starts < y1 - y0], col_starts[col_starts < x1 - x0]
    sums = np.add.reduceat(np.add.reduceat(region, row_starts, axis=0), col_starts, axis=1)
    rows_n = np.diff(np.r_[row_starts, y1 - y0])
    cols_n = np.diff(np.r_[col_starts, x1 - x0])
    counts = (rows_n[:, None] * cols_n[None, :])[..., None]
    means = (sums + counts // 2) // counts
    return np.repeat(np.repeat(means, rows_n, axis=0), cols_n, axis=1).astype(np.uint8)


def anonymize(frame: np.ndarray, boxes: list[Box], mode: str, mask_scale: float) -> np.ndarray:
    """A new frame with every box, scaled about its centre by mask_scale, masked inside its
    ellipse; pixels outside every mask are copied bit-exact."""
    if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3
            and frame.shape[2] == 3):
        raise ValueError("a frame is an HxWx3 uint8 BGR array")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(mask_scale, bool) or not isinstance(mask_scale, int | float) or not 1.0 <= mask_scale <= MAX_SCALE:
        raise ValueError(f"mask_scale must be a number in [1, {MAX_SCALE:g}], got {mask_scale!r}")
    height, width = frame.shape[:2]
    out = frame.copy()
    for box in sorted(tuple(box) for box in boxes):
        if not all(math.isfinite(float(v)) for v in box[:4]):
            raise ValueError(f"a box has a non-finite coordinate: {box!r}")
        left, top, right, bottom = rectangle(box, float(mask_scale))
        if max(right - left, bottom - top) > MAX_SIDE:
            raise ValueError(f"a box scaled by {mask_scale:g} is more than {MAX_SIDE} px wide or high: {box!r}")
        x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
        if x0 >= x1 or y0 >= y1:
            continue
        inside = _ellipse(left, top, right, bottom, x0, y0, x1, y1)
        if mode == "blur":
            kw, kh = max(1, (right - left) // BLUR_FACTOR), max(1, (bottom - top) // BLUR_FACTOR)
            masked = _box_blur(frame, x0, y0, x1, y1, kw, kh)
        elif mode == "mosaic":
            block = max(MOSAIC_MIN, min(right - left, bottom - top) // MOSAIC_BLOCKS)
            masked = _mosaic(frame, left, top, x0, y0, x1, y1, block)
        else:
            masked = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        region = out[y0:y1, x0:x1]
        region[inside] = masked[inside]
    return out
