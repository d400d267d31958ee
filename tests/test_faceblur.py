"""`faceblur` end to end: real ffmpeg, the real detector (CenterFace), no mocks.

The clip is scikit-image's astronaut sliding and bobbing over a textured background along a
known path, so the true face box is known in every frame (62 frames at 25 fps, 320x240, a
keyframe every 12 frames, B-frames, a sine for sound). In one frame, the first of a job when
the clip is cut in 2 or 4, the face is painted over with noise: the detector finds nothing
there, and only the smoothing (faces of the neighbouring frames, some of them another job's)
masks it.

In-process, through the kind's interface as the backbone drives it (prepare → plan → payload
→ run → check → keep → merge), losslessly (crf 0), cut into 1, 2 and 4 jobs:

- the three outputs decode to the same frames (framemd5);
- in every frame the face box's Laplacian variance is at most 20 % of the source's;
- outside the masks every pixel is the source's (PSNR ≥ 40 dB; lossless: identical);
- the hidden frame has no face found and is masked all the same;
- every frame has a record (its milliseconds and faces), in the results and in the stats.

Through the backbone (real server, two slowed worker processes, the broker): a worker killed
mid-job changes no byte of the output. About 70 s on two busy cores.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from skimage import data as images

from src import config
from src.kinds import registry
from src.kinds.base import BadParams, Cancelled, JobView, NotApplicable, TaskView
from src.kinds.faceblur import plan as planning
from src.kinds.faceblur import runner as runner_module
from tests import test_transcode as transcode_test
from tests import video
from tests.helpers import get_json, wait_for

pytestmark = pytest.mark.skipif(runner_module.available() is not None,
                                reason=f"faceblur cannot run here: {runner_module.available()}")

WIDTH, HEIGHT, FPS, FRAMES, KEYINT = 320, 240, 25, 62, 12
SCALE = 0.75  # the 512 px astronaut at 384 px: its face about 60x80 px
FACE = (185, 65, 265, 175)  # the face (brow to chin) in the 512 px image
HIDDEN = 26  # a frame whose face is painted over: the first of a job in the 2- and 4-job plans
CHUNKS = {1: 10.0, 2: 1.24, 4: 0.64}  # jobs → CHUNK_SECONDS that plans that many (asserted)
LOSSLESS = {"mode": "blur", "crf": 0}


def offset(frame: int) -> tuple[int, int]:
    """Where the scaled image's top-left corner is in frame `frame`."""
    return -90 + 2 * frame, 5 + round(12 * math.sin(2 * math.pi * frame / 31))


def face_box(frame: int) -> tuple[int, int, int, int]:
    """The true face box (x1, y1, x2, y2) in frame `frame`."""
    x, y = offset(frame)
    return (round(FACE[0] * SCALE) + x, round(FACE[1] * SCALE) + y, round(FACE[2] * SCALE) + x,
            round(FACE[3] * SCALE) + y)


def make_clip(path: Path) -> Path:
    rng = np.random.default_rng(7)
    texture = cv2.GaussianBlur(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8), (0, 0), 1.5)
    background = cv2.addWeighted(texture, 0.6, np.full_like(texture, 60), 0.4, 0)
    side = round(512 * SCALE)
    person = cv2.resize(cv2.cvtColor(images.astronaut(), cv2.COLOR_RGB2BGR), (side, side),
                        interpolation=cv2.INTER_AREA)
    frames = []
    for frame in range(FRAMES):
        canvas = background.copy()
        x, y = offset(frame)
        left, top = max(0, x), max(0, y)
        right, bottom = min(WIDTH, x + side), min(HEIGHT, y + side)
        canvas[top:bottom, left:right] = person[top - y:bottom - y, left - x:right - x]
        if frame == HIDDEN:
            x1, y1, x2, y2 = face_box(frame)
            canvas[y1 - 8:y2 + 8, x1 - 8:x2 + 8] = rng.integers(0, 256, (y2 - y1 + 16, x2 - x1 + 16, 3),
                                                                 dtype=np.uint8)
        frames.append(canvas)
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-f", "rawvideo", "-pix_fmt", "bgr24",
                    "-s", f"{WIDTH}x{HEIGHT}", "-r", str(FPS), "-i", "-",
                    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", str(FRAMES / FPS),
                    "-map", "0:v", "-map", "1:a", "-c:a", "aac", "-c:v", "libx264", "-preset", "veryfast",
                    "-crf", "16", "-threads", "1", "-pix_fmt", "yuv420p", "-g", str(KEYINT),
                    "-keyint_min", str(KEYINT), "-sc_threshold", "0", "-bf", "2", "-y", str(path)],
                   input=np.stack(frames).tobytes(), check=True, capture_output=True, timeout=120)
    return path


def planes(path: Path) -> np.ndarray:
    """Every decoded frame as yuv420p bytes, (frames, W*H*3/2)."""
    done = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0", "-f", "rawvideo",
                           "-pix_fmt", "yuv420p", "-"], capture_output=True, check=True, timeout=120)
    return np.frombuffer(done.stdout, np.uint8).reshape(-1, WIDTH * HEIGHT * 3 // 2)


def luma(frame: np.ndarray) -> np.ndarray:
    return frame[:WIDTH * HEIGHT].reshape(HEIGHT, WIDTH)


def sharpness(frame: np.ndarray, box: tuple[int, int, int, int]) -> float:
    x1, y1, x2, y2 = box
    return float(cv2.Laplacian(luma(frame)[y1:y2, x1:x2].astype(np.float64), cv2.CV_64F).var())


def outside(frame: int, window: int = 5, grow: float = 2.0) -> np.ndarray:
    """Where no mask can be in frame `frame`: away from the face boxes of its window, grown."""
    keep = np.ones((HEIGHT, WIDTH), bool)
    for near in range(max(0, frame - window // 2), min(FRAMES, frame + window // 2 + 1)):
        x1, y1, x2, y2 = face_box(near)
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * grow / 2, (y2 - y1) * grow / 2
        keep[max(0, int(cy - hh)):int(cy + hh) + 1, max(0, int(cx - hw)):int(cx + hw) + 1] = False
    return keep


def psnr_outside(result: np.ndarray, source: np.ndarray, frame: int) -> float:
    """PSNR (dB) of all three planes where no mask can be; inf when identical."""
    keep = outside(frame)
    chroma = keep[::2, ::2].reshape(-1)
    mask = np.concatenate([keep.reshape(-1), chroma, chroma])
    error = float(np.mean((result[mask].astype(np.float64) - source[mask].astype(np.float64)) ** 2))
    return math.inf if error == 0 else 10 * math.log10(255 ** 2 / error)


def never() -> bool:
    return False


class Run:
    """One task carried through the kind in-process, keeping what each stage gave."""

    def __init__(self, tmp_path: Path, source: Path, raw: dict, chunk_seconds: float):
        self.settings = config.load({"CONFIG_FILE": str(tmp_path / "none.yaml")}).with_overrides(
            chunk_seconds=chunk_seconds, storage_dir=tmp_path)
        self.kind = registry.server("faceblur", self.settings)
        self.runner = registry.worker("faceblur", self.settings)
        media = video.media(source)
        self.kind.accepts(media)
        params = self.kind.parameters(raw, media)
        folder = tmp_path / "task"
        folder.mkdir(parents=True, exist_ok=True)
        self.task = TaskView(id=7, kind="faceblur", params=params, facts={}, media=media, folder=folder)
        self.task = replace(self.task, facts=self.kind.prepare(self.task))
        self.jobs = [JobView(id=100 + i, chunk=i, facts=p.facts) for i, p in enumerate(self.kind.plan(self.task))]
        self.sent = self.returned = 0  # body bytes of the jobs and of their results
        self.results: dict[int, dict] = {}

    def job(self, job: JobView) -> tuple[dict, bytes]:
        params, body = self.kind.payload(self.task, job)
        assert len(json.dumps(params)) < 4096
        assert self.runner.problem(params, body) is None
        return self.runner.run(params, body, never)

    def all(self) -> Path:
        for job in self.jobs:
            params, body = self.kind.payload(self.task, job)
            self.sent += len(body)
            result, chunk = self.job(job)
            self.returned += len(chunk)
            assert len(json.dumps(result)) < 4096
            reason = self.kind.check(self.task, job, result, chunk)
            assert reason is None, f"job {job.chunk} refused: {reason}"
            self.kind.keep(self.task, job, result, chunk)
            self.results[job.id] = result
        self.stats = self.kind.merge(self.task, self.jobs)
        self.output = self.kind.output(self.task, "video")
        assert not (self.task.folder / "pieces").exists()
        return self.output.path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "astronaut.mp4")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, clip) -> dict[int, Run]:
    """The clip blurred losslessly in 1, 2 and 4 jobs."""
    done = {}
    for jobs, seconds in CHUNKS.items():
        run = Run(tmp_path_factory.mktemp(f"jobs{jobs}"), clip, LOSSLESS, seconds)
        assert len(run.jobs) == jobs, [(j.facts["start"], j.facts["end"]) for j in run.jobs]
        started = time.monotonic()
        run.all()
        run.seconds = time.monotonic() - started
        done[jobs] = run
    return done


def test_plan_gives_each_job_its_context_and_caps_its_frames():
    keyframes = list(range(0, 1000, 12))
    for window in (1, 5, 25):
        h = window // 2
        jobs = planning.plan_jobs(1000, keyframes, 750, window)
        assert [j["own"][0] for j in jobs[1:]] == [j["own"][1] for j in jobs[:-1]]
        assert jobs[0]["own"][0] == 0 and jobs[-1]["own"][1] == 1000
        for job in jobs:
            start, end = job["own"]
            assert 0 < end - start <= planning.MAX_JOB_FRAMES
            assert (job["start"], job["end"]) == (max(0, start - h), min(1000, end + h))
            assert job["key"] <= job["start"] and job["piece"][1] >= job["end"]
    # starts snap to keyframe + h, so the context opens on the keyframe: no GOP carried for nothing
    jobs = planning.plan_jobs(62, list(range(0, 62, 12)), 31, 5)
    assert [(j["own"], j["key"]) for j in jobs] == [([0, 26], 0), ([26, 62], 24)]


def test_output_is_the_same_for_1_2_and_4_jobs(runs, clip):
    hashes = {jobs: video.frame_hashes(run.output.path) for jobs, run in runs.items()}
    assert len(hashes[1]) == FRAMES
    assert hashes[1] == hashes[2] == hashes[4]
    assert hashes[1] != video.frame_hashes(clip)
    out = runs[4].output.path
    assert video.stream(out, "a:0")["codec_name"] == "aac" and runs[4].output.mimetype == "video/mp4"
    assert [(j.facts["start"], j.facts["context"]) for j in runs[4].jobs] == [
        (0, [0, 16]), (14, [12, 28]), (26, [24, 40]), (38, [36, 62])]
    for jobs, run in runs.items():
        frames = sum(j.facts["frames"] for j in run.jobs)
        wire = run.sent + run.returned  # raw, over the data plane (issue 24): the broker carries control only
        print(f"\n{jobs} job(s): {run.seconds:.1f} s; data-plane bytes per frame: pieces {run.sent / frames:.0f}, "
              f"results {run.returned / frames:.0f}, both {wire / frames:.0f}; raw yuv420p "
              f"{WIDTH * HEIGHT * 3 // 2}, bgr24 {WIDTH * HEIGHT * 3}; source {clip.stat().st_size / FRAMES:.0f}")


def test_every_face_is_blurred_and_nothing_else_is_touched(runs, clip):
    source, result = planes(clip), planes(runs[1].output.path)
    assert len(source) == len(result) == FRAMES
    ratios, psnrs = [], []
    for frame in range(FRAMES):
        ratios.append(sharpness(result[frame], face_box(frame)) / sharpness(source[frame], face_box(frame)))
        psnrs.append(psnr_outside(result[frame], source[frame], frame))
    print(f"\nLaplacian variance in the face box, output / source: max {max(ratios):.3f}, mean "
          f"{sum(ratios) / FRAMES:.3f}; PSNR outside the masks: min {min(psnrs)} dB")
    assert max(ratios) <= 0.2, [(f, round(r, 3)) for f, r in enumerate(ratios) if r > 0.2]
    assert min(psnrs) >= 40
    assert all(value == math.inf for value in psnrs)  # lossless: the source's very pixels


def test_a_frame_where_the_detector_misses_the_face_is_covered_by_smoothing(runs, clip):
    run = runs[2]
    faces = run.stats["faces"]["chart"]  # a short clip: one value per frame
    assert run.stats["faces"]["frames_per_bar"] == 1 and faces[HIDDEN] == 0, "the face painted over is not found"
    assert faces[HIDDEN - 2:HIDDEN] == [1, 1] and faces[HIDDEN + 1:HIDDEN + 3] == [1, 1]
    assert any(j.facts["start"] == HIDDEN for j in run.jobs)  # its earlier neighbours are another job's
    source, result = planes(clip)[HIDDEN], planes(run.output.path)[HIDDEN]
    box = face_box(HIDDEN)
    assert sharpness(result, box) <= 0.2 * sharpness(source, box)


def test_every_frame_has_a_record(runs):
    for run in runs.values():
        assert sum(j.facts["frames"] for j in run.jobs) == FRAMES
        for job in run.jobs:
            result = run.results[job.id]
            assert len(result["ms"]) == len(result["faces"]) == job.facts["frames"]
            assert all(type(v) is int and v >= 0 for v in result["ms"] + result["faces"])
        faces = run.stats["faces"]
        assert faces["max"] == 1 and faces["frames_with_faces"] == FRAMES - 1  # all but the hidden one
        every = json.loads(run.kind.output(run.task, "records").path.read_text())  # the `records` output
        assert every["faces"] == [f for job in run.jobs for f in run.results[job.id]["faces"]] == faces["chart"]
        assert every["ms"] == [m for job in run.jobs for m in run.results[job.id]["ms"]]
        assert run.stats["frames"] == FRAMES and run.stats["ms_per_frame"] > 0
    assert runs[1].stats["faces"] == runs[2].stats["faces"] == runs[4].stats["faces"]


def test_other_modes_mask_only_the_faces(tmp_path, clip):
    for mode in ("mosaic", "solid"):
        run = Run(tmp_path / mode, clip, {"mode": mode, "crf": 0, "window": 1}, 0.64)
        job = run.jobs[0]
        result, chunk = run.job(job)
        assert run.kind.check(run.task, job, result, chunk) is None
        path = tmp_path / f"{mode}.nut"
        path.write_bytes(chunk)
        source, masked = planes(clip)[:job.facts["frames"]], planes(path)
        for frame in range(job.facts["frames"]):
            x1, y1, x2, y2 = face_box(frame)
            assert not np.array_equal(luma(masked[frame])[y1:y2, x1:x2], luma(source[frame])[y1:y2, x1:x2])
            assert psnr_outside(masked[frame], source[frame], frame) == math.inf


def test_parameters_name_the_bad_one(tmp_path, clip):
    kind = registry.server("faceblur", config.load({"CONFIG_FILE": str(tmp_path / "none.yaml")}))
    media = video.media(clip)
    normal = kind.parameters({}, media)
    assert normal == {"mode": "blur", "threshold": normal["threshold"], "mask_scale": 1.6, "window": 5, "crf": 18,
                      "threads": 1}
    assert 0 < normal["threshold"] < 1
    assert kind.parameters({"mask_scale": 2, "threshold": 0.05}, media)["mask_scale"] == 2.0
    for raw, name in [({"mode": "pixelate"}, "mode"), ({"threshold": 1.5}, "threshold"),
                      ({"threshold": 0}, "threshold"), ({"threshold": "high"}, "threshold"),
                      ({"mask_scale": 0.5}, "mask_scale"),
                      ({"window": 4}, "window"), ({"window": 27}, "window"), ({"window": 5.0}, "window"),
                      ({"crf": 52}, "crf"), ({"crf": True}, "crf"), ({"codec": "h264"}, "codec")]:
        with pytest.raises(BadParams, match=name):
            kind.parameters(raw, media)
    described = kind.describe()
    assert {p["name"] for p in described["params"]} == {"mode", "threshold", "mask_scale", "window", "crf"}
    assert kind.route(normal) is None and "libx264" in kind.version(normal) and len(kind.version(normal)) <= 120
    assert runner_module.Runner().offers() == {"": kind.version(normal)}
    with pytest.raises(NotApplicable):
        kind.accepts(video.media(video.make_audio(tmp_path / "tone.m4a")))


def test_runner_refuses_hostile_params_and_the_check_refuses_bad_results(tmp_path, clip):
    run = Run(tmp_path, clip, {"crf": 30, "window": 3}, 0.64)
    job = run.jobs[1]
    params, body = run.kind.payload(run.task, job)
    problem = run.runner.problem
    assert problem(params, body) is None
    assert "mode" in problem({**params, "mode": "-f; rm"}, body)
    assert "threshold" in problem({**params, "threshold": float("nan")}, body)
    assert "window" in problem({**params, "window": 4}, body)
    assert "context" in problem({**params, "context": [0, 10**6]}, body)
    assert "context" in problem({**params, "context": "0-9"}, body)
    assert "frames" in problem({**params, "frames": 10**4, "end": params["start"] + 10**4}, body)
    assert "fps" in problem({**params, "fps": "1/0"}, body)
    assert "empty" in problem(params, b"")
    with pytest.raises(Cancelled):
        run.runner.run(params, body, lambda: True)
    result, chunk = run.runner.run(params, body, never)
    assert run.runner.run(params, body, never)[1] == chunk  # the same job, the same bytes
    assert run.kind.check(run.task, job, result, chunk) is None
    assert "per frame" in run.kind.check(run.task, job, {**result, "faces": result["faces"][1:]}, chunk)
    assert "non-negative" in run.kind.check(run.task, job, {**result, "ms": [-1] * job.facts["frames"]}, chunk)
    reason = run.kind.check(run.task, job, result, run.runner.corrupt(chunk))
    assert reason and ("decode" in reason or "frames" in reason)
    # tamper: the source frames unmasked, structurally perfect; only replicas can tell
    tampered = run.runner.tamper(params, chunk)
    assert tampered != chunk and run.kind.check(run.task, job, result, tampered) is None


# -- through the backbone -------------------------------------------------------------------------

def finished(base: str, task_id: int) -> tuple[dict, bytes]:
    output = transcode_test.finished(base, task_id, timeout=150)
    return get_json(f"{base}/tasks/{task_id}"), output


def blur(base: str, media_id: int) -> int:
    answer = requests.post(f"{base}/tasks", json={"kind": "faceblur", "media_id": media_id, "params": {}},
                           timeout=30)
    assert answer.status_code == 202, answer.text
    return answer.json()["task_id"]


def test_a_worker_killed_mid_job_changes_no_byte(cluster, clip):
    cluster.settings = cluster.settings.with_overrides(chunk_seconds=CHUNKS[4])
    cluster.start_server()
    for _ in range(2):
        cluster.start_worker(WORKER_KINDS="faceblur", WORKER_SLOWDOWN="4")
    cluster.wait_workers(2)
    answer = requests.post(f"{cluster.base}/media", data=clip.read_bytes(), timeout=30,
                           headers={"Content-Type": "application/octet-stream", "X-Filename": clip.name})
    assert answer.status_code == 201, answer.text
    media_id = answer.json()["media_id"]
    task, reference = finished(cluster.base, blur(cluster.base, media_id))
    assert task["jobs_total"] == 4 and task["stats"]["frames"] == FRAMES
    assert len(task["stats"]["faces"]["chart"]) == FRAMES

    task_id = blur(cluster.base, media_id)
    victim = cluster.workers[0]
    doomed = wait_for(lambda: next((w for w in get_json(f"{cluster.base}/workers")
                                    if w["pid"] == victim.pid and w["state"] == "busy"), None), 60, "a busy worker")
    victim.send_signal(signal.SIGKILL)
    again, output = finished(cluster.base, task_id)
    assert output == reference
    assert again["stats"]["faces"] == task["stats"]["faces"]
    moved = [a for a in get_json(f"{cluster.base}/tasks/{task_id}/timeline")
             if a["job_id"] == doomed["job_id"] and a["outcome"] == "done"]
    assert moved and moved[0]["worker"] != doomed["worker"], "the job was finished by the other worker"
