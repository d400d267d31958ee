"""The server's preparation of video kinds: planned from packets, pieces cut on demand, proven by the worker.

Real ffmpeg, files and (for the pipelined publisher) the real broker, no mocks; tiny clips.

- A closed-GOP source is planned without one decoded frame: every ffmpeg/ffprobe the server
  runs goes through `src.media.guard.run`, and a spy on it sees no decode (no `-count_frames`,
  no ffmpeg) while preparing and planning, and only stream copies while cutting.
- An open-GOP source (x264 `open_gop=1` with B-frames) decodes only the pieces that open on an
  open GOP's keyframe, and the output is still every source frame once.
- A piece that lies about its frames (another job's piece, or one cut short) is refused by the
  worker with the reason; an honest one reports the planned frames and pts.
- Job sizes follow the clip's length and the live workers, with a floor.
- A piece deleted after it was cut (a restarted server) is cut again, the same bytes; pieces
  are cut by seeking in MP4, Matroska, MPEG-TS and FLV (each seeks its own way), the same
  packets as reading from the first packet.
- A source without pts (AVI with B-frames) falls back to a decode for every piece.
- The first job is on the broker before the last piece is cut: the cut of the last piece waits
  until a job of the task is published (confirmed by the broker), which can only happen if
  publishing does not wait for the split.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from src import config
from src.kinds import registry
from src.kinds.base import JobView, TaskView
from src.kinds.faceblur import runner as faceblur_runner
from src.kinds.transcode import plan, runner, split
from src.media import guard
from src.server import create_app
from tests import video
from tests.helpers import services_of, wait_for

pytestmark = pytest.mark.skipif(runner.available() is not None, reason="needs ffmpeg and ffprobe")


def never() -> bool:
    return False


class Spy:
    """Every command the server's ffmpeg/ffprobe calls run (through the guard), as run."""

    def __init__(self, monkeypatch):
        self.commands: list[list[str]] = []
        real = guard.run

        def run(args, **options):
            self.commands.append([str(a) for a in args])
            return real(args, **options)

        monkeypatch.setattr(guard, "run", run)

    def decodes(self) -> list[list[str]]:
        """The commands that decode frames: ffprobe counting or showing frames, ffmpeg doing
        anything but a stream copy."""
        return [c for c in self.commands
                if (c[0] == "ffprobe" and {"-count_frames", "-show_frames"} & set(c))
                or (c[0] == "ffmpeg" and not ("-c" in c and c[c.index("-c") + 1] == "copy"))]


def kind_task(tmp_path: Path, kind_name: str, source: Path, raw: dict, chunk_seconds: float, workers: int = 1):
    settings = config.load({"CONFIG_FILE": str(tmp_path / "none.yaml")}).with_overrides(
        chunk_seconds=chunk_seconds, storage_dir=tmp_path)
    kind = registry.server(kind_name, settings)
    media = video.media(source)
    folder = tmp_path / f"task-{kind_name}-{workers}"
    folder.mkdir(parents=True, exist_ok=True)
    task = TaskView(id=7, kind=kind_name, params=kind.parameters(raw, media), facts={}, media=media, folder=folder,
                    workers=workers)
    return settings, kind, task


def planned(kind, task: TaskView) -> tuple[TaskView, list[JobView]]:
    task = replace(task, facts=kind.prepare(task))
    return task, [JobView(id=100 + i, chunk=i, facts=p.facts) for i, p in enumerate(kind.plan(task))]


def transcoded(tmp_path: Path, settings, kind, task: TaskView, jobs: list[JobView]) -> Path:
    """Every job through the worker, checked and kept, then merged: the output's path."""
    work = registry.worker(task.kind, settings)
    for job in jobs:
        params, body = kind.payload(task, job)
        result, chunk = work.run(params, body, never)
        assert result["decoded_frames"] == job.facts["frames"]
        if job.facts["first_pts"] is not None:  # none where the source's timestamps are broken
            assert (result["decoded_first_pts"], result["decoded_last_pts"]) == (
                job.facts["first_pts"], job.facts["last_pts"])
        assert kind.check(task, job, result, chunk) is None
        kind.keep(task, job, result, chunk)
    kind.merge(task, jobs)
    return kind.output(task, "video").path


@pytest.fixture(scope="module")
def closed(tmp_path_factory) -> Path:
    # 6.2 s at 25 fps (155 frames), a keyframe every 25, 2 B-frames, closed GOPs (x264's default)
    return video.make_clip(tmp_path_factory.mktemp("closed") / "closed.mp4", 6.2, audio=False)


@pytest.mark.unit
def test_a_closed_gop_source_is_planned_without_one_decoded_frame(tmp_path, monkeypatch, closed):
    settings, kind, task = kind_task(tmp_path, "transcode", closed, {"codec": "h264", "crf": 0,
                                                                   "preset": "ultrafast", "container": "mkv"}, 2.0)
    spy = Spy(monkeypatch)
    task, jobs = planned(kind, task)
    assert spy.commands and all(c[0] == "ffprobe" for c in spy.commands), spy.commands
    assert spy.decodes() == []
    assert task.facts["gop"] == "closed" and task.facts["broken_packets"] == 0
    assert [(j.facts["start"], j.facts["end"], j.facts["proof"]) for j in jobs] == [
        (0, 50, "packets"), (50, 100, "packets"), (100, 155, "packets")]
    assert not (task.folder / split.PIECES).exists(), "nothing is cut while planning"
    base = task.facts["time_base"]
    assert all(isinstance(j.facts["first_pts"], int) and isinstance(j.facts["last_pts"], int) for j in jobs), base

    spy.commands.clear()
    pieces = [kind.payload(task, job)[1] for job in jobs]  # each piece cut when its job is published
    assert spy.decodes() == [] and any(c[0] == "ffmpeg" for c in spy.commands)
    assert sum(len(p) for p in pieces) <= 1.1 * sum(j.facts["piece_bytes"] for j in jobs)
    out = transcoded(tmp_path, settings, kind, task, jobs)
    assert video.frame_hashes(out) == video.frame_hashes(closed)


@pytest.mark.unit
def test_an_open_gop_source_decodes_only_its_open_pieces_and_stays_frame_exact(tmp_path, monkeypatch):
    source = tmp_path / "open.mp4"
    video.ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-t", "4.2", "-c:v", "libx264", "-preset",
                 "veryfast", "-threads", "1", "-x264-params", "open_gop=1:keyint=25:min-keyint=25:scenecut=0:bframes=3",
                 "-pix_fmt", "yuv420p", "-y", str(source))
    settings, kind, task = kind_task(tmp_path, "transcode", source, {"codec": "h264", "crf": 0,
                                                                   "preset": "ultrafast", "container": "mkv"}, 1.0)
    spy = Spy(monkeypatch)
    task, jobs = planned(kind, task)
    assert task.facts["gop"] == "open" and task.facts["open_keyframes"] >= 2
    proofs = [j.facts["proof"] for j in jobs]
    assert proofs[0] == "packets" and "decode" in proofs, proofs
    counted = [c for c in spy.commands if "-count_frames" in c]
    assert len(counted) >= proofs.count("decode"), "one decode (or more, widened) per open piece, none for others"
    assert all("open GOP" in j.facts["unproven"] for j in jobs if j.facts["proof"] == "decode")
    out = transcoded(tmp_path, settings, kind, task, jobs)
    assert video.frame_hashes(out) == video.frame_hashes(source)


@pytest.mark.unit
def test_a_source_without_timestamps_falls_back_to_a_decode_and_stays_frame_exact(tmp_path, closed):
    # AVI stores no pts: B-frames cannot be placed from the packets, so every piece is decoded
    source = tmp_path / "closed.avi"
    video.ffmpeg("-i", str(closed), "-map", "0:v", "-c", "copy", "-y", str(source))
    settings, kind, task = kind_task(tmp_path, "transcode", source, {"codec": "h264", "crf": 0,
                                                                   "preset": "ultrafast", "container": "mkv"}, 2.0)
    task, jobs = planned(kind, task)
    assert task.facts["broken_packets"] == 155
    assert {j.facts["proof"] for j in jobs} == {"decode"} and all(j.facts["first_pts"] is None for j in jobs)
    assert all("no usable timestamp" in j.facts["unproven"] for j in jobs)
    out = transcoded(tmp_path, settings, kind, task, jobs)
    assert video.frame_hashes(out) == video.frame_hashes(source)


@pytest.mark.unit
def test_a_piece_that_lies_about_its_frames_is_refused_by_the_worker(tmp_path, closed):
    settings, kind, task = kind_task(tmp_path, "transcode", closed, {"codec": "h264", "preset": "ultrafast"}, 2.0)
    task, jobs = planned(kind, task)
    work = registry.worker("transcode", settings)
    first, second = (kind.payload(task, job) for job in jobs[:2])
    assert first[0]["frames"] == second[0]["frames"] == 50
    # another job's piece, with this job's plan: the same count, the wrong frames
    with pytest.raises(runner.PieceRefused, match=r"frames 50-100: decoded first_pts \d+ \(planned \d+\)"):
        work.run(second[0], first[1], never)
    # a piece cut short: fewer frames than planned
    short = tmp_path / "short.nut"
    whole = tmp_path / "whole.nut"
    whole.write_bytes(first[1])
    video.ffmpeg("-i", str(whole), "-map", "0:v", "-c", "copy", "-frames:v", "30", "-f", "nut", "-y", str(short))
    with pytest.raises(runner.PieceRefused, match=r"decoded frames 30 \(planned 50\)"):
        work.run(first[0], short.read_bytes(), never)
    # a plan naming timestamps without their time base is refused before any work
    assert "time_base" in work.problem({**first[0], "time_base": None}, first[1])


@pytest.mark.unit
@pytest.mark.skipif(faceblur_runner.available() is not None, reason="faceblur cannot run here")
def test_a_faceblur_piece_that_lies_is_refused_and_an_honest_one_reports_its_frames(tmp_path, closed):
    settings, kind, task = kind_task(tmp_path, "faceblur", closed, {"mode": "solid"}, 2.0)
    task, jobs = planned(kind, task)
    work = registry.worker("faceblur", settings)
    first, second = (kind.payload(task, job) for job in jobs[:2])
    result, _ = work.run(*first, never)
    assert (result["decoded_frames"], result["decoded_first_pts"], result["decoded_last_pts"]) == (
        jobs[0].facts["frames"], jobs[0].facts["first_pts"], jobs[0].facts["last_pts"])
    with pytest.raises(runner.PieceRefused, match="does not hold the job's frames"):
        work.run(second[0], first[1], never)


@pytest.mark.unit
def test_job_sizes_follow_the_clip_and_the_live_workers(tmp_path, closed):
    assert plan.job_seconds(6.2, 1, 30) == pytest.approx(6.2)  # one worker: one job
    assert plan.job_seconds(6.2, 2, 30) == pytest.approx(3.1)
    assert plan.job_seconds(6.2, 8, 30) == plan.MIN_JOB_SECONDS  # the floor
    assert plan.job_seconds(600, 8, 30) == 30  # CHUNK_SECONDS stays the upper bound
    assert plan.job_seconds(6.2, 8, 1.0) == 1.0  # and wins over the floor
    counts = {}
    for workers in (1, 2, 8):
        _, kind, task = kind_task(tmp_path, "transcode", closed, {"preset": "ultrafast"}, 30, workers)
        counts[workers] = len(planned(kind, task)[1])
    assert counts == {1: 1, 2: 2, 8: 3}  # 8 workers: 2 s jobs at the floor
    faces = {}
    for workers in (1, 2):
        _, kind, task = kind_task(tmp_path, "faceblur", closed, {}, 30, workers)
        jobs = planned(kind, task)[1]
        faces[workers] = [(j.facts["start"], j.facts["end"]) for j in jobs]
    assert len(faces[1]) == 1 and len(faces[2]) == 2


@pytest.mark.unit
def test_a_piece_lost_after_its_cut_is_cut_again_the_same(tmp_path, closed):
    _, kind, task = kind_task(tmp_path, "transcode", closed, {"preset": "ultrafast"}, 2.0)
    task, jobs = planned(kind, task)
    before = [kind.payload(task, job)[1] for job in jobs]
    last = split.piece_path(task.folder, jobs[-1].facts)
    last.unlink()  # a server restarted mid-publish finds what it had not cut yet missing
    assert kind.payload(task, jobs[-1])[1] == before[-1]
    # the seek lands where the plan says: reading from the first packet gives the same piece
    for job, piece in zip(jobs, before, strict=True):
        again = split.cut(closed, tmp_path / "from-start", job.facts, time_base=task.facts["time_base"], seek=False)
        assert again.read_bytes() == piece


@pytest.mark.unit
@pytest.mark.parametrize("container", ["mkv", "ts", "flv"])
def test_pieces_are_cut_by_seeking_in_every_container(tmp_path, monkeypatch, closed, container):
    # each container seeks its own way (Matroska and FLV 3/23 s early with B-frames, MPEG-TS to
    # the next keyframe): the cut still lands on the piece's keyframe, without reading from the start
    source = tmp_path / f"closed.{container}"
    video.ffmpeg("-i", str(closed), "-map", "0:v", "-c", "copy", "-y", str(source))
    _, kind, task = kind_task(tmp_path, "transcode", source, {"preset": "ultrafast"}, 1.0)
    task, jobs = planned(kind, task)
    assert len(jobs) >= 5 and {j.facts["proof"] for j in jobs} == {"packets"}
    spy = Spy(monkeypatch)
    pieces = [kind.payload(task, job)[1] for job in jobs]
    assert not [c for c in spy.commands if "segment" in c], "a seek landed elsewhere: cut again from the start"
    for job, piece in zip(jobs, pieces, strict=True):
        again = split.cut(source, tmp_path / "from-start", job.facts, time_base=task.facts["time_base"], seek=False)
        cut = tmp_path / "cut.nut"
        cut.write_bytes(piece)
        assert timed(again) == timed(cut)  # the same packets (the NUT time bases may differ)


def timed(path: Path) -> list[dict]:
    """A file's video packets in decode order: pts in seconds, size, flags."""
    return video.probe(path, "-select_streams", "v:0", "-show_entries", "packet=pts_time,size,flags")["packets"]


def test_the_first_job_is_published_before_the_last_piece_is_cut(settings, tmp_path, monkeypatch):
    app = create_app(settings.with_overrides(chunk_seconds=2.0))  # 3 jobs of the 6.2 s clip
    services = services_of(app)
    services.start()
    try:
        client = app.test_client()
        clip = video.make_clip(tmp_path / "clip.mp4", 6.2, audio=False)
        media = client.post("/media", data=clip.read_bytes(), content_type="application/octet-stream").get_json()
        real_cut = split.cut
        seen: dict[str, object] = {}

        def slow_cut(source, folder, job, *args, **kwargs):
            if job["end"] == media["video"]["frames"] and "queued" not in seen:
                # the last piece: cut only once a job of the task is on the broker (or give up)
                seen["queued"] = wait_for(lambda: services.store.jobs(state="queued") or None, 60,
                                          "a job published while pieces are uncut")
                seen["pieces"] = sorted(p.name for p in (folder / split.PIECES).glob("*.nut"))
            return real_cut(source, folder, job, *args, **kwargs)

        monkeypatch.setattr(split, "cut", slow_cut)
        answer = client.post("/tasks", json={"kind": "transcode", "media_id": media["media_id"],
                                             "params": {"codec": "h264", "preset": "ultrafast"}})
        assert answer.status_code == 202, answer.get_json()
        task_id = answer.get_json()["task_id"]
        wait_for(lambda: len(services.store.jobs(task_id, state="queued")) == 3 or None, 90, "every job published")
        first = seen["queued"][0]
        assert first.facts["start"] == 0 and first.publications == 1, "job 1 was on the broker before the last cut"
        assert len(seen["pieces"]) == 2, seen["pieces"]  # the last piece was not there yet
    finally:
        services.close()


def test_a_piece_that_cannot_be_cut_fails_its_task_not_the_publisher(settings, tmp_path, monkeypatch):
    app = create_app(settings.with_overrides(chunk_seconds=2.0))
    services = services_of(app)
    services.start()
    try:
        client = app.test_client()
        clip = video.make_clip(tmp_path / "clip.mp4", 6.2, audio=False)
        media = client.post("/media", data=clip.read_bytes(), content_type="application/octet-stream").get_json()
        real_cut = split.cut
        doomed: list[str] = []  # the first task's folder: its second piece cannot be cut

        def failing_cut(source, folder, job, *args, **kwargs):
            doomed[:] = doomed or [folder.name]
            if folder.name == doomed[0] and job["start"] > 0:
                raise split.SplitError("packets 50-100 cannot be cut with stream copy: (simulated)")
            return real_cut(source, folder, job, *args, **kwargs)

        monkeypatch.setattr(split, "cut", failing_cut)

        def task(params: dict) -> int:
            answer = client.post("/tasks", json={"kind": "transcode", "media_id": media["media_id"], "params": params})
            assert answer.status_code == 202, answer.get_json()
            return answer.get_json()["task_id"]

        first = task({"codec": "h264", "preset": "ultrafast"})
        failed = wait_for(lambda: (t := services.store.task(first)).state == "failed" and t, 60, "the task to fail")
        assert "could not be made" in failed.error and "simulated" in failed.error, failed.error
        other = task({"codec": "h264", "preset": "veryfast"})
        wait_for(lambda: len(services.store.jobs(other, state="queued")) == 3 or None, 60, "the next task's jobs")
    finally:
        services.close()
