"""Loading a demucs model, and the few facts about it that planning needs.

The worker keeps the whole model. The server needs only `ModelSpec` (sources, sample
rate, segment grid, how much audio a segment reads), so it loads the model once and
moves it to the `meta` device, which drops the weights and keeps the architecture's
arithmetic (`valid_length`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from demucs.apply import BagOfModels
from demucs.htdemucs import HTDemucs
from demucs.pretrained import get_model


class ModelUnavailable(RuntimeError):
    """The configured model cannot be loaded; the message says why."""


def pick_device(wanted: str) -> str:
    """DEVICE as one torch device name: `auto` is a GPU when torch sees one, else the CPU; of a
    list (`cuda:0,cuda:1`, which the supervisor spreads over its workers) the first."""
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted.split(",")[0]


def load_model(name: str, repo: str = "", device: str = "cpu") -> Any:
    """The demucs model (or bag of models) named `name`, from `repo` when given, on `device`."""
    # Test models (demucs_unittest) are built with random weights: seed them so that every
    # worker process builds the same model and chunks from different workers agree.
    torch.manual_seed(0)
    try:
        model = get_model(name, repo=Path(repo) if repo else None)
    except SystemExit as exc:  # demucs calls fatal() -> sys.exit for unknown names
        raise ModelUnavailable(f"model {name!r} cannot be loaded: {exc}") from None
    except Exception as exc:  # network, unpickling, missing file: all mean the same to a user
        where = f" from {repo}" if repo else ""
        raise ModelUnavailable(f"model {name!r} cannot be loaded{where}: {type(exc).__name__}: {exc}") from None
    model.eval()
    try:
        return model.to(device)
    except (RuntimeError, AssertionError) as exc:  # DEVICE=cuda on a host whose torch sees no GPU
        raise ModelUnavailable(f"model {name!r} cannot be moved to {device}: {exc}") from None


def sub_models(model: Any) -> list[Any]:
    return list(model.models) if isinstance(model, BagOfModels) else [model]


def bag_weights(model: Any) -> list[list[float]] | None:
    """Per-model, per-source weights of a bag; None for a single model."""
    return [list(w) for w in model.weights] if isinstance(model, BagOfModels) else None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    sources: tuple[str, ...]
    samplerate: int
    channels: int
    segment_override: float | None  # passed on to apply_model as `segment`
    segment_frames: int
    stride: int
    bag_totals: tuple[float, ...] | None
    _models: tuple[Any, ...]

    def input_window(self, offset: int, total_frames: int) -> tuple[int, int]:
        """The frames [start, end) of the song that the segment at `offset` reads.

        Mirrors apply_model's inner call: the chunk is padded to the model's valid
        length with neighbouring audio, split evenly left and right.
        """
        chunk = min(self.segment_frames, total_frames - offset)
        start, end = offset, offset + chunk
        for model in self._models:
            if isinstance(model, HTDemucs) and self.segment_override is not None:
                valid = int(self.segment_override * model.samplerate)
            elif hasattr(model, "valid_length"):
                valid = model.valid_length(chunk)
            else:
                valid = chunk
            left = offset - (valid - chunk) // 2
            start, end = min(start, left), max(end, left + valid)
        return max(0, start), min(total_frames, end)


def describe(model: Any, name: str, segment_override: float | None) -> ModelSpec:
    """The planning facts of `model`; refuses bags whose members disagree on the grid."""
    members = sub_models(model)
    segments = {Fraction(segment_override) if segment_override else Fraction(m.segment) for m in members}
    if len(segments) != 1:
        raise ModelUnavailable(f"model {name!r} mixes segment lengths {sorted(segments)}; set MODEL_SEGMENT")
    segment = segment_override if segment_override else members[0].segment
    for member in members:
        if isinstance(member, HTDemucs) and segment_override and segment_override > float(member.segment):
            raise ModelUnavailable(
                f"MODEL_SEGMENT={segment_override} is longer than {name}'s training segment "
                f"({float(member.segment):.2f}s)"
            )
    samplerate = int(model.samplerate)
    segment_frames = int(samplerate * segment)
    weights = bag_weights(model)
    totals = tuple(float(sum(w[k] for w in weights)) for k in range(len(model.sources))) if weights else None
    return ModelSpec(
        name=name,
        sources=tuple(model.sources),
        samplerate=samplerate,
        channels=int(model.audio_channels),
        segment_override=segment_override,
        segment_frames=segment_frames,
        stride=int((1 - 0.25) * segment_frames),
        bag_totals=totals,
        _models=tuple(members),
    )


def load_spec(name: str, repo: str, segment_override: float | None) -> ModelSpec:
    """The spec of a model whose weights are dropped right after loading."""
    model = load_model(name, repo)
    model.to(torch.device("meta"))
    return describe(model, name, segment_override)


def device_class(device: str) -> str:
    """`cpu` or `cuda`: which arithmetic a device does. Whole-file demucs on an H200 and on a CPU
    agree only to about 40 dB, so a task's jobs run on one class and the cache names it."""
    return torch.device(device).type


def software_version(device: str = "cpu", precision: str = "fp32") -> str:
    """What names the numbers a job returns, besides its params (which name the model): the
    software, the device class and the precision (a CPU always computes in fp32)."""
    import demucs

    kind = device_class(device)
    return f"demucs {demucs.__version__} torch {torch.__version__} {kind} {precision if kind != 'cpu' else 'fp32'}"
