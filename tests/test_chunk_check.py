"""The server's check of a returned video chunk: by its packets, with a full decode only where asked.

Real ffmpeg and ffprobe on chunks made by the real worker code (`tests.test_transcode_kind.Run`,
in-process), then the real farm: a server with VERIFY_SAMPLE=1 and a worker that tampers with its
first result (`--simulate tamper`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from src.kinds.transcode import check, split
from src.kinds.transcode import runner as runner_module
from tests import video
from tests.helpers import get_json, metric
from tests.test_transcode import finished, transcode, upload
from tests.test_transcode_kind import Run

pytestmark = pytest.mark.skipif(runner_module.available() is not None, reason="needs ffmpeg and ffprobe")
PARAMS = {"codec": "h264", "crf": 28, "preset": "veryfast"}


@pytest.fixture
def run(tmp_path: Path) -> Run:
    """A 2.2 s clip planned as the server plans it (CHUNK_SECONDS 2: one job of 55 frames)."""
    return Run(tmp_path, video.make_clip(tmp_path / "clip.mp4", 2.2), PARAMS)


class Spawned:
    """Every child process started while installed: its program and arguments."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[list[str]] = []
        original = subprocess.Popen
        calls = self.calls

        class Spy(original):  # type: ignore[misc, valid-type]
            def __init__(self, args, *rest, **named):
                calls.append([str(arg) for arg in args])
                super().__init__(args, *rest, **named)

        monkeypatch.setattr(subprocess, "Popen", Spy)

    def programs(self) -> list[str]:
        return [Path(args[0]).name for args in self.calls]


def remux(source: Path, target: Path, drop: int) -> Path:
    """`source`'s packets stream-copied to NUT without packet number `drop` (no re-encode)."""
    video.ffmpeg("-i", str(source), "-map", "0:v:0", "-c", "copy", "-bsf:v", f"noise=drop=eq(n\\,{drop})",
                 "-f", "nut", "-y", str(target))
    return target


@pytest.mark.unit
def test_a_chunk_with_a_missing_frame_is_refused_by_its_packets(run, tmp_path):
    job = run.jobs[0]
    params, body = run.encode(job)
    frames = job.facts["frames"]
    whole = tmp_path / "whole.nut"
    whole.write_bytes(body)
    assert check.check_chunk(whole, frames, 160, 120, "h264", fps="25") is None
    assert check.check_chunk(whole, frames, 320, 240, "h264", fps="25") == "the chunk is 160x120, the plan says 320x240"
    assert check.check_chunk(whole, frames, 160, 120, "hevc", fps="25") == "the chunk is h264, the task asked for hevc"
    reason = check.check_chunk(whole, frames, 160, 120, "h264", fps="50")  # twice the rate
    assert reason and "not all one frame long" in reason, reason

    # one packet short: the count says so
    short = remux(whole, tmp_path / "short.nut", drop=10)
    assert check.check_chunk(short, frames, 160, 120, "h264", fps="25") == \
        f"the chunk has {frames - 1} frames, the job owns {frames}"
    assert run.kind.check(run.task, job, params, short.read_bytes()) == \
        f"the chunk has {frames - 1} frames, the job owns {frames}"

    # the right count, with a frame missing inside: one frame more encoded, one dropped; the
    # timestamps show the hole (a decode would count the planned number of frames)
    longer = tmp_path / "longer.nut"
    video.ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-frames:v", str(frames + 1), "-c:v", "libx264",
                 "-preset", "veryfast", "-threads", "1", "-r", "25", "-f", "nut", "-y", str(longer))
    holed = remux(longer, tmp_path / "holed.nut", drop=frames // 2)
    assert len(video.packets(holed)) == frames
    reason = check.check_chunk(holed, frames, 160, 120, "h264", fps="25")
    assert reason and "not one frame apart" in reason, reason

    # the truncated chunk of WORKER_SIMULATE=corrupt, caught by the default (packets-only) check
    reason = run.kind.check(run.task, job, params, run.runner.corrupt(body))
    assert reason and ("frames" in reason or "damaged" in reason), reason


@pytest.mark.unit
def test_a_valid_chunk_passes_with_no_decode_and_a_sampled_one_is_decoded(run, monkeypatch):
    job = run.jobs[0]
    params, body = run.encode(job)
    spawned = Spawned(monkeypatch)
    assert run.kind.check(run.task, job, params, body) is None
    assert spawned.programs() == ["ffprobe"], spawned.calls
    assert "-show_frames" not in spawned.calls[0] and "packet=pts,dts,duration,size,pos,flags" in \
        " ".join(spawned.calls[0]), "ffprobe reads packets, not frames"

    spawned.calls.clear()
    run.kind = type(run.kind)(run.settings.with_overrides(verify_sample=1.0))
    assert run.kind.check(run.task, job, params, body) is None
    assert spawned.programs() == ["ffprobe", "ffmpeg", "ffmpeg"], "packets, a clean decode, the PSNR"
    assert "-xerror" in spawned.calls[1] and "psnr" in " ".join(spawned.calls[2])


@pytest.mark.unit
def test_what_the_worker_says_it_decoded_is_held_to_the_plan(run):
    job = run.jobs[-1]
    params, body = run.encode(job)
    frames = job.facts["frames"]
    honest = {**params, "decoded_frames": frames}
    assert run.kind.check(run.task, job, honest, body) is None
    assert run.kind.check(run.task, job, {k: v for k, v in params.items() if k != "decoded_frames"}, body) == \
        f"the result does not report decoded_frames (the job planned {frames})"
    lying = {**params, "decoded_frames": frames - 1}
    assert run.kind.check(run.task, job, lying, body) == \
        f"the worker decoded decoded_frames={frames - 1}, the job planned {frames}"
    planned = {**job.facts, "first_pts": 1000}
    assert check.decoded_problem({"decoded_frames": frames, "decoded_first_pts": 999}, planned) == \
        "the worker decoded decoded_first_pts=999, the job planned 1000"


@pytest.mark.unit
def test_verify_sample_picks_the_same_chunks_every_time(tmp_path):
    picked = [check.sampled(tmp_path, chunk, 0.5) for chunk in range(200)]
    assert picked == [check.sampled(tmp_path, chunk, 0.5) for chunk in range(200)], "a restart picks the same"
    assert 60 < sum(picked) < 140
    assert not any(check.sampled(tmp_path, chunk, 0.0) for chunk in range(200))
    assert all(check.sampled(tmp_path, chunk, 1.0) for chunk in range(200))
    other = tmp_path / "other"
    assert picked != [check.sampled(other, chunk, 0.5) for chunk in range(200)], "keyed per task"


def test_verify_sample_1_catches_a_tampered_chunk_end_to_end(cluster, tmp_path):
    """One worker that tampers with its first result, a server that fully checks every chunk:
    the grey chunk is refused by its PSNR, the job runs again, and the output is the one the
    kind makes in-process from honest chunks, byte for byte."""
    clip = video.make_clip(tmp_path / "clip.mp4", 1.0, keyint=12)
    cluster.settings = cluster.settings.with_overrides(chunk_seconds=0.5, verify_sample=1.0)
    cluster.start_server()
    cluster.start_worker("--simulate", "tamper", WORKER_KINDS="transcode/h264")
    cluster.wait_workers(1)
    media = upload(cluster.base, clip)
    task_id = transcode(cluster.base, media["media_id"], PARAMS)
    output = finished(cluster.base, task_id)
    assert metric(cluster.base, "karaoke_results_refused") == 1
    assert "below VERIFY_MIN_PSNR 30 dB" in cluster.log("server")
    failed = [a for a in get_json(f"{cluster.base}/tasks/{task_id}/timeline") if a["outcome"] == "failed"]
    assert len(failed) == 1, failed

    (tmp_path / "honest").mkdir()
    honest = Run(tmp_path / "honest", clip, PARAMS, chunk_seconds=0.5)
    assert output == honest.all().read_bytes()


@pytest.mark.unit
def test_a_sampled_tampered_chunk_is_measured_even_when_its_piece_is_not_cut(run):
    job = run.jobs[0]
    job_params, piece = run.kind.payload(run.task, job)
    params, body = run.encode(job)
    grey = run.runner.tamper(job_params, piece)
    assert run.kind.check(run.task, job, params, grey) is None, "packets alone cannot tell"
    shutil.rmtree(run.task.folder / split.PIECES)  # a restarted server, or a piece not cut yet
    run.kind = type(run.kind)(run.settings.with_overrides(verify_sample=1.0))
    reason = run.kind.check(run.task, job, params, grey)
    assert reason and "below VERIFY_MIN_PSNR 30 dB" in reason, reason
    assert run.kind.check(run.task, job, params, body) is None
