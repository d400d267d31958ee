"""`python -m bench.gpu`: separation on one device, the worker's way against demucs' own.

Everything runs in this process, without the broker: songs are written as the server's
prepare leaves them (`audio.f32` and its normalisation), cut into jobs by the kind's own
`plan` and `payload`, run by the kind's real `Runner` (`run` one job at a time with
SEGMENT_BATCH=1, or `run_many` with the jobs' segments pooled, as a worker with
WORKER_PREFETCH > 1 holds them) and merged by the kind's merger. The reference is demucs'
`apply_model(split=True, overlap=0.25, shifts=0)` on the whole song, in fp32 with TF32 off.

Cases (times are medians of --repeats runs after one warm-up):
- `whole`: one-process demucs, one song after another;
- `jobs_unbatched`: the project's jobs one after another, one segment per model call;
- `worker_<precision>`: one worker, SEGMENT_BATCH=auto, jobs pooled WORKER_PREFETCH at a time;
- `batch`: seconds per segment for batch sizes 1..32 in fp32 and bf16;
- `layout` (the full profile): the CPU's default workers x threads (`config.cpu_layout`) against one
  process of every core, each worker a process with its own Runner taking jobs from a shared queue.

It runs on any torch device and writes JSON (--out) and a Markdown table (stdout):

    python -m bench.gpu --device cuda              # 6 songs x 180 s, htdemucs' architecture
    python -m bench.gpu --profile smoke --device cpu   # a small model, one 6 s song
    python -m bench.run --only gpu                 # section 10 of docs/BENCHMARKS.md, this host's device
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src import config
from src.config import Settings
from src.kinds import registry
from src.kinds.base import JobView, Media, TaskView
from src.kinds.separation.compute import Batcher, _forward, _Segment, _valid_length, configure_precision
from src.kinds.separation.kind import SeparationKind, audio_path
from src.kinds.separation.merge import merge_results
from src.kinds.separation.model import load_model
from src.kinds.separation.plan import JobPlan
from src.kinds.separation.prepare import normalisation
from tools.random_model import save_random_htdemucs

SAMPLERATE, CHANNELS = 44100, 2
BATCHES = (1, 2, 4, 8, 16, 32)


def precisions(device: str) -> tuple[str, ...]:
    """The precisions worth measuring: a CPU worker always computes in fp32."""
    return ("fp32",) if device == "cpu" else ("fp32", "tf32", "bf16")


def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    noise = float(((reference - estimate) ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(float((reference ** 2).sum()) / noise)


def song(seconds: float, seed: int) -> np.ndarray:
    """A deterministic stand-in for music: chords of partials with noise bursts, (channels, frames)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLERATE)) / SAMPLERATE
    wave = sum(np.sin(2 * np.pi * f * t) * 0.1 for f in rng.uniform(60, 2000, 6))
    noise = rng.standard_normal((CHANNELS, t.size)) * 0.05 * (np.sin(2 * np.pi * 2 * t) > 0.6)
    return (wave + noise).astype(np.float32)


class Song:
    """One song as the server holds it after prepare: its folder, facts, planned jobs and payloads."""

    def __init__(self, kind: SeparationKind, folder: Path, audio: np.ndarray, number: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.audio = audio
        media = Media(number, f"song{number}", folder / "none", 0, audio.shape[1] / SAMPLERATE, None,
                      {"codec": "pcm", "samplerate": SAMPLERATE, "channels": CHANNELS})
        view = TaskView(number, "separate", {"keep": list(kind.spec.sources)}, {}, media, folder)
        audio.T.astype("<f4").tofile(audio_path(view))
        mean, std = normalisation(audio_path(view), CHANNELS)
        facts = {"frames": audio.shape[1], "samplerate": SAMPLERATE, "channels": CHANNELS, "mean": mean, "std": std}
        self.view = TaskView(number, "separate", view.params, facts, media, folder)
        self.plans = [JobPlan(**planned.facts) for planned in kind.plan(self.view)]
        self.jobs = [kind.payload(self.view, JobView(i, plan.chunk, asdict(plan))) for i, plan in enumerate(self.plans)]
        self.mean, self.std = mean, std


def merged(kind: SeparationKind, item: Song, results: list[np.ndarray]) -> np.ndarray:
    by_plan = dict(zip(item.plans, results, strict=True))
    out = np.zeros((len(kind.spec.sources), CHANNELS, item.audio.shape[1]), np.float32)

    def emit(start: int, block: np.ndarray) -> None:
        out[..., start:start + block.shape[-1]] = block

    merge_results(kind.spec, item.plans, item.audio.shape[1], item.mean, item.std, lambda p: by_plan[p], emit)
    return out


def whole_file(model: Any, item: Song, device: str) -> np.ndarray:
    from demucs.apply import apply_model

    mix = ((torch.from_numpy(item.audio) - item.mean) / item.std)[None].to(device)
    with torch.no_grad():
        out = apply_model(model, mix, shifts=0, split=True, overlap=0.25, device=device)[0]
    return (out * item.std + item.mean).cpu().numpy()


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(run: Callable[[], Any], device: str, repeats: int) -> tuple[float, Any]:
    """(median seconds, last result) after one warm-up run."""
    result = run()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        result = run()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def worker_settings(base: dict[str, str], **changes: str) -> Settings:
    return config.load({**base, **changes})


def run_worker(kind: SeparationKind, runner: Any, songs: list[Song], pool: int) -> list[np.ndarray]:
    """One worker's work on every song: jobs pooled `pool` at a time (run_many), then merged."""
    flat = [(index, params, body) for index, item in enumerate(songs) for params, body in item.jobs]
    outputs: list[list[np.ndarray]] = [[] for _ in songs]
    for start in range(0, len(flat), pool):
        group = flat[start:start + pool]
        outcomes = runner.run_many([(params, body, lambda: False) for _, params, body in group])
        for (index, _, _), outcome in zip(group, outcomes, strict=True):
            params, body = outcome
            outputs[index].append(np.frombuffer(body, dtype="<f4").reshape(len(kind.spec.sources), CHANNELS, -1))
    return [merged(kind, item, results) for item, results in zip(songs, outputs, strict=True)]


def batch_sweep(model: Any, item: Song, device: str, repeats: int) -> list[dict]:
    """Seconds per segment of one model call on `batch` segments, fp32 (TF32 off) and bf16."""
    params = item.jobs[0][0]
    member = model.models[0] if hasattr(model, "models") else model
    mix = torch.from_numpy(np.frombuffer(item.jobs[0][1], dtype="<f4").reshape(CHANNELS, -1).copy())[None].to(device)
    from demucs.apply import TensorChunk

    chunk = TensorChunk(mix, 0, int(params["segment_frames"]))
    valid = _valid_length(member, chunk.length, params["segment"])
    rows = []
    for precision in precisions(device):
        configure_precision(precision)
        for batch in BATCHES if device != "cpu" else BATCHES[:4]:
            segments = [_Segment(0, 0, chunk, valid)] * batch
            seconds, _ = timed(lambda s=segments, p=precision: _forward(member, s, p, torch.device(device)), device,
                               repeats)
            rows.append({"precision": precision, "batch": batch, "ms_per_segment": 1000 * seconds / batch})
    configure_precision("fp32")
    return rows


def _layout_worker(base: dict[str, str], threads: int, jobs: Any, results: Any) -> None:
    torch.set_num_threads(threads)
    runner = registry.worker("separate", worker_settings(base, WORKER_THREADS=str(threads), DEVICE="cpu",
                                                         SEGMENT_BATCH="1"))
    while (item := jobs.get()) is not None:
        key, params, body = item
        results.put((key, runner.run(params, body, lambda: False)[1]))


def layout(base: dict[str, str], kind: SeparationKind, songs: list[Song], workers: int, threads: int) -> float:
    """Seconds for `workers` processes of `threads` threads to run every job of `songs` (spawned,
    models loaded and warmed before the clock starts)."""
    context = multiprocessing.get_context("spawn")
    jobs, results = context.Queue(), context.Queue()
    processes = [context.Process(target=_layout_worker, args=(base, threads, jobs, results)) for _ in range(workers)]
    for process in processes:
        process.start()
    warm = songs[0].jobs[0]
    for n in range(workers):  # one warm-up job each, so that start-up is not timed
        jobs.put((("warm", n), *warm))
    for _ in range(workers):
        results.get()
    started = time.perf_counter()
    count = 0
    for index, item in enumerate(songs):
        for chunk, (params, body) in enumerate(item.jobs):
            jobs.put(((index, chunk), params, body))
            count += 1
    for _ in range(count):
        results.get()
    seconds = time.perf_counter() - started
    for _ in processes:
        jobs.put(None)
    for process in processes:
        process.join()
    return seconds


@dataclass(frozen=True)
class Profile:
    name: str
    device: str
    songs: int
    seconds: float
    repeats: int
    prefetch: int  # jobs a worker pools (WORKER_PREFETCH)
    small: bool  # the small test model instead of htdemucs' architecture
    layout: bool  # also the CPU layout case (2 songs)


def profile(name: str, device: str = "auto") -> Profile:
    """`make bench`'s section 10 on this host's device: tiny in the smoke profile (the test suite)."""
    if name == "smoke":
        return Profile("smoke", device, songs=1, seconds=6, repeats=1, prefetch=4, small=True, layout=False)
    if name == "quick":
        return Profile("quick", device, songs=2, seconds=30, repeats=2, prefetch=4, small=False, layout=False)
    return Profile("full", device, songs=6, seconds=180, repeats=3, prefetch=4, small=False, layout=True)


def run(p: Profile, workdir: Path) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device
    folder = workdir / "gpu"
    name = "htdemucs_small" if p.small else "htdemucs_random"
    save_random_htdemucs(folder / "models", name, small=p.small)
    base = {"CONFIG_FILE": str(folder / "none.yaml"), "MODEL": name, "MODEL_REPO": str(folder / "models"),
            "STORAGE_DIR": str(folder / "storage"), "DEVICE": device, "CHUNK_SECONDS": "30",
            "WORKERS_HEALTHY": "1", "WORKER_THREADS": str(os.cpu_count() or 1)}
    kind = SeparationKind(worker_settings(base))
    songs = [Song(kind, folder / f"song{n}", song(p.seconds, n), n) for n in range(p.songs)]
    report: dict[str, Any] = {"profile": asdict(p), "device": torch.cuda.get_device_name() if device != "cpu"
                              else "cpu", "torch": torch.__version__, "model": name, "songs": p.songs,
                              "seconds": p.seconds, "jobs_per_song": len(songs[0].jobs), "prefetch": p.prefetch,
                              "cores": os.cpu_count()}
    configure_precision("fp32")
    model = load_model(name, str(folder / "models"), device)
    one, references = timed(lambda: [whole_file(model, songs[0], device)], device, p.repeats)
    every, references = timed(lambda: [whole_file(model, item, device) for item in songs], device, p.repeats)
    report["whole"] = {"one_song_s": one, "all_songs_s": every}
    if device != "cpu":  # TF32 is a GPU's: on a CPU torch's default is the fp32 above
        torch.backends.cudnn.allow_tf32 = True  # what a plain `demucs` command runs with on a GPU
        report["whole"]["all_songs_torch_default_s"] = timed(
            lambda: [whole_file(model, item, device) for item in songs], device, p.repeats)[0]

    unbatched = registry.worker("separate", worker_settings(base, SEGMENT_BATCH="1", PRECISION="fp32"))
    t, outs = timed(lambda: run_worker(kind, unbatched, songs[:1], 1), device, p.repeats)
    report["jobs_unbatched"] = {"one_song_s": t, "sdr_db": sdr(references[0], outs[0])}
    for precision in precisions(device):
        runner = registry.worker("separate", worker_settings(base, SEGMENT_BATCH="auto", PRECISION=precision))
        t1, one_out = timed(lambda r=runner: run_worker(kind, r, songs[:1], p.prefetch), device, p.repeats)
        t, outs = timed(lambda r=runner: run_worker(kind, r, songs, p.prefetch), device, p.repeats)
        report[f"worker_{precision}"] = {
            "batch": runner._batcher.size if isinstance(runner._batcher, Batcher) else None,
            "one_song_s": t1, "all_songs_s": t, "one_song_sdr_db": sdr(references[0], one_out[0]),
            "sdr_db_min": min(sdr(r, o) for r, o in zip(references, outs, strict=True))}
    configure_precision("fp32")
    report["batch"] = batch_sweep(model, songs[0], device, p.repeats)
    if device != "cpu":
        report["gpu_memory_total_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    if p.layout:
        cores = os.cpu_count() or 1
        pair = [Song(kind, folder / f"layout{n}", song(p.seconds / 3, 100 + n), 100 + n) for n in range(2)]
        workers, threads = config.cpu_layout(cores)
        cpu_base = {**base, "DEVICE": "cpu"}
        report["layout"] = {"cores": cores, "song_seconds": p.seconds / 3,
                            "one_process_s": layout(cpu_base, kind, pair, 1, cores),
                            "default": f"{workers}x{threads}",
                            "default_s": layout(cpu_base, kind, pair, workers, threads)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full", choices=("smoke", "quick", "full"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("gpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        report = run(profile(args.profile, args.device), Path(scratch))
    args.out.write_text(json.dumps(report, indent=1))
    print(table(report))


def table(r: dict[str, Any]) -> str:
    whole, wr = r["whole"]["all_songs_s"], r["whole"]
    unbatched = r["jobs_unbatched"]
    lines = [f"Device: {r['device']}, torch {r['torch']}, model {r['model']}, {r['songs']} songs x "
             f"{r['seconds']:.0f} s ({r['jobs_per_song']} jobs each), WORKER_PREFETCH {r['prefetch']}", "",
             "| case | one song | all songs | against whole-file fp32 | SDR vs whole-file fp32 |",
             "|---|---|---|---|---|",
             f"| whole-file demucs, fp32 (TF32 off) | {wr['one_song_s']:.2f} s | {whole:.2f} s | 1.00x | reference |"]
    if "all_songs_torch_default_s" in wr:
        default = wr["all_songs_torch_default_s"]
        lines.append(f"| whole-file demucs, torch's default (TF32) | | {default:.2f} s | {default / whole:.2f}x | |")
    lines += [f"| the project's jobs, one segment per call | {unbatched['one_song_s']:.2f} s | | "
             f"{unbatched['one_song_s'] / wr['one_song_s']:.2f}x (one song) | {unbatched['sdr_db']:.1f} dB |"]
    for precision in ("fp32", "tf32", "bf16"):
        if f"worker_{precision}" not in r:
            continue
        w = r[f"worker_{precision}"]
        lines.append(f"| one worker, {precision}, batch {w['batch']} | {w['one_song_s']:.2f} s | "
                     f"{w['all_songs_s']:.2f} s | {w['all_songs_s'] / whole:.2f}x ({whole / w['all_songs_s']:.2f}x "
                     f"faster) | {w['sdr_db_min']:.1f} dB |")
    by = {(row["precision"], row["batch"]): row["ms_per_segment"] for row in r["batch"]}
    measured = sorted({row["precision"] for row in r["batch"]}, key=("fp32", "tf32", "bf16").index)
    lines += ["", "| batch | " + " | ".join(f"{p} ms/segment" for p in measured) + " |",
              "|---|" + "---|" * len(measured)]
    for batch in sorted({row["batch"] for row in r["batch"]}):
        lines.append(f"| {batch} | " + " | ".join(f"{by[(p, batch)]:.1f}" for p in measured) + " |")
    if "layout" in r:
        lay = r["layout"]
        lines += ["", f"CPU layout on {lay['cores']} cores, 2 songs: one process of {lay['cores']} threads "
                      f"{lay['one_process_s']:.2f} s, default {lay['default']} {lay['default_s']:.2f} s "
                      f"({lay['default_s'] / lay['one_process_s']:.2f}x)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
