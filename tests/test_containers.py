"""The compose stack from `make images`' images runs a song and a video, survives a killed worker, scales and restarts.

Images: tools/images.sh builds them once per run (session fixture; a warm engine reuses its
layer cache): the base image from Debian's packages (karaoke-base:bookworm, mmdebstrap and
`docker import`), the server, both worker images on it, and the broker from Debian's
rabbitmq-server (karaoke-rabbitmq:debian, standing in for rabbitmq:3.13-management, which no
registry serves here). The stack is docker-compose.yml as `make stack` starts it, under a
compose project of its own, with the test's settings (the tiny demucs_unittest model, short
chunks, slowed workers so that a kill lands mid-job) and free host ports, except the server's
5000 when it is free.

What it proves, through the server's published port only:
1. `up` with two separation worker containers: a song comes out equal to whole-file demucs
   in this process (SDR, as tests/test_fidelity.py), though the container of a worker busy
   with one of its jobs is killed (`docker kill`): the job moves to the other worker and is
   applied once.
2. `--scale worker=2 --scale worker-video=1` brings the killed container back and adds a
   video worker (the image without torch): three on `/workers`. A lossless transcode comes
   out with every input frame (tests/test_transcode.py's check) and a faceblur task, which
   only the video worker can run, with every frame too.
3. `down` and `up` again: the volumes kept the server's storage and the broker's data; the
   earlier tasks are done and serve the same bytes.

Skipped, with the reason, only where no Docker engine can start (tools/docker-engine.sh, as
.ci/run starts it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bench import harness
from tests import video
from tests.conftest import ARTIFACTS, ROOT
from tests.helpers import get, get_json, post_json, reference_stems, sdr, served_stems, upload, wait_for
from tests.test_faults import wait_state
from tests.test_transcode import finished, transcode
from tests.test_transcode import upload as upload_media

pytestmark = [pytest.mark.containers, pytest.mark.chaos,
              # a cold build (no image yet) takes minutes on two cores: above the suite's 900 s per test
              pytest.mark.timeout(2400)]

IMAGES = {"base": "karaoke-base:bookworm", "server": "karaoke-server:latest",
          "worker": "karaoke-worker-separate:latest", "worker-video": "karaoke-worker-video:latest",
          "broker": "karaoke-rabbitmq:debian"}
LOSSLESS = {"codec": "h264", "crf": 0, "preset": "ultrafast"}


def run(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """The images, built once per run; skipped with the reason where no Docker engine can start."""
    engine = subprocess.run([str(ROOT / "tools/docker-engine.sh")], capture_output=True, text=True, timeout=600)
    if engine.returncode != 0:
        pytest.skip(f"no Docker engine can start here: {(engine.stderr or engine.stdout).strip()[-500:]}")
    started = time.monotonic()
    built = run(str(ROOT / "tools/images.sh"), timeout=2400)
    print(f"\n  IMAGES built in {time.monotonic() - started:.0f} s:\n  " + built.stdout.strip().replace("\n", "\n  "))
    return IMAGES


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


class Stack:
    """docker-compose.yml under a compose project of this test's own."""

    def __init__(self, tmp_path: Path):
        if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
            self.compose = ["docker", "compose"]
        else:
            assert shutil.which("docker-compose"), "neither `docker compose` nor `docker-compose` is installed"
            self.compose = ["docker-compose"]
        self.project = f"karaoke-test-{uuid.uuid4().hex[:8]}"
        self.port = 5000 if port_free(5000) else harness.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(tmp_path),  # no docker client configuration of the caller's
            "COMPOSE_PROJECT_NAME": self.project,
            "BROKER_IMAGE": IMAGES["broker"],
            "SERVER_PORT": str(self.port),
            "STACK_BROKER_PORT": str(harness.free_port()),
            "STACK_MANAGEMENT_PORT": str(harness.free_port()),
            "STACK_DATA_PORT": str(harness.free_port()),
            "MODEL": "demucs_unittest",
            "MODEL_SEGMENT": "2",
            "CHUNK_SECONDS": "3",
            "BROKER_HEARTBEAT_MS": "2000",
            "WORKER_THREADS": "1",
            # jobs last long enough for a kill to land mid-job
            "WORKER_SLOWDOWN": "6",
            "CACHE_MB": "0",
        }

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run(*self.compose, "-f", str(ROOT / "docker-compose.yml"), *args, timeout=timeout, env=self.env)

    def up(self, workers: int, video_workers: int) -> None:
        self("up", "-d", "--scale", f"worker={workers}", "--scale", f"worker-video={video_workers}")

        def healthy():
            try:
                return get(self.base + "/health")[0] == 200
            except OSError:
                return False

        wait_for(healthy, 300, f"the server on port {self.port}", interval=1)

    def workers(self, count: int) -> list[dict]:
        def enough():
            workers = get_json(self.base + "/workers")
            return workers if len(workers) >= count else None

        return wait_for(enough, 300, f"{count} workers on /workers", interval=1)

    def logs(self) -> str:
        done = subprocess.run([*self.compose, "-f", str(ROOT / "docker-compose.yml"), "logs", "--no-color",
                               "--tail", "60"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=self.env)
        return done.stdout[-12000:]

    def down(self, volumes: bool = False) -> None:
        self("down", *(["-v"] if volumes else []), "--remove-orphans", timeout=300)


@pytest.fixture
def stack(images, tmp_path: Path) -> Iterator[Stack]:
    running = Stack(tmp_path)
    try:
        yield running
    finally:
        ARTIFACTS.mkdir(exist_ok=True)  # what the containers said, for a failure's reader
        (ARTIFACTS / "containers-compose.log").write_text(running.logs())
        running.down(volumes=True)


def busy(base: str, music_id: int) -> dict:
    """A worker busy with a job of the song."""
    def found():
        jobs = {a["job_id"] for a in get_json(f"{base}/music/{music_id}/timeline")}
        return next((w for w in get_json(f"{base}/workers") if w["state"] == "busy" and w["job_id"] in jobs), None)

    return wait_for(found, 120, "a worker busy with the song", interval=0.2)


def sha256(url: str) -> str:
    answer = requests.get(url, timeout=60)
    assert answer.status_code == 200, url
    return hashlib.sha256(answer.content).hexdigest()


def test_the_compose_stack_runs_survives_a_killed_worker_scales_and_restarts(stack, make_song, tmp_path, capsys):
    base = stack.base
    up_at = time.monotonic()
    stack.up(workers=2, video_workers=0)
    for worker in stack.workers(2):  # a worker's host name is its container's id
        assert run("docker", "inspect", "-f", "{{.Config.Image}}", worker["host"]).stdout.strip() == IMAGES["worker"]

    # 1. A song through two separation workers; the container of one busy with it is killed.
    song = make_song(10.0, "wav")
    music = upload(base, song)
    status, _ = post_json(f"{base}/music/{music['music_id']}", [t["track_id"] for t in music["tracks"]])
    assert status == 200
    doomed = busy(base, music["music_id"])
    run("docker", "kill", doomed["host"])
    done = wait_state(base, music["music_id"], "done", timeout=300)
    first_done = time.monotonic() - up_at
    timeline = get_json(f"{base}/music/{music['music_id']}/timeline")
    lost = [a for a in timeline if a["worker"] == doomed["worker"] and a["job_id"] == doomed["job_id"]]
    assert lost and lost[0]["outcome"] in ("lost", "running"), timeline
    assert [a["outcome"] for a in timeline if a["job_id"] == doomed["job_id"] and a["worker"] != doomed["worker"]] \
        == ["done"], "the killed worker's job was done again by the other worker"
    reference = reference_stems(song)  # whole-file demucs in this process: the fault-free result
    stems = served_stems(base, music["music_id"])
    for name, stem in stems.items():
        assert stem.shape == reference[name].shape, name
        assert sdr(reference[name], stem) >= 60, name
    jobs = [get_json(f"{base}/job/{j}") for j in get_json(f"{base}/job")]
    assert [j["state"] for j in jobs] == ["done"] * done["jobs_total"], "each job applied once"

    # 2. Three workers: the killed container back, and a video worker (no torch) added.
    stack.up(workers=2, video_workers=1)
    three = stack.workers(3)
    assert len(three) == 3, three
    kinds = sorted(sorted(w["kinds"]) for w in three)
    assert kinds.count(["faceblur", "transcode"]) == 1, kinds
    video_worker = next(w for w in three if "faceblur" in w["kinds"])
    assert run("docker", "inspect", "-f", "{{.Config.Image}}", video_worker["host"]).stdout.strip() \
        == IMAGES["worker-video"]
    assert run("docker", "exec", video_worker["host"], "python3", "-c",
               "import importlib.util as u; print(u.find_spec('torch') is None)").stdout.strip() == "True"
    clip = video.make_clip(tmp_path / "clip.mp4", 4.2)  # 105 frames: two 3-second jobs, the last partial
    media = upload_media(base, clip)
    task_id = transcode(base, media["media_id"], LOSSLESS)
    out = tmp_path / "out.mp4"
    out.write_bytes(finished(base, task_id, timeout=300))
    assert int(video.stream(out)["nb_read_packets"]) == media["video"]["frames"] == 105
    assert video.frame_hashes(out) == video.frame_hashes(clip), "every input frame, decoded, once"
    answer = requests.post(f"{base}/tasks", json={"kind": "faceblur", "media_id": media["media_id"], "params": {}},
                           timeout=30)
    assert answer.status_code == 202, answer.text
    blurred_id = answer.json()["task_id"]
    blurred = tmp_path / "blurred.mp4"
    blurred.write_bytes(finished(base, blurred_id, timeout=300))
    assert int(video.stream(blurred)["nb_read_packets"]) == 105
    assert {a["worker"] for a in get_json(f"{base}/tasks/{blurred_id}/timeline")} == {video_worker["worker"]}

    # 3. down, up: the earlier tasks are done and serve the same bytes.
    served = {"video": sha256(get_json(f"{base}/tasks/{task_id}")["outputs"][0]["url"]),
              "song": {i["name"]: sha256(i["track"] + "?format=wav")
                       for i in get_json(f"{base}/music/{music['music_id']}")["instruments"]}}
    stack.down()
    stack.up(workers=1, video_workers=0)
    again = get_json(f"{base}/tasks/{task_id}")
    assert again["state"] == "done"
    assert sha256(again["outputs"][0]["url"]) == served["video"]
    song_again = get_json(f"{base}/music/{music['music_id']}")
    assert song_again["state"] == "done"
    assert {i["name"]: sha256(i["track"] + "?format=wav") for i in song_again["instruments"]} == served["song"]
    stack.workers(1)  # the broker kept the logins: a worker logs in again

    with capsys.disabled():
        print(f"\n  CONTAINERS images {IMAGES}; up to the first finished task (the song, a worker killed): "
              f"{first_done:.0f} s")
