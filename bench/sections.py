"""The benchmark sections: speed, where time goes, fidelity, memory, load.

Each function runs real processes or the real model and returns plain data for the
report. Figures are medians over `runs`, with min and max.
"""

from __future__ import annotations

import io
import itertools
import statistics
import threading
import time
import wave
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from demucs.apply import apply_model

from bench.harness import Deployment, cpu_seconds, get_json, http, make_song, peak_rss
from src import config
from src.kinds.separation.compute import run_job
from src.kinds.separation.merge import merge_results
from src.kinds.separation.model import describe, load_model, load_spec
from src.kinds.separation.plan import job_params, plan_jobs
from src.media import pcm as decoding


@dataclass(frozen=True)
class Profile:
    name: str
    model: str  # the realistic model: htdemucs' architecture, random weights
    model_repo: str
    speed_seconds: float
    runs: int
    fidelity_seconds: float
    memory_minutes: tuple[float, ...]
    load_seconds: float
    load_clients: int
    load_song_seconds: float
    total_threads: int = 2


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    reference, estimate = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
    return float(10 * np.log10((reference ** 2).sum() / max(((reference - estimate) ** 2).sum(), 1e-30)))


def decoded(song: Path, workdir: Path) -> np.ndarray:
    target = workdir / (song.stem + ".f32")
    frames = decoding.decode(song, target, 44100, 2, config.DEFAULTS["MAX_DURATION_S"])
    wav = decoding.read_frames(target, 2, 0, frames).copy()
    target.unlink()
    return wav


def whole_file(model, wav: np.ndarray) -> np.ndarray:
    """Plain single-process demucs on the whole song, normalised as demucs.api does."""
    mix = torch.from_numpy(wav)
    ref = mix.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    return (apply_model(model, ((mix - mean) / std)[None], shifts=0, split=True, overlap=0.25)[0] * std + mean).numpy()


def quantised(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32767), -32768, 32767) / 32767


# -- 1 and 2: speed, and where the time goes ------------------------------------------------

def speed(profile: Profile, workdir: Path) -> dict:
    song = make_song(workdir / f"speed-{profile.speed_seconds:.0f}s.wav", profile.speed_seconds)
    wav = decoded(song, workdir)
    model = load_model(profile.model, profile.model_repo)
    torch.set_num_threads(profile.total_threads)
    plain_times = []
    for _ in range(profile.runs):
        started = time.perf_counter()
        plain = whole_file(model, wav)
        plain_times.append(time.perf_counter() - started)
    del model

    env = {"MODEL": profile.model, "MODEL_REPO": profile.model_repo}
    configs = [
        (f"1 worker x {profile.total_threads} threads", [{"WORKER_THREADS": str(profile.total_threads)}]),
        (f"{profile.total_threads} workers x 1 thread", [{"WORKER_THREADS": "1"}] * profile.total_threads),
    ]
    results = {"song_seconds": profile.speed_seconds, "plain": spread(plain_times), "configs": []}
    spec = load_spec(profile.model, profile.model_repo, None)
    plans = plan_jobs(spec, wav.shape[1], 30.0)
    broker_bytes = sum((p.slice_end - p.slice_start) * 2 * 4 * 4 / 3 for p in plans) + sum(
        (p.out_end - p.out_start) * len(spec.sources) * 2 * 4 * 4 / 3 for p in plans)
    for label, workers in configs:
        walls, first_job, tail, server_cpu, worker_cpu, upload_cpu = [], [], [], [], [], []
        with Deployment(workdir, env, workers) as deployment:
            for _ in range(profile.runs):
                before = cpu_seconds(deployment.server.pid)
                music = deployment.upload(song)
                upload_cpu.append(cpu_seconds(deployment.server.pid) - before)
                server0 = cpu_seconds(deployment.server.pid)
                workers0 = sum(cpu_seconds(w.pid) for w in deployment.workers)
                posted = deployment.process(music)
                # The server stamps the moment the mix is ready, so a slow poll loses no accuracy,
                # and the poll itself takes no CPU from the deployment it measures.
                status = deployment.wait_done(music["music_id"], poll=0.5)
                walls.append(status["finished_at"] - posted)
                server_cpu.append(cpu_seconds(deployment.server.pid) - server0)
                worker_cpu.append(sum(cpu_seconds(w.pid) for w in deployment.workers) - workers0)
                timeline = deployment.timeline(music["music_id"])
                jobs = deployment.jobs(music["music_id"])
                first_job.append(min(a["started_at"] for a in timeline) - posted)
                tail.append(status["finished_at"] - max(j["done_at"] for j in jobs))
            before = cpu_seconds(deployment.server.pid)
            _, mp3 = http("GET", f"{deployment.base}/music/{music['music_id']}/final")
            encode_cpu = cpu_seconds(deployment.server.pid) - before
            served = {i["name"]: http("GET", i["track"] + "?format=wav")[1]
                      for i in get_json(f"{deployment.base}/music/{music['music_id']}")["instruments"]}
            server_rss = peak_rss(deployment.server.pid)
            worker_rss = max(peak_rss(w.pid) for w in deployment.workers)
        served_sdr = {}
        for index, name in enumerate(spec.sources):
            with wave.open(io.BytesIO(served[name])) as stem:  # a tagged WAV: its header is not 44 bytes
                pcm = np.frombuffer(stem.readframes(stem.getnframes()), dtype="<i2").reshape(-1, 2).T / 32767
            served_sdr[name] = sdr(quantised(plain[index]), pcm)
        results["configs"].append({
            "label": label, "wall": spread(walls), "ratio": statistics.median(walls) / statistics.median(plain_times),
            "first_job_running": spread(first_job), "last_result_to_mix": spread(tail),
            "server_cpu_processing": spread(server_cpu), "server_cpu_upload": spread(upload_cpu),
            "server_cpu_mp3_mix": encode_cpu, "worker_cpu": spread(worker_cpu),
            "server_peak_rss": server_rss, "worker_peak_rss": worker_rss, "served_vs_plain_sdr": served_sdr,
            "jobs": len(plans),
        })
    results["broker_bytes_per_audio_second"] = broker_bytes / profile.speed_seconds
    results["projection"] = projection(results)
    return results


def projection(results: dict) -> dict:
    """Amdahl: serial server time s, parallel worker time w; speed-up (s + w) / (s + w / N)."""
    config = results["configs"][-1]  # workers with one thread each, the unit of a host's share
    serial = config["first_job_running"]["median"] + config["last_result_to_mix"]["median"]
    parallel = config["worker_cpu"]["median"]
    speedup = {n: (serial + parallel) / (serial + parallel / n) for n in (1, 2, 4, 16, 64)}
    largest = int((serial + 0.1 * parallel) / (0.9 * serial)) if serial > 0 else None
    return {"serial_seconds": serial, "parallel_seconds": parallel, "speedup": speedup,
            "largest_n_at_90_percent": largest}


# -- 3: fidelity ----------------------------------------------------------------------------------

def fidelity(profile: Profile, workdir: Path) -> dict:
    song = make_song(workdir / f"fidelity-{profile.fidelity_seconds:.0f}s.wav", profile.fidelity_seconds)
    wav = decoded(song, workdir)
    torch.set_num_threads(profile.total_threads)
    model = load_model(profile.model, profile.model_repo)
    spec = describe(model, profile.model, None)
    whole = whole_file(model, wav)

    frames = wav.shape[1]
    ref = torch.from_numpy(wav).mean(0)
    mean, std = float(ref.mean()), float(ref.std() + 1e-8)
    plans = plan_jobs(spec, frames, 30.0)
    results = {}
    for plan in plans:
        params = job_params(spec, plan, frames, mean, std)
        results[plan.chunk] = run_job(model, params, wav[:, plan.slice_start:plan.slice_end])[1]
    ours = np.zeros_like(whole)

    def emit(start: int, block: np.ndarray) -> None:
        ours[..., start:start + block.shape[-1]] = block

    merge_results(spec, plans, frames, mean, std, lambda p: results[p.chunk], emit)
    # The naive queue cuts the song where our jobs' outputs begin and separates each piece alone.
    cuts = [plan.first_offset for plan in plans] + [frames]
    naive = np.concatenate([whole_file(model, wav[:, a:b].copy()) for a, b in itertools.pairwise(cuts)], axis=-1)
    return {
        "seconds": profile.fidelity_seconds,
        "jobs": len(plans),
        "distributed": {name: sdr(whole[k], ours[k]) for k, name in enumerate(spec.sources)},
        "naive": {name: sdr(whole[k], naive[k]) for k, name in enumerate(spec.sources)},
    }


# -- 4: memory ------------------------------------------------------------------------------------

def memory(profile: Profile, workdir: Path) -> dict:
    """Peak RSS per song length. The model is demucs_unittest: the server's work does not
    depend on the model's cost, and a worker's memory is per job, whatever the song.

    A short song's jobs are shorter than CHUNK_SECONDS (the planner shrinks jobs towards
    the end of a song), so the server's growth per second of audio is measured between the
    two longest songs, whose largest jobs are the same size."""
    env = {"MODEL": "demucs_unittest", "MODEL_SEGMENT": "10", "CHUNK_SECONDS": "30"}
    spec = load_spec(env["MODEL"], None, float(env["MODEL_SEGMENT"]))
    rows = []
    for minutes in profile.memory_minutes:
        song = make_song(workdir / f"memory-{minutes:g}min.mp3", minutes * 60)
        plans = plan_jobs(spec, int(minutes * 60 * spec.samplerate), float(env["CHUNK_SECONDS"]))
        with Deployment(workdir, env, [{"WORKER_THREADS": "1"}] * 2) as deployment:
            music = deployment.upload(song)
            deployment.process(music, ["drums", "vocals"])
            deployment.wait_done(music["music_id"], poll=0.5)
            http("GET", f"{deployment.base}/music/{music['music_id']}/final?format=wav")
            rows.append({"minutes": minutes, "jobs": len(plans),
                         "largest_job_seconds": max(p.slice_end - p.slice_start for p in plans) / spec.samplerate,
                         "server_peak_rss": peak_rss(deployment.server.pid),
                         "worker_peak_rss": max(peak_rss(w.pid) for w in deployment.workers)})
    first, last = rows[-2], rows[-1]
    growth = (last["server_peak_rss"] - first["server_peak_rss"]) / ((last["minutes"] - first["minutes"]) * 60)
    return {"rows": rows, "server_bytes_per_audio_second": growth,
            "growth_between_minutes": [first["minutes"], last["minutes"]]}


# -- 5: load --------------------------------------------------------------------------------------

LOAD_UTILISATION = 0.9


def load(profile: Profile, workdir: Path, speed_results: dict) -> dict:
    """K clients each upload a short song at a fixed pace, as the load client of the system
    this grew from did (it sent an upload every 5 seconds), for a fixed time; then every
    song is waited for. One of the two workers runs at half speed.

    The pace is set from the speed section's worker CPU per second of audio: songs arrive
    at LOAD_UTILISATION of what the two workers can do together (1 + 1/2 of a worker) when
    each takes a job only when free. A broker that pushes jobs round-robin hands the slow
    worker half the work, which it cannot keep up with at this pace. The realistic model
    runs one segment per job: balancing is about compute, which the tiny test model would
    leave lost in the fixed costs of a song."""
    song = make_song(workdir / f"load-{profile.load_song_seconds:.0f}s.wav", profile.load_song_seconds)
    env = {"MODEL": profile.model, "MODEL_REPO": profile.model_repo, "CHUNK_SECONDS": "1"}
    two_workers = speed_results["configs"][-1]
    song_cost = two_workers["worker_cpu"]["median"] / speed_results["song_seconds"] * profile.load_song_seconds
    interval = profile.load_clients * song_cost / (1.5 * LOAD_UTILISATION)  # per client
    outcome = {}
    for label, prefetch in (("prefetch 1 (pull when free)", "1"), ("unbounded prefetch (push round-robin)", "0")):
        workers = [{"WORKER_THREADS": "1", "WORKER_PREFETCH": prefetch},
                   {"WORKER_THREADS": "1", "WORKER_PREFETCH": prefetch, "WORKER_SLOWDOWN": "2"}]
        with Deployment(workdir, env, workers) as deployment:
            posted = paced_uploads(deployment, song, profile.load_clients, interval, profile.load_seconds)
            finished = {music_id: deployment.wait_done(music_id, poll=0.5)["finished_at"] for music_id, _ in posted}
            per_worker = Counter(a["worker"] for music_id, _ in posted for a in deployment.timeline(music_id)
                                 if a["outcome"] == "done")
        ordered = sorted(finished[music_id] - at for music_id, at in posted)
        makespan = max(finished.values()) - min(at for _, at in posted)
        outcome[label] = {
            "songs": len(ordered), "songs_per_hour": len(ordered) / makespan * 3600, "makespan": makespan,
            "p50": ordered[len(ordered) // 2], "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "latencies": ordered, "jobs_per_worker": sorted(per_worker.values(), reverse=True),
        }
    return {"clients": profile.load_clients, "seconds": profile.load_seconds, "interval": interval,
            "song_seconds": profile.load_song_seconds, "utilisation": LOAD_UTILISATION, "runs": outcome}


def paced_uploads(deployment: Deployment, song: Path, clients: int, interval: float, seconds: float
                  ) -> list[tuple[int, float]]:
    """Each client uploads and processes `song` every `interval` seconds, the clients evenly
    staggered, for `seconds`; returns (music id, time processing was requested) per song."""
    posted: list[tuple[int, float]] = []
    began = time.monotonic()

    def client(index: int) -> None:
        due = began + index * interval / clients
        while due - began < seconds:
            time.sleep(max(0.0, due - time.monotonic()))
            music = deployment.upload(song)
            posted.append((music["music_id"], deployment.process(music)))
            due += interval

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return posted
