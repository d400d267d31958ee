"""The merged stems equal demucs on the whole file, for no extra model work; a naive split does not.

The reference is demucs' own `Separator.separate_tensor(shifts=0, split=True, overlap=0.25)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from demucs.api import Separator

from src.kinds.separation.compute import run_job
from src.kinds.separation.merge import merge_results
from src.kinds.separation.model import describe, load_model
from src.kinds.separation.plan import grid, job_params, plan_jobs
from src.kinds.separation.prepare import normalisation
from src.media import pcm
from tests.helpers import decode_with_ffmpeg, sdr, wait_for, wav_array
from tools.random_model import save_random_htdemucs


@pytest.fixture(scope="session")
def htdemucs_repo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    save_random_htdemucs(folder, "htdemucs_small", small=True)
    return folder


class ForwardCounter:
    """Counts the model's forward passes, one per segment."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def distributed(model, spec, wav: np.ndarray, mean: float, std: float, chunk_seconds: float) -> np.ndarray:
    """What the workers and the server compute together, without the broker in between."""
    frames = wav.shape[1]
    plans = plan_jobs(spec, frames, chunk_seconds)
    results = {}
    for plan in plans:
        params = job_params(spec, plan, frames, mean, std)
        _, results[plan.chunk] = run_job(model, params, wav[:, plan.slice_start:plan.slice_end])
    out = np.zeros((len(spec.sources), wav.shape[0], frames), np.float32)

    def emit(start: int, block: np.ndarray) -> None:
        out[..., start:start + block.shape[-1]] = block

    merge_results(spec, plans, frames, mean, std, lambda plan: results[plan.chunk], emit)
    return out


@pytest.mark.unit
def test_merge_equals_whole_file_demucs_and_runs_no_extra_segments(htdemucs_repo, make_song, tmp_path, capsys):
    torch.set_num_threads(2)
    song = tmp_path / "song.f32"
    frames = pcm.decode(make_song(14.0, "wav"), song, 44100, 2, max_duration_s=60)
    wav = pcm.read_frames(song, 2, 0, frames).copy()
    mean, std = normalisation(song, 2)

    separator = Separator(model="htdemucs_small", repo=htdemucs_repo, shifts=0, overlap=0.25, split=True,
                          device="cpu")
    whole_counter = ForwardCounter(separator.model)
    _, whole = separator.separate_tensor(torch.from_numpy(wav.copy()))
    whole = np.stack([whole[name].numpy() for name in separator.model.sources])

    model = load_model("htdemucs_small", str(htdemucs_repo))
    spec = describe(model, "htdemucs_small", None)
    ours_counter = ForwardCounter(model)
    ours = distributed(model, spec, wav, mean, std, chunk_seconds=5)

    assert len(plan_jobs(spec, frames, 5)) >= 3
    segments = (whole_counter.calls, ours_counter.calls)
    assert ours_counter.calls == whole_counter.calls == len(grid(spec, frames))
    exact = [sdr(whole[k], ours[k]) for k in range(len(spec.sources))]
    assert min(exact) >= 60, f"distributed stems differ from whole-file demucs: SDR {exact}"

    # The naive way: cut the song into pieces, separate each alone, concatenate.
    piece = 5 * 44100
    naive = np.concatenate([
        np.stack([s.numpy() for s in separator.separate_tensor(torch.from_numpy(wav[:, i:i + piece].copy()))[1]
                  .values()])
        for i in range(0, frames, piece)], axis=-1)
    naive_sdr = [sdr(whole[k], naive[k]) for k in range(len(spec.sources))]
    assert max(naive_sdr) < min(exact) - 20, "the naive split should be clearly worse"
    with capsys.disabled():
        print(f"\n  fidelity vs whole-file demucs, SDR dB per stem {spec.sources}:"
              f"\n    grid-aligned merge: {[round(x, 1) for x in exact]}"
              f"\n    naive split+concat: {[round(x, 1) for x in naive_sdr]}"
              f"\n    model runs (segments): whole file {segments[0]}, distributed {segments[1]}")


def test_served_stems_equal_whole_file_demucs(client, cluster, make_song, tmp_path):
    """Through the real broker and two worker processes, compared in 16-bit WAV."""
    song = make_song(10.0, "wav")
    cluster.start_worker()
    cluster.start_worker()
    music = client.post("/music", data=song.read_bytes(), content_type="application/octet-stream").get_json()
    client.post(f"/music/{music['music_id']}", json=[t["track_id"] for t in music["tracks"]])
    status = wait_for(lambda: (s := client.get(f"/music/{music['music_id']}").get_json())["state"] == "done" and s,
                      180, "the song to be done")

    torch.manual_seed(0)  # demucs_unittest has random weights: the same seed as every worker
    separator = Separator(model="demucs_unittest", shifts=0, overlap=0.25, split=True, segment=2, device="cpu")
    wav = decode_with_ffmpeg(song.read_bytes()).T.copy()
    _, whole = separator.separate_tensor(torch.from_numpy(wav))
    for instrument in status["instruments"]:
        served, _ = wav_array(client.get(instrument["track"] + "?format=wav").data)
        # quantised like any 16-bit WAV of demucs' output, so the comparison is like for like
        reference = np.clip(np.round(whole[instrument["name"]].numpy().T * 32767), -32768, 32767) / 32767
        assert sdr(reference, served) >= 60, instrument["name"]
