"""The watch folder through the whole backbone: a real server process (its own WATCH_DIR) and a
real transcode worker on the real broker.

A 2-second clip (160x120, 25 fps, a keyframe a second) cut into 2-job tasks by CHUNK_SECONDS 1.
Files are dropped into WATCH_DIR as a user would; the tests look only at the folders (and, for
the restart, at the ledger to stop the server at a chosen step) and at the server's HTTP answers.
The farm is module-wide: the restart test runs last and kills the server and the worker.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from bench import harness
from src import config
from src.server import create_app
from tests import video
from tests.conftest import Cluster, delete_queues
from tests.helpers import get_json, services_of, wait_for

FRAMES = 50  # 2 s at 25 fps
TRANSCODE = {"WORKER_KINDS": "transcode"}


class Farm:
    def __init__(self, cluster: Cluster, clip: Path):
        self.cluster, self.clip = cluster, clip
        self.watch = cluster.settings.watch_dir
        self.done, self.originals, self.failed = (self.watch / n for n in ("done", "originals", "failed"))
        self.ledger = cluster.settings.storage_dir / "watch-ledger.json"

    def drop(self, name: str, data: bytes | None = None) -> Path:
        """Copy a file in the way a user's copy does: written beside, then renamed in (a dotfile meanwhile)."""
        partial = self.watch / f".{uuid.uuid4().hex}"
        partial.write_bytes(self.clip.read_bytes() if data is None else data)
        target = self.watch / name
        partial.rename(target)
        return target

    def entries(self) -> list[dict]:
        return json.loads(self.ledger.read_text())["entries"] if self.ledger.exists() else []

    def delivered(self, path: Path, timeout: float = 90) -> Path:
        wait_for(path.exists, timeout, f"{path.relative_to(self.watch)}; server log: "
                 f"{self.cluster.log('server')[-3000:]}")
        return path

    def left_in_watch(self) -> set[str]:
        return {p.name for p in self.watch.iterdir()} - {"done", "originals", "failed"}


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("watch")
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    settings = config.load({
        "CONFIG_FILE": str(folder / "no-config.yaml"), "QUEUE_PREFIX": prefix,
        "STORAGE_DIR": str(folder / "storage"), "WATCH_DIR": str(folder / "drop here"),
        "CHUNK_SECONDS": "1", "BROKER_HEARTBEAT_MS": "2000", "SERVER_PORT": str(harness.free_port()),
        "WORKER_THREADS": "1", "CACHE_MB": "0",  # no results cache: every file dropped is really transcoded
    })
    cluster = Cluster(settings, folder)
    try:
        cluster.start_server()
        cluster.start_worker(**TRANSCODE)
        cluster.wait_workers(1)
        yield Farm(cluster, video.make_clip(folder / "clip.mp4", 2.0))
    finally:
        cluster.stop()
        delete_queues(prefix)


def assert_transcoded(path: Path) -> None:
    """H.264, every frame there and decodable."""
    stream = video.stream(path)
    assert stream["codec_name"] == "h264" and (stream["width"], stream["height"]) == (160, 120)
    assert int(stream["nb_read_packets"]) == FRAMES
    assert len(video.frame_hashes(path)) == FRAMES


def test_a_dropped_video_is_transcoded_into_done(farm):
    farm.drop("holiday clip.mp4")
    out = farm.delivered(farm.done / "holiday clip.mp4")
    assert_transcoded(out)
    assert (farm.originals / "holiday clip.mp4").read_bytes() == farm.clip.read_bytes()
    tasks = [t for t in get_json(f"{farm.cluster.base}/tasks") if t["state"] == "done"]
    assert tasks and tasks[-1]["kind"] == "transcode" and tasks[-1]["params"]["crf"] == 23  # WATCH_TASK's default
    # the same name again, while the first still sits in originals/: kept beside it, not over it
    farm.drop("holiday clip.mp4")
    second = farm.delivered(farm.done / "holiday clip (2).mp4")
    assert_transcoded(second)
    assert (farm.originals / "holiday clip (2).mp4").read_bytes() == farm.clip.read_bytes()
    assert (farm.done / "holiday clip.mp4").read_bytes() == out.read_bytes()
    wait_for(lambda: not farm.entries(), 10, "the ledger to empty")
    assert farm.left_in_watch() == set()
    assert "Watch - took 'holiday clip.mp4' into 'originals/holiday clip (2).mp4'" in farm.cluster.log("server")


def test_a_file_still_being_copied_is_taken_once_complete(farm):
    data = farm.clip.read_bytes()
    target = farm.watch / "slow copy é.mp4"
    with target.open("wb") as out:  # written in place, in three parts, each within two polls of the last
        for part in range(3):
            out.write(data[part * len(data) // 3:(part + 1) * len(data) // 3])
            out.flush()
            if part < 2:
                time.sleep(1.3)
                assert target.exists() and not (farm.originals / target.name).exists(), "taken half written"
    out_path = farm.delivered(farm.done / "slow copy é.mp4")
    assert_transcoded(out_path)
    assert (farm.originals / target.name).read_bytes() == data
    assert not (farm.failed / target.name).exists()


def test_what_is_not_media_goes_to_failed_with_the_reason(farm, tmp_path):
    farm.drop("notes.txt", b"shopping list: milk, eggs\n")
    farm.drop("broken.mp4", os.urandom(64 * 1024))
    farm.drop("song.m4a", video.make_audio(tmp_path / "song.m4a").read_bytes())
    ignored = {".hidden.mp4", "copying.mp4.part", "download.mp4.crdownload", "link.mp4"}
    for name in ignored - {"link.mp4"}:
        (farm.watch / name).write_bytes(farm.clip.read_bytes())
    (farm.watch / "link.mp4").symlink_to(farm.clip)
    reasons = {}
    for name in ("notes.txt", "broken.mp4", "song.m4a"):
        note = farm.delivered(farm.failed / f"{name}.error.txt", 60)
        assert (farm.failed / name).exists() and not (farm.originals / name).exists()
        reasons[name] = note.read_text()
    assert "not a readable audio file nor video" in reasons["notes.txt"], reasons
    assert "not a readable audio file nor video" in reasons["broken.mp4"], reasons
    assert "transcode needs a video stream" in reasons["song.m4a"], reasons
    assert str(farm.cluster.settings.storage_dir) not in "".join(reasons.values())
    assert farm.left_in_watch() == ignored  # the three were taken at their second stable poll; these never
    assert not farm.entries()


def test_a_symlinked_done_folder_is_never_written_through(farm, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    aside = farm.watch / ".done-aside"
    os.rename(farm.done, aside)
    wait_for(lambda: _link(elsewhere, farm.done), 10, "done/ replaced by a link (the watcher remakes missing folders)")
    try:
        farm.drop("linked.mp4")
        wait_for(lambda: "done is not a plain folder" in farm.cluster.log("server"), 30,
                 f"the watcher to refuse done/; server log: {farm.cluster.log('server')[-2000:]}")
        assert list(elsewhere.iterdir()) == []
    finally:
        os.unlink(farm.done)
        os.rename(aside, farm.done)
    assert_transcoded(farm.delivered(farm.done / "linked.mp4"))  # a plain folder again: delivered there
    assert list(elsewhere.iterdir()) == []


def _link(target: Path, link: Path) -> bool:
    try:
        os.symlink(target, link)
        return True
    except FileExistsError:  # the watcher made done/ again meanwhile: take it away again
        shutil.rmtree(link, ignore_errors=True)
        return False


def test_the_watch_folder_across_a_server_restart(farm):
    """The server is killed with files at every step, then started again: each output arrives once.

    restart.mp4: its task running (no worker). unrecorded.mp4: uploaded and its task made, neither
    recorded yet. half taken.mp4: recorded as taken, not yet moved. before.mp4: its output copied
    to done/, the entry not yet closed. The last three are what the ledger holds when the server
    dies between two of its steps; they are written into the ledger while the server is down.
    """
    cluster = farm.cluster
    farm.drop("before.mp4")
    farm.delivered(farm.done / "before.mp4")
    for worker in cluster.workers:  # no worker: the tasks cannot end before the server is stopped
        worker.kill()
        worker.wait()
    farm.drop("restart.mp4")
    farm.drop("unrecorded.mp4")

    def recorded():
        entries = {e["source"]: e for e in farm.entries() if e["task_id"]}
        return entries if {"restart.mp4", "unrecorded.mp4"} <= set(entries) else None

    running = wait_for(recorded, 30, "the watcher to record both tasks")
    for entry in running.values():
        assert get_json(f"{cluster.base}/tasks/{entry['task_id']}")["state"] in ("queued", "running")
    media = {m["name"]: m["media_id"] for m in get_json(f"{cluster.base}/media")}
    before_task = next(t for t in get_json(f"{cluster.base}/tasks") if t["media_id"] == media["before"])
    cluster.server.kill()
    cluster.server.wait()

    ledger = json.loads(farm.ledger.read_text())
    for entry in ledger["entries"]:
        if entry["source"] == "unrecorded.mp4":
            entry["media_id"] = entry["task_id"] = None
    (farm.watch / "half taken.mp4").write_bytes(farm.clip.read_bytes())
    blank = {"uploading": None, "media_id": None, "task_id": None, "targets": None, "error": None,
             "failed_as": None}
    ledger["entries"] += [
        {**blank, "source": "half taken.mp4", "original": "half taken.mp4"},
        {**blank, "source": "before.mp4", "original": "before.mp4", "media_id": media["before"],
         "task_id": before_task["task_id"], "targets": {"video": "before.mp4"}},
    ]
    farm.ledger.write_text(json.dumps(ledger))
    delivered_before = (farm.done / "before.mp4").read_bytes()

    cluster.start_server()
    cluster.start_worker(**TRANSCODE)
    names = ("restart.mp4", "unrecorded.mp4", "half taken.mp4", "before.mp4")
    for name in names:
        assert_transcoded(farm.delivered(farm.done / name, 120))
        assert (farm.originals / name).read_bytes() == farm.clip.read_bytes()
    wait_for(lambda: not farm.entries(), 10, "the ledger to empty")
    assert (farm.done / "before.mp4").read_bytes() == delivered_before
    stems = tuple(f"{name[:-4]} (" for name in names)
    assert not [p.name for p in [*farm.done.iterdir(), *farm.originals.iterdir()] if p.name.startswith(stems)]
    assert farm.left_in_watch() - {".hidden.mp4", "copying.mp4.part", "download.mp4.crdownload",
                                   "link.mp4"} == set()
    media = [m for m in get_json(f"{cluster.base}/media") if f"{m['name']}.mp4" in names]
    assert sorted(m["name"] for m in media) == sorted(name[:-4] for name in names), "one medium each"
    tasks = get_json(f"{cluster.base}/tasks")
    for medium in media:
        mine = [t for t in tasks if t["media_id"] == medium["media_id"]]
        assert [t["state"] for t in mine] == ["done"], (medium, mine)  # one task each, done
    assert not list((cluster.settings.storage_dir / "incoming").iterdir())
    log = cluster.log("server")
    assert "Watch - resuming 4 file(s) taken before the restart" in log
    assert "'unrecorded.mp4' is Media[" in log and "(uploaded before the restart)" in log
    assert "(transcode) (made before the restart)" in log


def test_a_bad_watch_task_stops_the_server_at_start(tmp_path):
    base = {"CONFIG_FILE": str(tmp_path / "no-config.yaml"), "STORAGE_DIR": str(tmp_path / "storage"),
            "QUEUE_PREFIX": f"test-{uuid.uuid4().hex[:8]}"}
    for raw, words in [("transcode h264", "not JSON"), ('["transcode"]', "must be"),
                       ('{"kind": "paint"}', "unknown job kind 'paint'"),
                       ('{"kind": "transcode", "params": {"crf": 99}}', "crf"),
                       ('{"kind": "transcode", "params": {"codec": "mpeg1"}}', "codec")]:
        app = create_app(config.load({**base, "WATCH_TASK": raw}))
        with pytest.raises(ValueError, match="WATCH_TASK") as refused:
            services_of(app).start()  # refused before it connects to anything
        services_of(app).close()
        assert words in str(refused.value), (raw, refused.value)
    shutil.rmtree(tmp_path / "storage")
