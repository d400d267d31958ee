"""Separation batched across segments and jobs, precision, device classes and the worker layout.

The batched runner is held to whole-file demucs (`Separator`, split, overlap 0.25, no shifts)
on a small random-weight htdemucs, with its model calls counted; an out-of-memory error is
raised by the real model (a forward pre-hook refuses batches above two segments, as a full
GPU would) and must cost a smaller batch, not the job; the layout rule and the GPU list are
checked against the core and device counts they claim; and a result cached under another
device class is not reused by a CPU task (the positive control: the same entry under the
CPU's version is).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from demucs.api import Separator

from src import config
from src.audio_worker.supervisor import gpu_devices
from src.kinds import registry
from src.kinds.separation.merge import merge_results
from src.kinds.separation.model import describe, load_model, software_version
from src.kinds.separation.plan import grid, job_params, plan_jobs
from src.server.cache import Verification, digest
from tests.helpers import reference_stems, sdr, services_of, wait_for, wav_array
from tools.random_model import save_random_htdemucs

MODEL = "htdemucs_small"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    save_random_htdemucs(folder, MODEL, small=True)
    return folder


def a_song(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(7)
    t = np.arange(int(seconds * 44100)) / 44100
    tones = sum(np.sin(2 * np.pi * f * t) for f in (110, 440, 1234)) * 0.1
    return (tones + rng.standard_normal((2, t.size)) * 0.02).astype(np.float32)


def runner_for(repo: Path, tmp_path: Path, **settings: str):
    values = {"CONFIG_FILE": str(tmp_path / "none.yaml"), "MODEL": MODEL, "MODEL_REPO": str(repo), "DEVICE": "cpu",
              "WORKER_THREADS": "2", "STORAGE_DIR": str(tmp_path / "storage"), **settings}
    return registry.worker("separate", config.load(values))


def separate(runner, wav: np.ndarray, chunk_seconds: float) -> tuple[np.ndarray, int]:
    """Every job of the song through `runner.run_many` at once, merged: (stems, jobs)."""
    spec = describe(runner.model(MODEL), MODEL, None)
    frames = wav.shape[1]
    plans = plan_jobs(spec, frames, chunk_seconds)
    jobs = [(job_params(spec, p, frames, 0.0, 1.0), np.ascontiguousarray(wav[:, p.slice_start:p.slice_end]).tobytes(),
             lambda: False) for p in plans]
    outcomes = runner.run_many(jobs)
    results = {p: np.frombuffer(body, dtype="<f4").reshape(len(spec.sources), 2, -1)
               for p, (_, body) in zip(plans, outcomes, strict=True)}
    out = np.zeros((len(spec.sources), 2, frames), np.float32)

    def emit(start: int, block: np.ndarray) -> None:
        out[..., start:start + block.shape[-1]] = block

    merge_results(spec, plans, frames, 0.0, 1.0, lambda p: results[p], emit)
    return out, len(plans)


def whole_file(repo: Path, wav: np.ndarray) -> np.ndarray:
    separator = Separator(model=MODEL, repo=repo, shifts=0, overlap=0.25, split=True, device="cpu")
    _, stems = separator.separate_tensor(torch.from_numpy(wav.copy()))
    return np.stack([stems[name].numpy() for name in separator.model.sources])


@pytest.mark.unit
@pytest.mark.parametrize("batch", [1, 4])
def test_batched_and_pooled_runner_equals_whole_file_demucs(repo, tmp_path, batch):
    torch.set_num_threads(2)
    wav = a_song(8.0)
    reference = whole_file(repo, wav)
    runner = runner_for(repo, tmp_path, SEGMENT_BATCH=str(batch))
    calls = []
    runner.model(MODEL).register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))

    ours, jobs = separate(runner, wav, chunk_seconds=3)

    segments = len(grid(describe(runner.model(MODEL), MODEL, None), wav.shape[1]))
    assert jobs >= 3 and sum(calls) == segments, "every grid segment once, whatever the batch"
    assert max(calls) == min(batch, segments)
    # segments of equal padded length go together: at most one extra call for the song's short tail
    assert len(calls) <= math.ceil(segments / batch) + 1
    exact = [sdr(reference[k], ours[k]) for k in range(reference.shape[0])]
    assert min(exact) >= 60, f"batch {batch}: SDR against whole-file demucs {exact}"
    assert runner._batcher.size == batch and runner._batcher.segments == segments


@pytest.mark.unit
def test_an_out_of_memory_batch_is_halved_and_retried_not_failed(repo, tmp_path, caplog):
    torch.set_num_threads(2)
    wav = a_song(8.0)
    plain, _ = separate(runner_for(repo, tmp_path, SEGMENT_BATCH="1"), wav, chunk_seconds=30)
    runner = runner_for(repo, tmp_path, SEGMENT_BATCH="8")
    model = runner.model(MODEL)

    def full_device(_module, inputs):
        if inputs[0].shape[0] > 2:  # what a GPU with room for two segments answers
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {inputs[0].shape[0]} segments)")

    model.register_forward_pre_hook(full_device)
    with caplog.at_level(logging.WARNING, logger="worker"):
        ours, _ = separate(runner, wav, chunk_seconds=30)

    assert runner._batcher.size == 2 and runner._batcher.halvings == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("batch of 8 segments" in m and "retrying with 4" in m for m in messages), messages
    assert any("batch of 4 segments" in m and "retrying with 2" in m for m in messages), messages
    assert min(sdr(plain[k], ours[k]) for k in range(plain.shape[0])) >= 60


@pytest.mark.unit
def test_a_cpu_worker_offers_the_cpu_route_with_a_version_naming_device_and_precision(repo, tmp_path):
    runner = runner_for(repo, tmp_path, PRECISION="bf16")  # a CPU computes in fp32 whatever is asked
    assert runner.offers() == {"": software_version("cpu", "fp32")}
    assert runner.offers()[""].endswith(" cpu fp32")
    assert software_version("cuda:1", "bf16").endswith(" cuda bf16")
    assert registry.routes("separate") == ("", "cuda")


@pytest.mark.unit
def test_the_layout_rule_and_the_gpu_list_follow_the_counts_they_claim(tmp_path):
    # measured: 2 cores -> 2 workers x 1 thread; 16 cores -> 4 x 4 (0.63x one 16-thread process)
    assert config.cpu_layout(1) == (1, 1)
    assert config.cpu_layout(2) == (2, 1)
    assert config.cpu_layout(8) == (4, 2)
    assert config.cpu_layout(16) == (4, 4)
    assert config.cpu_layout(64) == (16, 4)
    base = {"CONFIG_FILE": str(tmp_path / "none.yaml")}
    cores = __import__("os").cpu_count()
    assert config.load(base).workers_healthy == config.cpu_layout(cores)[0]
    assert config.load({**base, "WORKERS_HEALTHY": "3"}).workers_healthy == 3  # set: as set
    assert gpu_devices("cpu") == []
    assert gpu_devices("cuda:0,cuda:2") == ["cuda:0", "cuda:2"]
    if not torch.cuda.is_available():
        assert gpu_devices("auto") == []  # a CPU host: CPU workers
        assert gpu_devices("cuda") == ["cuda"]  # asked for, absent: the worker says why (test_faults)
    for wrong in ("gpu", "cuda:", "cuda:0;cuda:1"):
        with pytest.raises(ValueError, match="DEVICE"):
            config.load({**base, "DEVICE": wrong})
    with pytest.raises(ValueError, match="PRECISION"):
        config.load({**base, "PRECISION": "fp16"})
    with pytest.raises(ValueError, match="SEGMENT_BATCH"):
        config.load({**base, "SEGMENT_BATCH": "0"})


@pytest.fixture
def cached_settings(settings):
    return settings.with_overrides(cache_mb=64)


def test_a_result_cached_under_another_device_class_is_not_reused(cached_settings, cluster, make_song):
    """Songs are planned while no worker is live (a kind with route preferences publishes nothing
    before one is), their jobs' results are put in the cache under a GPU's version (and, for the
    control song, under the CPU worker's), then a CPU worker starts."""
    from src.server import create_app

    app = create_app(cached_settings)
    services = services_of(app)
    services.start()
    try:
        client = app.test_client()
        pipeline = services.pipeline
        kind = pipeline.kind("separate")
        songs = {}
        for label, seconds in (("cuda", 5.0), ("cpu", 6.0)):  # other lengths: other jobs, other digests
            music = client.post("/music", data=make_song(seconds, "wav").read_bytes(),
                                content_type="application/octet-stream").get_json()
            client.post(f"/music/{music['music_id']}", json=[])
            task = wait_for(lambda m=music: (t := services.store.task(m["music_id"])) and t.state == "running"
                            and services.store.jobs(task_id=t.id) and t, 60, "the song planned")
            assert task.facts.get("route") is None, "no route is kept before a worker serves one"
            songs[label] = task
            view = pipeline.view(task)
            version = software_version("cuda" if label == "cuda" else "cpu", "fp32")
            for job in services.store.jobs(task_id=task.id):
                params, body = kind.payload(view, pipeline.job_view(job))
                result = {"out_start": job.facts["out_start"], "sources": list(kind.spec.sources), "channels": 2,
                          "frames": job.facts["out_end"] - job.facts["out_start"]}
                silence = np.zeros(4 * 2 * result["frames"], "<f4").tobytes()  # plausible, and wrong
                cache = services.pipeline.cache
                cache.keep_job(digest("separate", params, body), version, result, silence, Verification())

        cluster.start_worker()
        done = {label: wait_for(lambda t=task: (s := client.get(f"/tasks/{t.id}").get_json())["state"] == "done"
                                and s, 120, f"{label} song done") for label, task in songs.items()}
        gpu, cpu = done["cuda"]["stats"], done["cpu"]["stats"]
        assert gpu["cache"]["jobs"] == 0, "a result cached under cuda completed a task that runs on CPUs"
        assert gpu["software"].endswith(" cpu fp32")
        assert cpu["cache"]["jobs"] == cpu["cache"]["of"] > 0, "the control: the CPU's own entries are reused"
        assert services.store.task(songs["cuda"].id).facts["route"] == ""  # the CPU workers' queue, kept
    finally:
        services.close()


@pytest.mark.unit
def test_jobs_pooled_by_a_worker_equal_jobs_run_alone(repo, tmp_path):
    """run_many (a worker's held jobs, segments pooled) gives each job the bytes run() gives it alone."""
    torch.set_num_threads(2)
    wav = a_song(6.0)
    model = load_model(MODEL, str(repo))
    spec = describe(model, MODEL, None)
    plans = plan_jobs(spec, wav.shape[1], 3)
    jobs = [(job_params(spec, p, wav.shape[1], 0.0, 1.0), np.ascontiguousarray(wav[:, p.slice_start:p.slice_end])
             .tobytes()) for p in plans]
    alone = runner_for(repo, tmp_path, SEGMENT_BATCH="1")
    pooled = runner_for(repo, tmp_path / "b", SEGMENT_BATCH="1")
    singly = [alone.run(params, body, lambda: False) for params, body in jobs]
    together = pooled.run_many([(params, body, lambda: False) for params, body in jobs])
    assert [r[0] for r in together] == [r[0] for r in singly]
    assert all(a[1] == b[1] for a, b in zip(together, singly, strict=True)), "batch 1: the same bytes"


@pytest.mark.unit
def test_songs_are_cut_so_that_every_live_worker_gets_a_job(repo):
    """Measured: 16 workers and 2 songs of 60 s got 14 jobs (htdemucs). Here the small model's 4 s
    segments make 18 jobs for 2 songs, so 24 workers are the case: cut for them, 24 jobs at least."""
    spec = describe(load_model(MODEL, str(repo)), MODEL, None)
    minute = 60 * 44100
    assert 2 * len(plan_jobs(spec, minute, 30, workers=1)) < 24
    assert 2 * len(plan_jobs(spec, minute, 30, workers=24)) >= 24
    assert plan_jobs(spec, minute, 30, workers=2) == plan_jobs(spec, minute, 30), "a few workers: as before"
    for workers in (1, 3, 16, 1000):
        plans = plan_jobs(spec, minute, 30, workers=workers)
        owned = [p.first_offset + i * spec.stride for p in plans for i in range(p.segments)]
        assert owned == grid(spec, minute), "every segment owned once, in order"


def test_a_worker_that_holds_several_jobs_runs_them_together_and_the_song_is_exact(client, cluster, make_song):
    """A real worker with WORKER_PREFETCH=4 and SEGMENT_BATCH=4 on the real broker: the jobs it holds
    are started together (pooled), and the served stems equal whole-file demucs."""
    song = make_song(12.0, "wav")
    worker = cluster.start_worker(WORKER_PREFETCH="4", SEGMENT_BATCH="4")
    wait_for(lambda: client.get("/workers").get_json(), 60, "the worker on the panel")
    music = client.post("/music", data=song.read_bytes(), content_type="application/octet-stream").get_json()
    client.post(f"/music/{music['music_id']}", json=[])
    wait_for(lambda: client.get(f"/music/{music['music_id']}").get_json()["state"] == "done", 180, "the song done")

    reference = reference_stems(song)
    for instrument in client.get(f"/music/{music['music_id']}").get_json()["instruments"]:
        stem, _ = wav_array(client.get(instrument["track"] + "?format=wav").data)
        assert sdr(reference[instrument["name"]], stem) >= 60, instrument["name"]
    log = cluster.log(f"worker{cluster.workers.index(worker)}")
    assert "4 segment(s) per model call (SEGMENT_BATCH=4)" in log
    lines = [line for line in log.splitlines() if " started Job[" in line or " finished Job[" in line]
    together = any(" started Job[" in a and " started Job[" in b for a, b in zip(lines, lines[1:], strict=False))
    assert together, "no two jobs were started before the first finished: nothing was pooled\n" + "\n".join(lines)
