"""`transcode` through the whole backbone: real server and worker processes, the real broker.

One small clip (testsrc2 + a sine, H.264/AAC, a keyframe a second, 6.2 s: not a multiple of
the 2-second chunks) is transcoded fault-free once; then the same task runs again while a
fault strikes, and the output must be byte for byte the same file. Workers are slowed
(WORKER_SLOWDOWN) so that a fault lands mid-chunk.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import requests

from tests import video
from tests.helpers import get_json, metric, wait_for

SLOW = {"WORKER_SLOWDOWN": "25"}
PARAMS = {"codec": "h264", "crf": 28, "preset": "veryfast"}


def upload(base: str, path: Path) -> dict:
    answer = requests.post(f"{base}/media", data=path.read_bytes(), timeout=30,
                           headers={"Content-Type": "application/octet-stream", "X-Filename": path.name})
    assert answer.status_code == 201, answer.text
    return answer.json()


def transcode(base: str, media_id: int, params: dict = PARAMS) -> int:
    answer = requests.post(f"{base}/tasks", json={"kind": "transcode", "media_id": media_id, "params": params},
                           timeout=30)
    assert answer.status_code == 202, answer.text
    return answer.json()["task_id"]


def finished(base: str, task_id: int, timeout: float = 180) -> bytes:
    """The task's output once done (the test fails if the task fails)."""
    def done():
        task = get_json(f"{base}/tasks/{task_id}")
        assert task["state"] not in ("failed", "cancelled"), task["error"]
        return task if task["state"] == "done" else None

    task = wait_for(done, timeout, f"task {task_id} to be done")
    answer = requests.get(task["outputs"][0]["url"], timeout=30)
    assert answer.status_code == 200
    return answer.content


def busy(base: str, pid: int) -> dict:
    return wait_for(lambda: next((w for w in get_json(f"{base}/workers") if w["pid"] == pid and w["state"] == "busy"),
                                 None), 60, f"worker {pid} busy")


@pytest.fixture
def farm(cluster, tmp_path: Path):
    """A server, two slowed workers, a clip uploaded and its fault-free transcode: (cluster, media, bytes)."""
    cluster.settings = cluster.settings.with_overrides(chunk_seconds=2.0)
    cluster.start_server()
    cluster.start_worker(**SLOW)
    cluster.start_worker(**SLOW)
    cluster.wait_workers(2)
    clip = video.make_clip(tmp_path / "clip.mp4", 6.2)
    media = upload(cluster.base, clip)
    reference = finished(cluster.base, transcode(cluster.base, media["media_id"]))
    return cluster, media, reference, clip


def test_the_output_is_frame_exact_and_in_sync(farm, tmp_path):
    cluster, media, reference, clip = farm
    out = tmp_path / "out.mp4"
    out.write_bytes(reference)
    source, result, sound = video.stream(clip), video.stream(out), video.stream(out, "a:0")
    assert int(result["nb_read_packets"]) == int(source["nb_read_packets"]) == media["video"]["frames"] == 155
    assert abs(float(result["duration"]) - float(source["duration"])) < 1 / 25
    assert abs(float(sound["duration"]) - float(result["duration"])) < 1 / 25, "audio in sync, no gap"
    assert video.frame_hashes(out)[:1] != [] and len(video.frame_hashes(out)) == 155
    task = get_json(f"{cluster.base}/tasks")[0]
    assert task["stats"]["frames"] == 155 and task["jobs_total"] >= 3
    assert all(a["outcome"] == "done" for a in get_json(f"{cluster.base}/tasks/{task['task_id']}/timeline"))


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_worker_killed_or_frozen_mid_chunk_changes_no_byte(farm, fault):
    cluster, media, reference, _ = farm
    task_id = transcode(cluster.base, media["media_id"])
    victim = cluster.workers[0]
    doomed = busy(cluster.base, victim.pid)
    victim.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    assert finished(cluster.base, task_id) == reference
    moved = [a for a in get_json(f"{cluster.base}/tasks/{task_id}/timeline")
             if a["job_id"] == doomed["job_id"] and a["outcome"] == "done"]
    assert moved and moved[0]["worker"] != doomed["worker"], "the job was finished by the other worker"


def test_a_server_restarted_mid_task_finishes_it(farm):
    cluster, media, reference, _ = farm
    task_id = transcode(cluster.base, media["media_id"])
    wait_for(lambda: get_json(f"{cluster.base}/tasks/{task_id}")["jobs_done"] >= 1, 90, "a first chunk")
    cluster.server.kill()
    cluster.server.wait()
    time.sleep(2)  # results wait in the durable results queue meanwhile
    cluster.start_server()
    assert finished(cluster.base, task_id) == reference


def test_a_corrupt_chunk_is_refused_and_done_again(farm):
    cluster, media, reference, _ = farm
    cluster.start_worker("--simulate", "corrupt")
    cluster.wait_workers(3)
    refused_before = metric(cluster.base, "karaoke_results_refused")
    task_id = transcode(cluster.base, media["media_id"])
    assert finished(cluster.base, task_id) == reference
    assert metric(cluster.base, "karaoke_results_refused") == refused_before + 1
    assert "refused by the transcode check" in cluster.log("server")


def test_a_cancelled_task_stops_and_the_next_one_is_unchanged(farm):
    cluster, media, reference, _ = farm
    task_id = transcode(cluster.base, media["media_id"])
    busy(cluster.base, cluster.workers[0].pid)
    cancelled = requests.delete(f"{cluster.base}/tasks/{task_id}", timeout=10).json()
    assert cancelled["state"] == "cancelled"
    wait_for(lambda: all(w["state"] == "idle" for w in get_json(f"{cluster.base}/workers")), 60, "workers idle")
    assert get_json(f"{cluster.base}/tasks/{task_id}")["state"] == "cancelled"
    assert requests.get(f"{cluster.base}/tasks/{task_id}/outputs/video", timeout=10).status_code == 409
    assert finished(cluster.base, transcode(cluster.base, media["media_id"])) == reference


def test_bad_params_and_audio_only_media_are_refused_with_the_reason(farm, make_song):
    cluster, media, _, _ = farm
    for params, word in [({"codec": "mpeg1"}, "codec"), ({"crf": 20, "bitrate": "1M"}, "bitrate"),
                         ({"codec": "h264", "container": "webm"}, "container"), ({"height": "tall"}, "height")]:
        answer = requests.post(f"{cluster.base}/tasks", json={"kind": "transcode", "media_id": media["media_id"],
                                                              "params": params}, timeout=10)
        assert answer.status_code == 400 and word in answer.json()["error"], (params, answer.text)
    song = upload(cluster.base, make_song(2.0, "mp3"))
    answer = requests.post(f"{cluster.base}/tasks", json={"kind": "transcode", "media_id": song["media_id"]},
                           timeout=10)
    assert answer.status_code == 422, answer.text
    assert requests.post(f"{cluster.base}/tasks", json={"kind": "transcode", "media_id": 999999},
                         timeout=10).status_code == 404
    kinds = {k["name"]: k for k in get_json(f"{cluster.base}/kinds")}
    assert {"separate", "transcode"} <= set(kinds)
    codec = next(p for p in kinds["transcode"]["params"] if p["name"] == "codec")
    assert set(codec["choices"]) == {"h264", "hevc", "vp9", "av1"}
    assert json.dumps(kinds)  # JSON all through
