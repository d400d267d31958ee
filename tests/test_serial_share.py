"""The server's measured serial part (issue 22): what each phase of a task costs the server, and
the progress of the jobs in flight.

Unit tests drive `guard.run`/`guard.accounted` on real child processes (a child's CPU is
counted in the block of the thread that ran it, not in another thread's), `SerialWork`'s
figures and `views.progress`. The farm test runs a real server, broker and one transcode
worker on a clip whose one job takes seconds (x264 `veryslow`): the task's progress must rise
above 0 before any job is done (the worker's frame count, carried by its presence), and once
done its `stats.serial` must hold prepare, check and merge with CPU > 0, totals that add up,
a share equal to server ÷ (server + workers), and /metrics the same per kind and phase.
No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from src.media import guard
from src.server import views
from src.server.serial import SerialWork
from src.server.store import Task
from tests import video
from tests.helpers import get, get_json, wait_for
from tests.test_transcode import transcode, upload

BURN = [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"]


@pytest.mark.unit
def test_a_child_s_cpu_counts_in_the_block_of_the_thread_that_ran_it():
    with guard.accounted() as outer:
        done = guard.run(BURN, capture_output=True, timeout=60)
        with guard.accounted() as inner:
            guard.run(BURN, timeout=60)
    assert done.returncode == 0 and done.stdout == b""
    assert inner.children == 1 and inner.children_cpu_seconds >= 0.25, inner
    assert outer.children == 2 and outer.children_cpu_seconds >= 0.5, outer  # the inner block's child too
    assert outer.wall_seconds >= inner.wall_seconds > 0
    # a child run by another thread, at the same time, is that thread's alone
    seen: list[guard.Work] = []

    def elsewhere() -> None:
        with guard.accounted() as work:
            guard.run(BURN, timeout=60)
        seen.append(work)

    with guard.accounted() as mine:
        other = threading.Thread(target=elsewhere)
        other.start()
        guard.run([sys.executable, "-c", "pass"], timeout=60)
        other.join()
    assert mine.children == 1 and mine.children_cpu_seconds < 0.2, mine
    assert seen[0].children == 1 and seen[0].children_cpu_seconds >= 0.25, seen


@pytest.mark.unit
def test_run_keeps_subprocess_run_s_answers_inside_and_outside_a_block():
    echo = [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"]
    plain = guard.run(echo, capture_output=True, text=True, timeout=60)
    with guard.accounted():
        counted = guard.run(echo, capture_output=True, text=True, timeout=60)
        with pytest.raises(subprocess.TimeoutExpired):
            guard.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.3)
        with pytest.raises(subprocess.CalledProcessError):
            guard.run(echo, check=True, timeout=60)
    for done in (plain, counted):
        assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


@pytest.mark.unit
def test_a_task_s_figures_add_up_and_its_share_is_server_over_all():
    work = SerialWork(Counter("cpu", "c", ["kind", "phase"]), Counter("wall", "w", ["kind", "phase"]))
    for phase in ("prepare", "check", "check", "merge"):
        with work.phase(7, "transcode", phase):
            guard.run(BURN, timeout=60)
    stats = work.stats(7, workers_cpu_seconds=3.0)
    assert list(stats["phases"]) == ["prepare", "check", "merge"] and stats["phases"]["check"]["calls"] == 2
    server = sum(row["cpu_seconds"] for row in stats["phases"].values())
    assert stats["server_cpu_seconds"] == pytest.approx(server, abs=1e-3) and server >= 1.0
    assert stats["share"] == pytest.approx(server / (server + 3.0), abs=1e-4)
    assert stats["partial"] is False
    work.forget(7)
    assert work.stats(7, 1.0)["phases"] == {} and work.stats(7, 1.0)["partial"] is True


@pytest.mark.unit
def test_progress_counts_the_running_jobs_share_but_reaches_100_only_when_done():
    running = Task(**{**{f: None for f in Task.__dataclass_fields__}, "state": "running"})
    assert views.progress(running, 0, 1) == 0
    assert views.progress(running, 0, 1, running=0.4) == 40
    assert views.progress(running, 1, 4, running=1.5) == 62
    assert views.progress(running, 3, 4, running=5.0) == 99  # never past what is left, never 100 before done


# -- a real farm ------------------------------------------------------------------------------------


def read_events(feed: requests.Response, into: list[dict]) -> None:
    """The `task` events of a Server-Sent Events stream, until it is closed."""
    kind = None
    try:
        for line in feed.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: ") and kind == "task":
                into.append(json.loads(line[len("data: "):]))
    except (requests.RequestException, AttributeError, ValueError):
        pass  # closed by the test


def samples(base: str, name: str) -> dict[tuple[str, str], float]:
    text = get(base + "/metrics")[1].decode()
    return {(s.labels["kind"], s.labels["phase"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def test_a_transcode_shows_progress_within_its_first_job_and_its_serial_share(cluster, tmp_path: Path):
    cluster.settings = cluster.settings.with_overrides(chunk_seconds=30.0)  # few, long jobs
    cluster.start_server()
    cluster.start_worker(WORKER_KINDS="transcode")
    cluster.wait_workers(1)
    # 6 s of 640x360 at x264's slowest preset on one thread: its first job takes seconds
    source = video.make_clip(tmp_path / "clip.mp4", 6.0, size="640x360", keyint=50)
    media = upload(cluster.base, source)
    pushed: list[dict] = []  # the page's own feed: task events on /events
    feed = requests.get(f"{cluster.base}/events", stream=True, timeout=300)
    reader = threading.Thread(target=read_events, args=(feed, pushed), daemon=True)
    reader.start()
    task_id = transcode(cluster.base, media["media_id"], {"codec": "h264", "crf": 30, "preset": "veryslow"})
    seen: list[tuple[int, int, str]] = []

    def done():
        task = get_json(f"{cluster.base}/tasks/{task_id}")
        assert task["state"] not in ("failed", "cancelled"), task["error"]
        seen.append((task["progress"], task["jobs_done"], task["state"]))
        return task if task["state"] == "done" else None

    task = wait_for(done, 300, f"task {task_id} to be done", interval=0.1)
    feed.close()
    within = [progress for progress, jobs_done, state in seen if jobs_done == 0 and state == "running"]
    assert within and max(within) > 0, f"progress while no job was done: {seen}"
    on_page = [t["progress"] for t in pushed if t["task_id"] == task_id and t["jobs_done"] == 0
               and t["state"] == "running"]
    assert on_page and max(on_page) > 0, f"progress pushed to the page while no job was done: {on_page}"

    serial = task["stats"]["serial"]
    for phase in ("prepare", "check", "merge"):
        row = serial["phases"][phase]
        assert row["cpu_seconds"] > 0 and row["wall_seconds"] > 0 and row["calls"] >= 1, serial
        assert row["children_cpu_seconds"] > 0, serial  # each ran ffprobe or ffmpeg
    assert serial["phases"]["check"]["calls"] >= task["jobs_total"]
    assert serial["server_cpu_seconds"] == pytest.approx(
        sum(r["cpu_seconds"] for r in serial["phases"].values()), abs=1e-3)
    workers = task["stats"]["energy"]["cpu_seconds"]
    assert serial["workers_cpu_seconds"] == pytest.approx(workers, abs=1e-2) and workers > 0
    assert serial["share"] == pytest.approx(serial["server_cpu_seconds"] / (serial["server_cpu_seconds"] + workers),
                                            abs=1e-3)
    assert 0 < serial["share"] < 1 and serial["partial"] is False

    cpu = samples(cluster.base, "karaoke_server_cpu_seconds_total")
    wall = samples(cluster.base, "karaoke_server_wall_seconds_total")
    for phase, row in serial["phases"].items():
        assert cpu[("transcode", phase)] == pytest.approx(row["cpu_seconds"], abs=1e-2)
        assert wall[("transcode", phase)] == pytest.approx(row["wall_seconds"], abs=1e-2)
    assert cpu[("separate", "merge")] == 0  # every kind's series is there from the start
