"""The server half of the `separate` kind: karaoke stems from a song.

prepare: decode to float32 and measure the normalisation (prepare.py). plan: cut the
grid into jobs (plan.py). payload: a job's params and the audio its segments read.
check: the result has exactly the shape the job implies, finite samples of a sane size.
merge: the exact merge into one float32 file per stem, and the mix of the stems in
`keep` (merge.py). output: a stem or the mix as 16-bit WAV, rendered on first request.
The karaoke API (`/music`) is this kind's façade; its renderings (MP3, key shifts, the
practice mixes) live with it in the server.
"""

from __future__ import annotations

import wave
from contextlib import ExitStack
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from src.config import Settings
from src.kinds.base import BadParams, JobView, Media, NotApplicable, Output, Param, Planned, TaskView
from src.kinds.separation import MIX
from src.kinds.separation.merge import merge_results
from src.kinds.separation.model import ModelSpec, load_spec, software_version
from src.kinds.separation.plan import MAX_RESULT_BYTES, JobPlan, job_params, plan_jobs
from src.kinds.separation.prepare import normalisation
from src.media import pcm
from src.media.atomic import atomic

MAX_SAMPLE = 1e6  # |sample| of a result; demucs' outputs of normalised audio are a few units
RESULT_KEYS = {"out_start", "sources", "channels", "frames"}


def audio_path(task: TaskView) -> Path:
    """The decoded song: float32, interleaved, model sample rate and channels."""
    return task.folder / "audio.f32"


def stem_path(task: TaskView, name: str) -> Path:
    """A stem (or the mix) as float32 interleaved frames."""
    return task.folder / "stems" / f"{name}.f32"


class SeparationKind:
    name = "separate"
    max_result_bytes = MAX_RESULT_BYTES

    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def spec(self) -> ModelSpec:
        s = self.settings
        return load_spec(s.model, s.model_repo, s.model_segment or None)

    def describe(self) -> dict[str, Any]:
        keep = Param("keep", "list", list(self.spec.sources), self.spec.sources,
                     description="the sources mixed into `mix`")
        return {"name": self.name, "description": f"karaoke: split a song into stems with demucs {self.spec.name}",
                "media": "audio", "params": [keep.as_json()], "outputs": [*self.spec.sources, MIX]}

    def accepts(self, media: Media) -> None:
        if media.audio is None:
            raise NotApplicable("stem separation needs a file with an audio stream")

    def parameters(self, raw: dict[str, Any], media: Media) -> dict[str, Any]:
        unknown = set(raw) - {"keep"}
        if unknown:
            raise BadParams(f"unknown parameter {sorted(unknown)[0]!r}; separate takes 'keep'")
        keep = raw.get("keep", list(self.spec.sources))
        if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
            raise BadParams("keep must be a list of source names")
        foreign = [k for k in keep if k not in self.spec.sources]
        if foreign or len(set(keep)) != len(keep):
            raise BadParams(f"keep names each source at most once, from {', '.join(self.spec.sources)}")
        return {"keep": [s for s in self.spec.sources if s in keep]}

    def output_names(self, params: dict[str, Any], facts: dict[str, Any]) -> list[str]:
        return [*self.spec.sources, MIX]

    def route(self, params: dict[str, Any]) -> tuple[str, ...]:
        return ("cuda", "")  # a GPU when a live worker has one, else the CPU workers' queue

    def version(self, params: dict[str, Any]) -> str:
        return software_version()

    def merged_files(self, task: TaskView) -> list[Path]:
        return [stem_path(task, name) for name in (*self.spec.sources, MIX)]

    # -- before the jobs ---------------------------------------------------------------

    def prepare(self, task: TaskView) -> dict[str, Any]:
        spec = self.spec
        with atomic(audio_path(task)) as decoded:
            frames = pcm.decode(task.media.path, decoded, spec.samplerate, spec.channels,
                                self.settings.max_duration_s)
            mean, std = normalisation(decoded, spec.channels)
        return {"frames": frames, "samplerate": spec.samplerate, "channels": spec.channels, "mean": mean, "std": std}

    def plan(self, task: TaskView) -> list[Planned]:
        f = task.facts
        return [Planned(asdict(p), (p.slice_end - p.slice_start) * f["channels"] * pcm.SAMPLE_BYTES,
                        (p.slice_end - p.slice_start) / f["samplerate"])
                for p in plan_jobs(self.spec, f["frames"], self.settings.chunk_seconds, task.workers)]

    def payload(self, task: TaskView, job: JobView) -> tuple[dict[str, Any], bytes]:
        f, p = task.facts, JobPlan(**job.facts)
        params = job_params(self.spec, p, f["frames"], f["mean"], f["std"])
        audio = pcm.read_frames(audio_path(task), f["channels"], p.slice_start, params["frames"])
        return params, np.ascontiguousarray(audio, dtype="<f4").tobytes()

    # -- results -----------------------------------------------------------------------

    def check(self, task: TaskView, job: JobView, params: dict[str, Any], body: bytes) -> str | None:
        p = JobPlan(**job.facts)
        expected = {"out_start": p.out_start, "sources": list(self.spec.sources),
                    "channels": task.facts["channels"], "frames": p.out_end - p.out_start}
        if set(params) != RESULT_KEYS:
            return f"result params {sorted(params)[:8]} are not {sorted(RESULT_KEYS)}"
        if params != expected:
            return (f"result covers {params['sources']} x {params['channels']} x {params['frames']} from frame "
                    f"{params['out_start']}; Job[{job.id}] implies {expected['sources']} x {expected['channels']} x "
                    f"{expected['frames']} from frame {expected['out_start']}")
        samples = len(self.spec.sources) * expected["channels"] * expected["frames"]
        if len(body) != samples * pcm.SAMPLE_BYTES:
            return f"result holds {len(body)} bytes, its shape needs {samples * pcm.SAMPLE_BYTES}"
        audio = np.frombuffer(body, dtype="<f4")
        if not np.isfinite(audio).all():
            return "result holds NaN or infinite samples"
        if audio.size and float(np.abs(audio).max()) > MAX_SAMPLE:
            return f"result holds samples beyond ±{MAX_SAMPLE:g}"
        return None

    def keep(self, task: TaskView, job: JobView, params: dict[str, Any], body: bytes) -> None:
        with atomic(task.result_path(job.id, "f32")) as temporary:
            temporary.write_bytes(body)

    def merge(self, task: TaskView, jobs: list[JobView]) -> dict[str, Any]:
        """Every stem, and the mix of the sources in `keep`, from the stored results."""
        f, spec = task.facts, self.spec
        plans = {JobPlan(**job.facts): job for job in jobs}
        chosen = set(task.params["keep"])
        shape = (len(spec.sources), f["channels"])

        def load(plan: JobPlan) -> np.ndarray:
            raw = np.fromfile(task.result_path(plans[plan].id, "f32"), dtype="<f4")
            return raw.reshape(*shape, -1)

        with ExitStack() as stack:
            outs = {}
            for name in (*spec.sources, MIX):
                temporary = stack.enter_context(atomic(stem_path(task, name)))
                outs[name] = stack.enter_context(temporary.open("wb"))

            def emit(start: int, block: np.ndarray) -> None:
                mix = np.zeros(block.shape[1:], dtype=np.float32)
                for index, source in enumerate(spec.sources):
                    block[index].T.astype("<f4").tofile(outs[source])
                    if source in chosen:
                        mix += block[index]
                mix.T.astype("<f4").tofile(outs[MIX])

            merge_results(spec, list(plans), f["frames"], f["mean"], f["std"], load, emit)
            for handle in outs.values():
                handle.close()  # before the renames, as the ExitStack unwinds
        for stale in (task.folder / "outputs").glob("*.wav"):
            stale.unlink(missing_ok=True)
        return {"mixed": sorted(chosen, key=spec.sources.index)}

    def output(self, task: TaskView, name: str) -> Output:
        """A stem or the mix as 16-bit WAV (the contract's lossless download), made once."""
        target = task.output_path(name, "wav")
        if not target.exists():
            with atomic(target) as temporary, wave.open(str(temporary), "wb") as out:
                out.setnchannels(task.facts["channels"])
                out.setsampwidth(2)
                out.setframerate(task.facts["samplerate"])
                for block in pcm.iter_blocks(stem_path(task, name), task.facts["channels"]):
                    out.writeframes(pcm.to_pcm16(block))
        return Output(name, target, "audio/wav")


def server(settings: Settings) -> SeparationKind:
    return SeparationKind(settings)
