"""The worker half of the `separate` kind: run demucs on the segments one job owns.

A job arrives as untrusted params and bytes. `problem` checks them the way the server's
plan made them (every segment inside the audio sent, the grid the model's own) before
`run` (one job) or `run_many` (the jobs a worker holds, their segments pooled) hands them to
compute.run_jobs. The model is loaded once per model name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from src.config import Settings
from src.media.pcm import SAMPLE_BYTES

log = logging.getLogger("worker")

MAX_CHANNELS = 8
MAX_FRAMES = 2**28  # frames of one job's audio or output
MAX_TOTAL_FRAMES = 2**40
MAX_SEGMENTS = 100_000
NUMBERS = {"samplerate", "channels", "total_frames", "slice_start", "frames", "first_offset", "segments", "stride",
           "segment_frames"}
KEYS = NUMBERS | {"model", "segment", "mean", "std"}


def available() -> str | None:
    try:
        import demucs  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        return f"separation needs torch and demucs: {exc}"
    return None


def _grid_problem(p: dict[str, Any], body: bytes) -> str | None:
    """Why these params (already typed) and body cannot be a job of ours; None when they can."""
    if not 1000 <= p["samplerate"] <= 384_000 or not 1 <= p["channels"] <= MAX_CHANNELS:
        return f"audio of {p['channels']} channels at {p['samplerate']} Hz is not taken"
    if not 1 <= p["total_frames"] <= MAX_TOTAL_FRAMES or not 0 <= p["slice_start"] < p["total_frames"]:
        return f"slice_start {p['slice_start']} does not lie in a song of {p['total_frames']} frames"
    if not 1 <= p["frames"] <= min(MAX_FRAMES, p["total_frames"] - p["slice_start"]):
        return f"frames {p['frames']} do not fit the song after slice_start"
    expected = p["channels"] * p["frames"] * SAMPLE_BYTES
    if len(body) != expected:
        return f"body holds {len(body)} bytes, {p['channels']} x {p['frames']} float32 samples are {expected}"
    segment, mean, std = p["segment"], p["mean"], p["std"]
    if segment is not None and not 0 < segment <= 3600:
        return f"segment {segment} is outside (0, 3600] seconds"
    if not 0 < std < 1e6 or abs(mean) > 1e6:
        return f"normalisation mean {mean}, std {std} is not usable"
    if not 1 <= p["segments"] <= MAX_SEGMENTS or not 1 <= p["segment_frames"] <= MAX_FRAMES:
        return "segments or segment_frames out of range"
    if not 1 <= p["stride"] <= p["segment_frames"]:
        return f"stride {p['stride']} is outside [1, segment_frames]"
    first, last = p["first_offset"], p["first_offset"] + (p["segments"] - 1) * p["stride"]
    # every segment starts inside the audio sent, and the output stays inside the song
    end = p["slice_start"] + p["frames"]
    if not p["slice_start"] <= first <= last < min(end, p["total_frames"]):
        return (f"segments {first}..{last} do not lie in the audio sent [{p['slice_start']}, {end}) "
                f"of a song of {p['total_frames']} frames")
    if min(last + p["segment_frames"], p["total_frames"]) - first > MAX_FRAMES:
        return "the job's output would be too long"
    return None


def _typed(p: dict[str, Any]) -> str | None:
    if set(p) != KEYS:
        return f"params have fields {sorted(p)[:20]}, expected {sorted(KEYS)}"
    for name in NUMBERS:
        if type(p[name]) is not int:  # `type`, not isinstance: a bool is no integer here
            return f"{name} is a {type(p[name]).__name__}, not an int"
    for name in ("mean", "std", "segment"):
        value = p[name]
        if (value is None and name == "segment") or (type(value) in (int, float) and np.isfinite(value)):
            continue
        return f"{name} is not a finite number"
    if not isinstance(p["model"], str):
        return "model is not a name"
    return None


class SeparationRunner:
    """Runs separation jobs on one device (DEVICE), in PRECISION, SEGMENT_BATCH segments per model call.

    It offers one route: "" (the kind's plain jobs queue) on a CPU, "cuda" on a GPU, so that all
    the jobs of a task run on one device class (their answers differ by about 40 dB), with a
    version that names the device class and the precision (the results cache keys on it).
    `run_many` takes several jobs at once and pools their segments into the same batches:
    the worker hands it the jobs it holds (WORKER_PREFETCH > 1).
    """

    def __init__(self, settings: Settings):
        import torch

        from src.kinds.separation.compute import configure_precision
        from src.kinds.separation.model import device_class, pick_device

        self.settings = settings
        self.device = pick_device(settings.device)
        self.precision = settings.precision if device_class(self.device) != "cpu" else "fp32"
        configure_precision(self.precision)
        torch.set_num_threads(settings.threads_per_worker)
        self._models: dict[str, Any] = {}
        self._batcher: Any = None

    def model(self, name: str) -> Any:
        """The model `name`, loaded once; ModelUnavailable (kept) if it cannot be loaded."""
        from src.kinds.separation.model import ModelUnavailable, load_model

        if name not in self._models:
            try:
                self._models[name] = load_model(name, self.settings.model_repo, self.device)
            except ModelUnavailable as exc:
                self._models[name] = exc
        model = self._models[name]
        if isinstance(model, ModelUnavailable):
            raise model
        return model

    def batcher(self, model: Any, params: dict[str, Any]) -> Any:
        """The Batcher of this worker: SEGMENT_BATCH, or for `auto` what free device memory allows."""
        from src.kinds.separation.compute import Batcher, auto_batch

        if self._batcher is None:
            wanted = self.settings.segment_batch
            share = 0.5 / self.settings.workers_per_gpu  # workers sharing a GPU each plan with their part
            size = int(wanted) if wanted != "auto" else auto_batch(model, params, self.precision, share)
            log.info("Separation on %s in %s: %d segment(s) per model call (SEGMENT_BATCH=%s)", self.device,
                     self.precision, size, wanted)
            self._batcher = Batcher(size)
        return self._batcher

    def offers(self) -> dict[str, str]:
        """One route, the device class's, with the software version that computes it."""
        from src.kinds.separation.model import device_class, software_version

        route = "" if device_class(self.device) == "cpu" else device_class(self.device)
        return {route: software_version(self.device, self.precision)}

    def problem(self, params: dict[str, Any], body: bytes) -> str | None:
        from src.kinds.separation.model import ModelUnavailable, describe

        problem = _typed(params) or _grid_problem(params, body)
        if problem:
            return problem
        if params["model"] != self.settings.model:
            return f"model {params['model']!r} is not the one this deployment runs ({self.settings.model})"
        try:
            spec = describe(self.model(params["model"]), params["model"], params["segment"])
        except ModelUnavailable as exc:
            return str(exc)
        if (params["segment_frames"], params["stride"]) != (spec.segment_frames, spec.stride):
            return (f"segment grid {params['segment_frames']}/{params['stride']} frames is not the model's "
                    f"{spec.segment_frames}/{spec.stride}")
        if (params["samplerate"], params["channels"]) != (spec.samplerate, spec.channels):
            return (f"audio is {params['channels']} channels at {params['samplerate']} Hz, the model takes "
                    f"{spec.channels} at {spec.samplerate} Hz")
        return None

    def run(self, params: dict[str, Any], body: bytes, should_stop: Callable[[], bool]
            ) -> tuple[dict[str, Any], bytes]:
        (outcome,) = self.run_many([(params, body, should_stop)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def run_many(self, jobs: list[tuple[dict[str, Any], bytes, Callable[[], bool]]]
                 ) -> list[tuple[dict[str, Any], bytes] | BaseException]:
        """Each job's (result params, body), or the exception that ended it (Cancelled when stopped).
        The jobs' segments share the model calls; checked jobs of this deployment's model."""
        from src.kinds.separation.compute import JobInput, run_jobs

        model = self.model(jobs[0][0]["model"])
        inputs = [JobInput(p, np.frombuffer(body, dtype="<f4").reshape(p["channels"], p["frames"]), stop)
                  for p, body, stop in jobs]
        outcomes: list[tuple[dict[str, Any], bytes] | BaseException] = []
        for result in run_jobs(model, inputs, self.batcher(model, jobs[0][0]), self.precision):
            if isinstance(result, BaseException):
                outcomes.append(result)
                continue
            out_start, output = result
            params = {"out_start": out_start, "sources": list(model.sources), "channels": int(output.shape[1]),
                      "frames": int(output.shape[2])}
            outcomes.append((params, np.ascontiguousarray(output, dtype="<f4").tobytes()))
        return outcomes

    def corrupt(self, body: bytes) -> bytes:
        """A result with a NaN in the middle: what a broken GPU or bad memory returns."""
        damaged = bytearray(body)
        middle = (len(damaged) // 8) * 4
        damaged[middle:middle + 4] = np.array([np.nan], dtype="<f4").tobytes()
        return bytes(damaged)

    def tamper(self, params: dict[str, Any], body: bytes) -> bytes:
        """Plausible but wrong: every sample at half its value (finite, the right shape)."""
        return (np.frombuffer(body, dtype="<f4") * np.float32(0.5)).astype("<f4").tobytes()


def worker(settings: Settings) -> SeparationRunner:
    return SeparationRunner(settings)
