"""The transcode farm: capability routing, the results cache, verified output and what a task cost.

Real server and worker processes on the real broker, real ffmpeg, tiny clips (160x120, 25 fps, a
keyframe every 12 frames) cut by CHUNK_SECONDS 0.5 into jobs of 12 frames. Process start-ups are
the expensive part on two cores, so two deployments are shared module-wide (the conftest's
`settings` and `cluster` are per test), and each test uploads a clip of its own:

- `routed`: a server with the results cache on (CACHE_MB 64) and JOB_DEADLINE_SECONDS 6, one
  worker that takes only H.264 (`WORKER_KINDS=transcode/h264`) and one that takes only VP9.
  No host here can read RAPL through POWERCAP_ROOT, so every joule is `estimated`.
- `guarded`: two honest H.264 workers, the clip's fault-free transcode as the reference; a test
  restarts the server with the VERIFY settings it needs and adds a worker that returns, for its
  first job only, a chunk that decodes cleanly with the right codec, size and frames but shows
  flat grey (`--simulate tamper`). Encoder threads are pinned, so the right output is the
  reference byte for byte. Each honest worker and the tamperer have a broker login of their own
  (replicas vote once per login); a test that needs the tamperer to take given copies freezes
  the honest workers until the broker has closed their connections (`honest_frozen`).

The cache's least-recently-used eviction is tested directly on `ResultCache` with real files.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from subprocess import Popen

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from bench import harness
from src import config
from src.config import Settings
from src.server.cache import ResultCache, Verification, digest, job_key
from tests import video
from tests.conftest import Cluster, delete_queues
from tests.helpers import get, get_json, metric, request, wait_for
from tests.test_identity import worker_logins
from tests.test_transcode import finished, transcode, upload

CHUNK_SECONDS = 0.5
KEYINT = 12  # frames: with CHUNK_SECONDS 0.5 at 25 fps, one job per keyframe interval
DEADLINE = 6.0  # JOB_DEADLINE_SECONDS of the routed farm: how long a task waits for a capable worker
H264 = {"codec": "h264", "crf": 28, "preset": "ultrafast"}
VP9 = {"codec": "vp9", "crf": 40, "preset": "ultrafast"}
AV1 = {"codec": "av1", "crf": 45, "preset": "ultrafast"}


# -- helpers ------------------------------------------------------------------------------


def farm_settings(folder: Path, **values: str) -> Settings:
    """Isolated settings like the conftest's `settings`, for a module-wide deployment."""
    return config.load({
        "CONFIG_FILE": str(folder / "no-config.yaml"), "QUEUE_PREFIX": f"test-{uuid.uuid4().hex[:8]}",
        "STORAGE_DIR": str(folder / "storage"), "BROKER_HEARTBEAT_MS": "2000",
        "MODEL": "demucs_unittest", "MODEL_SEGMENT": "2",  # GET /kinds describes `separate` too
        "SERVER_PORT": str(harness.free_port()), "WORKER_THREADS": "1", "CHUNK_SECONDS": str(CHUNK_SECONDS),
        "DATA_PORT": str(harness.free_port()),  # the data endpoint's, free too (its default is SERVER_PORT + 1)
        "CACHE_MB": "0", "POWERCAP_ROOT": str(folder / "no-powercap"), **values,
    })


_extra_frames = itertools.count()


def clip(folder: Path, seconds: float = 1.0) -> Path:
    """A clip of about `seconds`, each one a frame longer than the last: clips are deterministic, and
    no test may hit the results cache with another test's medium."""
    seconds += next(_extra_frames) / 25
    return video.make_clip(folder / f"clip-{uuid.uuid4().hex[:6]}.mp4", seconds, keyint=KEYINT)


def task_of(base: str, task_id: int) -> dict:
    return get_json(f"{base}/tasks/{task_id}")


def ended(base: str, task_id: int, timeout: float = 60) -> dict:
    """The task once it is done, failed or cancelled."""
    return wait_for(lambda: (t := task_of(base, task_id))["state"] in ("done", "failed", "cancelled") and t,
                    timeout, f"task {task_id} to end")


def sample(base: str, name: str, **labels: str) -> float:
    """A sample of /metrics by its full name and labels (0 when it is not there yet)."""
    text = get(base + "/metrics")[1].decode()
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    return 0.0


def worker_name(base: str, proc: Popen, timeout: float = 60) -> str:
    """The name under which a worker process is on the panel (it is there once this returns)."""
    return wait_for(lambda: next((w["worker"] for w in get_json(f"{base}/workers") if w["pid"] == proc.pid), None),
                    timeout, f"worker pid {proc.pid} on the panel")


def workers_of_jobs(base: str, task_id: int) -> dict[int, set[str]]:
    """Job id -> the workers whose attempt at it is `done` (the task's timeline)."""
    ran: dict[int, set[str]] = defaultdict(set)
    for attempt in get_json(f"{base}/tasks/{task_id}/timeline"):
        if attempt["outcome"] == "done":
            ran[attempt["job_id"]].add(attempt["worker"])
    return dict(ran)


def offer_live(base: str, offer: str) -> bool:
    return any(offer in w["offers"] for w in get_json(f"{base}/workers"))


def stop(proc: Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


# -- the routed farm: one worker per codec, the results cache on ------------------------------------


@dataclass
class Routed:
    cluster: Cluster
    folder: Path
    h264: str  # the workers' names
    vp9: str

    @property
    def base(self) -> str:
        return self.cluster.base


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("routed")
    settings = farm_settings(folder, CACHE_MB="64", JOB_DEADLINE_SECONDS=str(DEADLINE))
    cluster = Cluster(settings, folder)
    try:
        cluster.start_server()
        h264 = cluster.start_worker(WORKER_KINDS="transcode/h264")
        vp9 = cluster.start_worker(WORKER_KINDS="transcode/vp9")
        yield Routed(cluster, folder, worker_name(cluster.base, h264), worker_name(cluster.base, vp9))
    finally:
        cluster.stop()
        delete_queues(settings.queue_prefix)


def test_workers_announce_the_codecs_they_take_with_their_encoder_cores_and_load(routed):
    panel = {w["worker"]: w for w in get_json(f"{routed.base}/workers")}
    h264, vp9 = panel[routed.h264], panel[routed.vp9]
    assert list(h264["offers"]) == ["transcode/h264"] and list(vp9["offers"]) == ["transcode/vp9"]
    assert h264["offers"]["transcode/h264"].startswith("libx264 ffmpeg ")
    assert vp9["offers"]["transcode/vp9"].startswith("libvpx-vp9 ffmpeg ")
    for worker in (h264, vp9):
        assert worker["kinds"] == ["transcode"]
        assert isinstance(worker["cores"], int) and worker["cores"] >= 1
        assert isinstance(worker["load"], int | float) and worker["load"] >= 0


def test_each_codec_s_jobs_run_only_on_the_worker_that_takes_it(routed):
    media = upload(routed.base, clip(routed.folder, 2.0))
    tasks = {"h264": transcode(routed.base, media["media_id"], H264),
             "vp9": transcode(routed.base, media["media_id"], VP9)}
    for codec, task_id in tasks.items():
        finished(routed.base, task_id)
        task = task_of(routed.base, task_id)
        assert task["waiting"] is None and task["stats"]["codec"] == codec
        ran = workers_of_jobs(routed.base, task_id)
        assert len(ran) == task["jobs_total"] >= 3, ran
        expected = routed.h264 if codec == "h264" else routed.vp9
        assert set().union(*ran.values()) == {expected}, f"{codec} jobs ran on {ran}"
        for job_id in ran:
            assert get_json(f"{routed.base}/job/{job_id}")["worker"] == expected
        # no other worker even tried one: every attempt of the timeline is the capable worker's
        assert {a["worker"] for a in get_json(f"{routed.base}/tasks/{task_id}/timeline")} == {expected}
        # and the task's per-worker figures say the same: all of it, by that worker, nothing left
        shares = get_json(f"{routed.base}/tasks/{task_id}/workers")
        assert [w["worker"] for w in shares["workers"]] == [expected], shares
        mine = shares["workers"][0]
        assert mine["jobs_done"] == task["jobs_total"] and mine["alive"] and mine["address"], mine
        frames = mine["seconds_done"] * Fraction(media["video"]["fps"])
        assert round(frames) == media["video"]["frames"] and mine["running"] is None, (mine, media["video"])
        assert shares["pending"] == {"jobs": 0, "seconds": 0}, shares


def test_a_codec_no_live_worker_takes_waits_with_the_reason_then_fails_with_it(routed):
    wait_for(lambda: not offer_live(routed.base, "transcode/av1"), 30, "no av1 worker on the panel")
    media = upload(routed.base, clip(routed.folder, 0.5))
    task_id = transcode(routed.base, media["media_id"], AV1)
    waiting = wait_for(lambda: task_of(routed.base, task_id)["waiting"], 30, "the task to say why it waits")
    seen = time.monotonic()
    assert waiting.startswith("no live worker takes transcode/av1 jobs (live workers take: "), waiting
    assert "transcode/h264" in waiting and "transcode/vp9" in waiting, waiting
    task = task_of(routed.base, task_id)
    assert task["state"] == "running" and task["jobs_done"] == 0 and task["error"] is None
    task = ended(routed.base, task_id, DEADLINE + 30)
    assert task["state"] == "failed"
    assert waiting in task["error"], task["error"]
    assert time.monotonic() - seen >= DEADLINE - 1, "failed only after JOB_DEADLINE_SECONDS without such a worker"
    assert task["waiting"] is None  # an ended task waits for nothing


def test_a_worker_that_joins_in_time_clears_the_waiting_and_runs_the_jobs(routed):
    wait_for(lambda: not offer_live(routed.base, "transcode/av1"), 30, "no av1 worker on the panel")
    media = upload(routed.base, clip(routed.folder, 0.5))
    task_id = transcode(routed.base, media["media_id"], AV1)
    assert wait_for(lambda: task_of(routed.base, task_id)["waiting"], 30, "the task to wait").startswith(
        "no live worker takes transcode/av1 jobs")
    joined = routed.cluster.start_worker(WORKER_KINDS="transcode/av1")
    try:
        name = worker_name(routed.base, joined)
        finished(routed.base, task_id)
        task = task_of(routed.base, task_id)
        assert task["waiting"] is None and task["error"] is None and task["stats"]["codec"] == "av1"
        assert set().union(*workers_of_jobs(routed.base, task_id).values()) == {name}
    finally:
        stop(joined)


def test_a_done_transcode_reports_its_energy_broker_bytes_and_timing(routed):
    joules_before = sample(routed.base, "karaoke_job_joules_total", kind="transcode", source="estimated")
    media = upload(routed.base, clip(routed.folder, 1.0))
    task_id = transcode(routed.base, media["media_id"], {**H264, "crf": 33})
    finished(routed.base, task_id)
    stats = task_of(routed.base, task_id)["stats"]
    energy = stats["energy"]
    assert energy["source"] == "estimated", energy  # no RAPL under POWERCAP_ROOT: CPU seconds x WATTS_PER_CORE
    assert energy["joules"] > 0 and energy["cpu_seconds"] > 0, energy
    assert energy["joules_per_frame"] == pytest.approx(energy["joules"] / stats["frames"], rel=0.01, abs=1e-5)
    assert energy["joules_per_frame"] > 0
    assert stats["broker_bytes"]["jobs"] > 0 and stats["broker_bytes"]["results"] > 0, stats["broker_bytes"]
    assert stats["timing"]["prepare_seconds"] >= 0 and stats["timing"]["merge_seconds"] >= 0, stats["timing"]
    assert stats["cache"] == {"task": False, "jobs": 0, "of": stats["cache"]["of"]} and stats["cache"]["of"] >= 2
    joules = sample(routed.base, "karaoke_job_joules_total", kind="transcode", source="estimated")
    assert joules - joules_before == pytest.approx(energy["joules"], abs=0.01 * stats["cache"]["of"])
    assert sample(routed.base, "karaoke_job_joules_total", kind="transcode", source="measured") == 0


def test_the_same_task_again_is_served_from_the_cache_and_shared_chunks_are_reused(routed):
    path = clip(routed.folder, 2.0)
    media = upload(routed.base, path)
    first_id = transcode(routed.base, media["media_id"], H264)
    first = finished(routed.base, first_id)
    jobs = task_of(routed.base, first_id)["jobs_total"]
    assert jobs >= 3
    published = metric(routed.base, "karaoke_jobs_published")
    cached_tasks = metric(routed.base, "karaoke_tasks_cached")

    # the same medium, the same params: done at once from the cache, nothing published, the same bytes
    again_id = transcode(routed.base, media["media_id"], H264)
    assert finished(routed.base, again_id, timeout=20) == first
    again = task_of(routed.base, again_id)
    assert again["stats"]["cache"] == {"task": True, "jobs": 0, "of": 0}
    assert again["stats"]["energy"]["source"] == "cached" and again["stats"]["energy"]["joules"] == 0
    assert again["stats"]["frames"] == task_of(routed.base, first_id)["stats"]["frames"]
    assert metric(routed.base, "karaoke_tasks_cached") == cached_tasks + 1
    assert metric(routed.base, "karaoke_jobs_published") == published

    # the same file uploaded again is a new medium with the same content: a hit too
    copy = routed.folder / f"copy-{path.name}"
    copy.write_bytes(path.read_bytes())
    reuploaded = upload(routed.base, copy)
    assert reuploaded["media_id"] != media["media_id"]
    assert finished(routed.base, transcode(routed.base, reuploaded["media_id"], H264), timeout=20) == first
    assert metric(routed.base, "karaoke_tasks_cached") == cached_tasks + 2
    assert metric(routed.base, "karaoke_jobs_published") == published

    # another container, the same codec params: every chunk reused, a new stitch
    mkv_id = transcode(routed.base, media["media_id"], {**H264, "container": "mkv"})
    mkv = finished(routed.base, mkv_id, timeout=30)
    stats = task_of(routed.base, mkv_id)["stats"]
    assert stats["cache"] == {"task": False, "jobs": jobs, "of": jobs}
    assert metric(routed.base, "karaoke_jobs_published") == published
    assert metric(routed.base, "karaoke_tasks_cached") == cached_tasks + 2
    out = routed.folder / f"{mkv_id}.mkv"
    out.write_bytes(mkv)
    assert "matroska" in video.probe(out, "-show_format")["format"]["format_name"]
    mp4 = routed.folder / f"{first_id}.mp4"
    mp4.write_bytes(first)
    assert video.frame_hashes(out) == video.frame_hashes(mp4), "the same chunks, only the container differs"

    # another crf: nothing to reuse
    other_id = transcode(routed.base, media["media_id"], {**H264, "crf": 30})
    finished(routed.base, other_id)
    assert task_of(routed.base, other_id)["stats"]["cache"] == {"task": False, "jobs": 0, "of": jobs}
    assert metric(routed.base, "karaoke_jobs_published") == published + jobs


def test_reset_empties_the_cache(routed):
    path = clip(routed.folder, 1.0)
    media = upload(routed.base, path)
    first_id = transcode(routed.base, media["media_id"], {**H264, "crf": 35})
    first = finished(routed.base, first_id)
    status, body = request("POST", f"{routed.base}/reset")
    assert status == 200, body
    published = metric(routed.base, "karaoke_jobs_published")
    cached_tasks = metric(routed.base, "karaoke_tasks_cached")
    media = upload(routed.base, path)  # every medium went with the reset
    task_id = transcode(routed.base, media["media_id"], {**H264, "crf": 35})
    assert finished(routed.base, task_id) == first, "done again, to the same bytes"
    task = task_of(routed.base, task_id)
    assert task["stats"]["cache"] == {"task": False, "jobs": 0, "of": task["jobs_total"]}
    assert metric(routed.base, "karaoke_jobs_published") == published + task["jobs_total"]
    assert metric(routed.base, "karaoke_tasks_cached") == cached_tasks


# -- the cache's eviction, directly ------------------------------------------------------------


def test_the_cache_evicts_least_recently_used_entries_and_stays_within_its_limit(tmp_path):
    limit = 1  # MB
    cache = ResultCache(tmp_path / "cache", limit)
    size = 300 * 1024
    bodies = {name: os.urandom(size) for name in ("a", "b", "c")}
    digests = {name: digest("transcode", {"chunk": name}, body) for name, body in bodies.items()}

    def stored() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*")
                   if p.is_file() and not p.name.startswith("index.sqlite3"))

    for name in ("a", "b", "c"):
        cache.keep_job(digests[name], "v1", {"chunk": name}, bodies[name], Verification())
        time.sleep(0.01)  # distinct use times
    assert stored() == 3 * size <= limit << 20
    assert cache.job(digests["a"], {"v1"})[1] == bodies["a"]  # a is now the most recently used: b is the oldest
    time.sleep(0.01)

    folder = tmp_path / "task"
    folder.mkdir()
    merged = folder / "video.mp4"
    merged.write_bytes(os.urandom(250 * 1024))  # 1150 KB in all: one entry must go
    cache.keep_task("task-key", folder, [merged], {"stats": {"frames": 1}}, Verification())
    assert cache.job(digests["b"], {"v1"}) is None, "the least recently used entry went first"
    assert not (tmp_path / "cache" / job_key(digests["b"], "v1")[:2] / job_key(digests["b"], "v1")).exists()
    assert cache.job(digests["a"], {"v1"}) is not None and cache.job(digests["c"], {"v1"}) is not None
    assert stored() == 3 * size - size + 250 * 1024 <= limit << 20
    restored = tmp_path / "restored"
    assert cache.task(["task-key"], restored) == {"stats": {"frames": 1, "verify": {
        "source": "cache", "passed": {"verify": "off", "psnr": None, "replicas": 1, "sample": 0.0}}}}
    assert (restored / "video.mp4").read_bytes() == merged.read_bytes()

    # a version the result was not made with is a miss; an entry larger than the cache is not kept
    assert cache.job(digests["a"], {"v2"}) is None
    cache.keep_job(digest("transcode", {}, b"big"), "v1", {}, os.urandom((limit << 20) + 1), Verification())
    assert cache.job(digest("transcode", {}, b"big"), {"v1"}) is None
    assert stored() <= limit << 20

    cache.clear()
    assert cache.job(digests["a"], {"v1"}) is None and cache.task(["task-key"], tmp_path / "again") is None
    assert stored() == 0
    cache.close()


# -- the guarded farm: two honest workers, a tampering one joins per test ---------------------------


@dataclass
class Guarded:
    cluster: Cluster
    settings: Settings  # the server's settings before any test's overrides
    media: dict
    reference: bytes  # the fault-free output
    logins: list[tuple[str, str]]  # the two honest workers', then the tamperer's

    @property
    def tampering_login(self) -> str:
        return self.logins[2][0]

    @property
    def base(self) -> str:
        return self.cluster.base

    def serve(self, **overrides) -> None:
        """Run the server with these settings (restarted only when they change); the honest workers stay."""
        wanted = self.settings.with_overrides(**overrides)
        if wanted != self.cluster.settings:
            self.cluster.server.kill()
            self.cluster.server.wait(10)
            self.cluster.settings = wanted
            self.cluster.start_server()
        for honest in self.cluster.workers[:2]:
            worker_name(self.base, honest)

    def tamperer(self) -> tuple[Popen, str]:
        """A worker that returns a flat grey chunk for its first job; on the panel when this returns.
        Every tamperer started shares one broker login (as many workers on one host would)."""
        user, password = self.logins[2]
        proc = self.cluster.start_worker("--simulate", "tamper", WORKER_KINDS="transcode/h264",
                                         BROKER_WORKER_USER=user, BROKER_WORKER_PASSWORD=password)
        return proc, worker_name(self.base, proc)

    @contextlib.contextmanager
    def honest_frozen(self):
        """The honest workers frozen (SIGSTOP) in the block, once the broker closed their connections
        (no job waits in a frozen worker's socket): what is published meanwhile goes to the others."""
        honest = self.cluster.workers[:2]
        for proc in honest:
            proc.send_signal(signal.SIGSTOP)
        try:
            jobs = f"{self.cluster.settings.queue_prefix}.jobs.transcode.h264"
            wait_for(lambda: consumers(jobs) == 0, 60, "the broker to drop the frozen workers")
            yield
        finally:
            for proc in honest:
                proc.send_signal(signal.SIGCONT)

    def transcode(self) -> tuple[int, bytes]:
        task_id = transcode(self.base, self.media["media_id"], H264)
        return task_id, finished(self.base, task_id)


def consumers(queue: str) -> int:
    """Consumers of a queue, from the management API (as the conftest reads it)."""
    answer = requests.get(f"http://localhost:15672/api/queues/%2F/{queue}", auth=("guest", "guest"), timeout=30)
    # a queue's figures appear a moment after the queue does: no "consumers" yet means not known yet
    return answer.json().get("consumers", -1) if answer.status_code == 200 else -1


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("guarded")
    settings = farm_settings(folder)
    cluster = Cluster(settings, folder)
    with worker_logins(settings, 3) as logins:
        try:
            cluster.start_server()
            for user, password in logins[:2]:
                worker_name(cluster.base, cluster.start_worker(WORKER_KINDS="transcode/h264", BROKER_WORKER_USER=user,
                                                               BROKER_WORKER_PASSWORD=password))
            media = upload(cluster.base, clip(folder, 2.0))
            reference_id = transcode(cluster.base, media["media_id"], H264)
            reference = finished(cluster.base, reference_id)
            assert task_of(cluster.base, reference_id)["jobs_total"] >= 3  # so that each of 3 workers gets one
            yield Guarded(cluster, settings, media, reference, logins)
        finally:
            cluster.stop()
            delete_queues(settings.queue_prefix)


def test_without_verification_a_tampered_chunk_is_accepted_and_spoils_the_output(guarded, tmp_path):
    guarded.serve(verify="off", verify_replicas=1)
    tamperer, name = guarded.tamperer()
    try:
        task_id, output = guarded.transcode()
    finally:
        stop(tamperer)
    assert name in set().union(*workers_of_jobs(guarded.base, task_id).values()), "the tamperer ran a job"
    assert metric(guarded.base, "karaoke_results_refused") == 0
    assert output != guarded.reference, "a plausible chunk passes every structural check"
    spoiled, reference = tmp_path / "spoiled.mp4", tmp_path / "reference.mp4"
    spoiled.write_bytes(output)
    reference.write_bytes(guarded.reference)
    assert len(video.frame_hashes(spoiled)) == len(video.frame_hashes(reference)), "the same frame count"
    assert video.psnr(spoiled, reference) < 30, "but some frames are grey"


def test_psnr_verification_refuses_a_tampered_chunk_and_the_output_is_the_fault_free_one(guarded):
    guarded.serve(verify="psnr")
    tamperer, name = guarded.tamperer()
    try:
        task_id, output = guarded.transcode()
    finally:
        stop(tamperer)
    assert metric(guarded.base, "karaoke_results_refused") >= 1
    assert output == guarded.reference
    failed = [a for a in get_json(f"{guarded.base}/tasks/{task_id}/timeline") if a["outcome"] == "failed"]
    assert [a["worker"] for a in failed] == [name], failed
    done = workers_of_jobs(guarded.base, task_id)
    assert len(done) == task_of(guarded.base, task_id)["jobs_total"], "the refused job ran again (on any worker)"
    assert "below VERIFY_MIN_PSNR 30 dB" in guarded.cluster.log("server")


@dataclass
class Replicated:
    task: dict
    timeline: list[dict]
    output: bytes
    tamperer: str
    outvoted_metric: float


@pytest.fixture(scope="module")
def replicated(guarded) -> Replicated:
    """The clip transcoded with VERIFY_REPLICAS=2 by three workers, one of which tampers.

    The extra copy published for a job whose two copies disagree goes to whichever worker is
    free, often one that already voted on it: that copy counts once and costs the job none of
    its MAX_ATTEMPTS (3 here), so the job waits for the third worker instead of failing."""
    guarded.serve(verify_replicas=2)
    tamperer, name = guarded.tamperer()
    try:
        task_id, output = guarded.transcode()
    finally:
        stop(tamperer)
    timeline = get_json(f"{guarded.base}/tasks/{task_id}/timeline")  # checked against the API document
    return Replicated(task_of(guarded.base, task_id), timeline, output, name,
                      metric(guarded.base, "karaoke_results_outvoted"))


def test_with_two_replicas_a_tampered_chunk_is_outvoted_and_the_output_is_the_fault_free_one(guarded, replicated):
    assert replicated.output == guarded.reference
    verify = replicated.task["stats"]["verify"]
    assert verify["replicas"] == 2
    assert [o["login"] for o in verify["outvoted"]] == [guarded.tampering_login], verify
    ran: dict[int, set[str]] = defaultdict(set)
    for attempt in replicated.timeline:
        if attempt["outcome"] in ("done", "voted"):
            ran[attempt["job_id"]].add(attempt["worker"])
    assert len(ran) == replicated.task["jobs_total"]
    assert all(len(workers) >= 2 for workers in ran.values()), f"every job ran on 2 different workers: {ran}"
    assert replicated.tamperer in ran[verify["outvoted"][0]["job_id"]]


def test_an_outvoted_result_is_counted_in_the_metrics(replicated):
    assert replicated.outvoted_metric >= 1


# -- votes by broker login, and the cache under a stricter verification --------------------------------


def test_one_login_announcing_two_worker_names_gets_one_vote_and_cannot_win(guarded):
    """VERIFY_REPLICAS=3. Two tampering workers of one login take the first two copies of the first
    job (the honest ones are frozen): by name they were 2 of 3 and won with grey frames; by login
    they are one vote, and the job waits for the honest logins."""
    guarded.serve(verify="off", verify_replicas=3)
    with guarded.honest_frozen():
        tamperers = [guarded.tamperer(), guarded.tamperer()]
        try:
            task_id = transcode(guarded.base, guarded.media["media_id"], H264)
            names = {name for _, name in tamperers}

            def both_answered() -> bool:
                answered = {a["worker"] for a in get_json(f"{guarded.base}/tasks/{task_id}/timeline")
                            if a["outcome"] in ("done", "voted")}
                return names <= answered

            wait_for(both_answered, 120, "both tamperers' first copies in")
        except BaseException:
            for proc, _ in tamperers:
                stop(proc)
            raise
    try:
        output = finished(guarded.base, task_id)
        task = task_of(guarded.base, task_id)
    finally:
        for proc, _ in tamperers:
            stop(proc)
    assert output == guarded.reference, "the tampering login's two names outvoted the honest workers"
    verify = task["stats"]["verify"]
    assert verify["replicas"] == 3 and verify["source"] == "workers"
    assert {o["login"] for o in verify["outvoted"]} == {guarded.tampering_login}, verify
    assert "a second copy from the same login counts once" in guarded.cluster.log("server")


def test_a_result_cached_without_verification_is_never_served_under_a_stricter_one(guarded):
    """A task tampered with while VERIFY was off is cached, whole and per job; after a restart with
    VERIFY=psnr, then VERIFY_SAMPLE=1, then VERIFY_REPLICAS=2, neither is served; under VERIFY off again the
    strictest run's entry is, and its stats say where it came from and what it passed."""
    media = upload(guarded.base, clip(guarded.cluster.log_dir, 2.0))  # nothing of it cached yet
    guarded.serve(verify="off", verify_replicas=1, cache_mb=64)
    with guarded.honest_frozen():
        proc, _ = guarded.tamperer()
        try:
            spoiled_id = transcode(guarded.base, media["media_id"], H264)
            spoiled = finished(guarded.base, spoiled_id)
        finally:
            stop(proc)
    assert task_of(guarded.base, spoiled_id)["stats"]["verify"]["passed"]["verify"] == "off"

    def run(**settings) -> tuple[bytes, dict]:
        guarded.serve(cache_mb=64, **settings)  # a restart: the cache is read back from STORAGE_DIR
        task_id = transcode(guarded.base, media["media_id"], H264)
        return finished(guarded.base, task_id), task_of(guarded.base, task_id)["stats"]

    checked, stats = run(verify="psnr", verify_replicas=1)
    assert stats["cache"] == {"task": False, "jobs": 0, "of": stats["cache"]["of"]}, stats["cache"]
    assert stats["verify"]["source"] == "workers" and stats["verify"]["passed"]["verify"] == "psnr"
    assert checked != spoiled, "the task accepted unverified was served under VERIFY=psnr"

    sampled, stats = run(verify="off", verify_replicas=1, verify_sample=1)  # every chunk decoded in full
    assert sampled == checked, "the task accepted with no chunk sampled was served under VERIFY_SAMPLE=1"
    assert stats["verify"]["passed"]["sample"] == 1, stats["verify"]

    voted, stats = run(verify="off", verify_replicas=2)
    assert stats["cache"]["task"] is False and stats["cache"]["jobs"] == 0, stats["cache"]
    assert stats["verify"]["passed"]["replicas"] == 2 and voted == checked

    again, stats = run(verify="off", verify_replicas=1)  # the weakest setting: the strongest entry serves it
    assert stats["cache"]["task"] is True and again == voted
    assert stats["verify"]["source"] == "cache" and stats["verify"]["passed"]["replicas"] == 2, stats["verify"]
