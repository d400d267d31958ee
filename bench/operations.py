"""Section 8 of `make bench`: operations, a steady load on five workers while one and then two are killed.

A client uploads a song and a video alternately, one every `interval` seconds, for
`seconds` (the full profile: every 5 s for 3 minutes, 36 uploads); each upload is
`POST /media` then `POST /tasks` (`separate` for a song, `transcode` to H.264 for a video).
At the profile's kill times (60 s and 120 s) a worker busy with a job is killed with
SIGKILL, mid-job, so 20 % and then 40 % of the farm is gone; the killed workers do not
come back. Then every task is waited for. Phases: "before" (until the first kill), one
per kill (until the next kill or the end of the uploads), "after" (from there until the
last task is done). Per phase: tasks completed, throughput (tasks/s and media seconds
per second), p50 and p95 latency (upload request → the task's `finished_at`) by kind, the
workers' busy share; per worker the jobs whose results were accepted (the job records'
`worker`), per phase; and whether every output is byte-identical to a fault-free run of
the same input. The same schedule runs twice: pull (WORKER_PREFETCH=1, a worker takes a
job when it is free) and push (WORKER_PREFETCH=0, unbounded: RabbitMQ hands every job to
the consumers round-robin as it is published).

Each worker acts as an independent slow machine (WORKER_SLOWDOWN=N: it waits (N-1)x its
compute time after each job), so that capacity is proportional to live workers on a
2-core host. N is calibrated: a fault-free reference run (one worker, no slowdown, one
task at a time) times every distinct input's jobs, and N is set so that, by that compute
alone, the uploads keep the workers `utilisation` busy (55 %) before the kills; the same
work then needs about 70 % of 4 workers and 90 % of 3. The slowdown ends a job N times its
CPU time after it started, so jobs computing at once on the shared cores do not stretch
each other: each phase records the jobs' time against N x their compute alone in the
reference run (about 1 when the emulation holds), and the host's CPU: this deployment's,
RabbitMQ's, the rest (/proc). Each run's workers first do a job of each kind, unmeasured: a fresh process's
first job is several times slower.

The reference run also gives each input's output hashes, the server's CPU seconds per
media second per kind, the broker's bytes per media second (the task's
`stats.broker_bytes`) and the job sizes (`GET /job/{id}` size): the figures
docs/SCALING.md is written from.

One server serves the reference run and both load runs (each run starts its own workers
and stops them after), with CACHE_MB=0 so that every task is computed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.harness import Deployment, cpu_seconds, get_json, http, make_song, make_video
from bench.transcode import upload
from src.server.dashboard import percentile

MODES = {"pull": 1, "push": 0}  # WORKER_PREFETCH; 0 is RabbitMQ's unbounded prefetch
KINDS = "separate,transcode/h264"  # two jobs queues per worker: one kind each


@dataclass(frozen=True)
class Profile:
    name: str
    workers: int
    interval: float  # seconds between two uploads
    seconds: float  # how long the client uploads
    kills: tuple[float, ...]  # seconds after the first upload at which a worker is killed
    songs: tuple[float, ...]  # song lengths (seconds), cycled over the song uploads
    videos: tuple[float, ...]  # video lengths, cycled over the video uploads
    width: int  # the videos' size (they are transcoded at this height)
    height: int
    chunk_seconds: float
    # the workers' busy share before the first kill by the compute alone; measured, about 70 % (see the docstring)
    utilisation: float = 0.55
    min_slowdown: float = 3.0  # below this the workers' own compute would crowd the 2 cores


def profile(name: str) -> Profile:
    if name == "smoke":
        # three uploads, one kill: the code paths, in about 70 s (three sets of workers start)
        return Profile("smoke", 3, 2.0, 6.0, (3.0,), (4.0,), (2.0,), 320, 180, 1.0, utilisation=0.5,
                       min_slowdown=2.0)
    if name == "quick":
        return Profile("quick", 5, 5.0, 60.0, (20.0, 40.0), (12.0, 20.0), (4.0, 8.0), 640, 360, 2.0)
    # 36 uploads; about 11 minutes for the section on 2 quiet cores (the quick profile: under 5)
    return Profile("full", 5, 5.0, 180.0, (60.0, 120.0), (12.0, 20.0), (4.0, 8.0), 640, 360, 2.0)


def settings(p: Profile) -> dict[str, str]:
    # demucs' tiny test model: a worker's cost is set by WORKER_SLOWDOWN, and 2 cores cannot
    # hold five htdemucs workers; the server's and the broker's work per song is the same
    return {"MODEL": "demucs_unittest", "MODEL_SEGMENT": "4", "CHUNK_SECONDS": f"{p.chunk_seconds:g}",
            "CACHE_MB": "0", "VERIFY": "off", "VERIFY_REPLICAS": "1"}


def worker_env(prefetch: int, slowdown: float) -> dict[str, str]:
    return {"WORKER_THREADS": "1", "WORKER_KINDS": KINDS, "WORKER_PREFETCH": str(prefetch),
            "WORKER_SLOWDOWN": f"{slowdown:g}"}


# -- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    name: str
    kind: str
    path: Path
    params: dict[str, Any]


def make_inputs(p: Profile, workdir: Path) -> list[Input]:
    songs = [Input(f"song {s:g}s", "separate", make_song(workdir / f"ops-song-{s:g}s.mp3", s), {})
             for s in p.songs]
    video = {"codec": "h264", "height": p.height, "preset": "veryfast"}
    videos = [Input(f"video {s:g}s", "transcode",
                    make_video(workdir / f"ops-video-{p.width}x{p.height}-{s:g}s.mp4", s, p.width, p.height), video)
              for s in p.videos]
    return songs + videos


def schedule(p: Profile, inputs: list[Input]) -> list[Input]:
    """The upload sequence: song, video, song, video, ..., each kind's lengths cycled."""
    songs = [i for i in inputs if i.kind == "separate"]
    videos = [i for i in inputs if i.kind == "transcode"]
    count = math.ceil(p.seconds / p.interval - 1e-9)
    return [songs[(k // 2) % len(songs)] if k % 2 == 0 else videos[(k // 2) % len(videos)] for k in range(count)]


# -- talking to the deployment ----------------------------------------------------------------


def submit(deployment: Deployment, item: Input) -> dict:
    """Upload and start one task; when the request was made, the medium's duration, the task id."""
    began = time.time()
    media_id = upload(deployment, item.path)
    media = get_json(f"{deployment.base}/media/{media_id}")
    status, body = http("POST", deployment.base + "/tasks",
                        json.dumps({"kind": item.kind, "media_id": media_id, "params": item.params}).encode(),
                        "application/json")
    if status != 202:
        raise RuntimeError(f"POST /tasks -> {status} {body[:300]!r}")
    return {"input": item.name, "kind": item.kind, "uploaded_at": began, "media_id": media_id,
            "media_seconds": float(media["duration"]), "task_id": json.loads(body)["task_id"]}


def wait_tasks(deployment: Deployment, task_ids: list[int], timeout: float) -> dict[int, dict]:
    """Every task's view once none is queued or running any more (done, failed or cancelled)."""
    deadline = time.monotonic() + timeout
    wanted = set(task_ids)
    while True:
        found = {t["task_id"]: t for t in get_json(deployment.base + "/tasks") if t["task_id"] in wanted}
        if len(found) == len(wanted) and all(t["state"] in ("done", "failed", "cancelled") for t in found.values()):
            return found
        if time.monotonic() > deadline:
            late = sorted(i for i in wanted if found.get(i, {}).get("state") not in ("done", "failed", "cancelled"))
            raise TimeoutError(f"tasks {late[:10]} not finished in {timeout:.0f}s")
        time.sleep(1.0)


def output_hashes(task: dict) -> dict[str, str]:
    """sha256 of each output file of a done task, by output name."""
    hashes = {}
    for output in task["outputs"]:
        status, body = http("GET", output["url"])
        if status != 200:
            raise RuntimeError(f"GET {output['url']} -> {status}")
        hashes[output["name"]] = hashlib.sha256(body).hexdigest()
    return hashes


def jobs_of(deployment: Deployment, task_ids: set[int]) -> list[dict]:
    """The job records (`GET /job/{id}`) of these tasks."""
    return [job for job in (get_json(f"{deployment.base}/job/{i}") for i in get_json(deployment.base + "/job"))
            if job["task_id"] in task_ids]


def counters(deployment: Deployment) -> dict[str, float]:
    """The server's counters in /metrics (`*_total`), summed over their labels."""
    status, body = http("GET", deployment.base + "/metrics")
    totals: dict[str, float] = {}
    if status != 200:
        return totals
    for line in body.decode().splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.split("{", 1)[0].split(" ", 1)[0], line.rsplit(" ", 1)[1]
        if name.endswith("_total"):
            totals[name[:-len("_total")]] = totals.get(name[:-len("_total")], 0.0) + float(value)
    return totals


def worker_states(deployment: Deployment) -> dict[int, dict]:
    return {w["pid"]: w for w in get_json(deployment.base + "/workers")}


# -- figures -----------------------------------------------------------------------------------


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def size_summary(jobs: list[dict]) -> dict:
    """Job sizes (bytes of input in the job, `GET /job/{id}` size) and media seconds per job."""
    sizes = [j["size"] for j in jobs]
    seconds = [j["seconds"] for j in jobs]
    return {"jobs": len(jobs), "bytes_median": statistics.median(sizes), "bytes_min": min(sizes),
            "bytes_max": max(sizes), "bytes_mean": statistics.mean(sizes),
            "media_seconds_median": statistics.median(seconds),
            "bytes_per_media_second": sum(sizes) / sum(seconds) if sum(seconds) else None}


def rabbitmq_pids() -> list[int]:
    """Every RabbitMQ node on this host (beam.smp): which one serves this run is not known from here."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "beam.smp":
                found.append(int(entry.name))
        except OSError:
            pass
    return found


class CpuSampler(threading.Thread):
    """Once a second: the host's busy and total CPU time (/proc/stat), the CPU seconds of the
    deployment's processes and of RabbitMQ, so that each phase can say how busy the host was and
    how much of that was neither (other programs on a shared machine)."""

    def __init__(self, pids: list[int]):
        super().__init__(daemon=True)
        self.groups = {"ours": pids, "rabbitmq": rabbitmq_pids()}
        self.samples: list[dict[str, float]] = []
        self._last: dict[int, float] = {}
        self._halt = threading.Event()

    def _cpu(self, pids: list[int]) -> float:
        for pid in pids:
            try:
                self._last[pid] = cpu_seconds(pid)
            except (OSError, IndexError, ValueError):
                pass  # a killed worker, a node gone: its last reading stands
        return sum(self._last.get(pid, 0.0) for pid in pids)

    def sample(self) -> None:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        tick = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + fields[4]
        self.samples.append({"at": time.time(), "busy": (sum(fields) - idle) / tick, "total": sum(fields) / tick,
                             **{name: self._cpu(pids) for name, pids in self.groups.items()}})

    def run(self) -> None:
        while not self._halt.wait(1.0):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()

    def between(self, start: float, stop: float) -> dict:
        """The host's CPU busy share (all cores), and the cores the deployment, RabbitMQ and everything
        else used, from the last sample at or before `start` to the last one at or before `stop`."""
        first = max((s for s in self.samples if s["at"] <= start), default=self.samples[0], key=lambda s: s["at"])
        last = max((s for s in self.samples if s["at"] <= stop), default=self.samples[-1], key=lambda s: s["at"])
        seconds = last["at"] - first["at"]
        if seconds <= 0:
            return {"host_busy_share": None, "deployment_cores": None, "rabbitmq_cores": None, "other_cores": None}
        busy, total = last["busy"] - first["busy"], last["total"] - first["total"]
        ours, rabbit = (last[k] - first[k] for k in ("ours", "rabbitmq"))
        return {"host_busy_share": busy / total if total else None, "deployment_cores": ours / seconds,
                "rabbitmq_cores": rabbit / seconds, "other_cores": max(0.0, (busy - ours - rabbit) / seconds)}

    def totals(self) -> dict[str, float]:
        """CPU seconds of the deployment and of RabbitMQ over the whole sampling."""
        return {k: self.samples[-1][k] - self.samples[0][k] for k in ("ours", "rabbitmq")}


# -- the reference run: fault-free, one worker at full speed -----------------------------------


def reference(deployment: Deployment, inputs: list[Input], timeout: float) -> dict[str, dict]:
    """Each distinct input twice, one task at a time, on one worker without slowdown: the outputs'
    hashes every later run must equal (both rounds must agree), and from the second round (a
    process's first jobs pay one-time costs) the compute of each job alone, which calibrates
    WORKER_SLOWDOWN, and the server's CPU, the broker's bytes and the job sizes per media second.
    (On as many workers as the load, a task's jobs would compute at once and stretch each other
    more than in the load, where most workers are in their slowdown's wait, which takes no CPU.)"""
    refs: dict[str, dict] = {}
    for round_ in (1, 2):
        for item in inputs:
            cpu0 = cpu_seconds(deployment.server.pid)
            posted = submit(deployment, item)
            task = wait_tasks(deployment, [posted["task_id"]], timeout)[posted["task_id"]]
            if task["state"] != "done":
                raise RuntimeError(f"reference task for {item.name} {task['state']}: {task.get('error')}")
            cpu = cpu_seconds(deployment.server.pid) - cpu0
            hashes = output_hashes(task)
            if round_ == 1:
                refs[item.name] = {"hashes": hashes}
                continue
            if hashes != refs[item.name]["hashes"]:
                raise RuntimeError(f"two fault-free runs of {item.name} gave different outputs: no reference")
            jobs = jobs_of(deployment, {posted["task_id"]})
            moved = task["stats"].get("broker_bytes") or {}
            refs[item.name].update({
                "kind": item.kind, "media_seconds": posted["media_seconds"],
                "input_bytes": item.path.stat().st_size, "wall": task["finished_at"] - posted["uploaded_at"],
                "server_cpu": cpu, "jobs": len(jobs), "compute_seconds": sum(j["time"] for j in jobs),
                "broker_bytes": {"jobs": int(moved.get("jobs", 0)), "results": int(moved.get("results", 0))},
                "job_sizes": size_summary(jobs),
            })
            print(f"bench: operations: reference {item.name}: {refs[item.name]['wall']:.1f}s, {len(jobs)} jobs, "
                  f"compute {refs[item.name]['compute_seconds']:.2f}s", flush=True)
    return refs


def calibrate(p: Profile, sequence: list[Input], refs: dict[str, dict]) -> dict:
    """WORKER_SLOWDOWN such that the uploads keep `workers` busy `utilisation` of the time:
    an upload's work is its jobs' compute x N, and `workers` x `interval` worker-seconds
    are there per upload."""
    compute = statistics.mean(refs[item.name]["compute_seconds"] for item in sequence)
    wanted = p.utilisation * p.workers * p.interval / compute
    slowdown = max(p.min_slowdown, round(wanted, 1))
    planned = compute * slowdown / (p.workers * p.interval)
    return {"compute_per_upload": compute, "slowdown": slowdown, "wanted_slowdown": wanted,
            "planned_utilisation": {f"{p.workers - k} workers": planned * p.workers / (p.workers - k)
                                    for k in range(len(p.kills) + 1)},
            "worker_cores": compute / p.interval}


# -- one load run ------------------------------------------------------------------------------


def kill_busy(deployment: Deployment, procs: list, alive: list[int], wait: float) -> dict:
    """SIGKILL the first live worker that is running a job (waiting up to `wait` s for one)."""
    deadline = time.monotonic() + wait
    while True:
        states = worker_states(deployment)
        busy = [i for i in alive if states.get(procs[i].pid, {}).get("state") == "busy"]
        if busy or time.monotonic() > deadline:
            index = busy[0] if busy else alive[0]
            found = states.get(procs[index].pid, {})
            procs[index].kill()
            return {"worker": index, "name": found.get("worker"), "at": time.time(), "busy": bool(busy),
                    "job_id": found.get("job_id")}
        time.sleep(0.1)


def warm_up(deployment: Deployment, p: Profile, inputs: list[Input], refs: dict[str, dict], timeout: float
            ) -> dict:
    """Give every new worker a job of each kind before the clock starts: a fresh process's first
    job computes several times slower (torch's and ffmpeg's first calls), and the slowdown would
    multiply that into the first phase. Enough copies of each kind's input with the most jobs to
    make a job per worker: idle pull workers take one each, push hands them round-robin."""
    started = time.monotonic()
    posted = []
    for kind in ("separate", "transcode"):
        item = max((i for i in inputs if i.kind == kind), key=lambda i: refs[i.name]["jobs"])
        posted += [submit(deployment, item) for _ in range(math.ceil(p.workers / refs[item.name]["jobs"]))]
    tasks = wait_tasks(deployment, [t["task_id"] for t in posted], timeout)
    failed = [t for t in tasks.values() if t["state"] != "done"]
    if failed:
        raise RuntimeError(f"warm-up task {failed[0]['task_id']} {failed[0]['state']}: {failed[0].get('error')}")
    jobs = jobs_of(deployment, set(tasks))
    return {"tasks": len(tasks), "seconds": time.monotonic() - started,
            "workers": {kind: len({j["worker"] for j in jobs if j["kind"] == kind})
                        for kind in ("separate", "transcode")}}


def load_run(deployment: Deployment, p: Profile, mode: str, inputs: list[Input], sequence: list[Input],
             slowdown: float, refs: dict[str, dict]) -> dict:
    """Start `workers` new workers for `mode`, run the upload schedule and the kills, wait for every
    task, and measure: per phase, per worker, per task (its outputs against `refs`); the workers
    that are left are stopped at the end."""
    procs = deployment.add_workers([worker_env(MODES[mode], slowdown)] * p.workers)
    states = worker_states(deployment)
    names = [states[proc.pid]["worker"] for proc in procs]
    warm = warm_up(deployment, p, inputs, refs, timeout=600 + 10 * p.seconds)
    print(f"bench: operations {mode}: warmed up in {warm['seconds']:.0f}s, workers that ran a job of each kind: "
          f"{warm['workers']}", flush=True)
    before = counters(deployment)
    cpu0 = cpu_seconds(deployment.server.pid)
    sampler = CpuSampler([deployment.server.pid] + [proc.pid for proc in procs])
    sampler.sample()
    sampler.start()
    posted: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(item: Input) -> None:
        try:
            done = submit(deployment, item)
            with lock:
                posted.append(done)
        except Exception as exc:  # counted in the results; the schedule goes on
            with lock:
                errors.append(f"{item.name}: {type(exc).__name__}: {exc}")

    began_wall, began = time.time(), time.monotonic()
    kills: list[dict] = []
    alive = list(range(p.workers))

    def killer() -> None:  # its own thread: waiting for a busy victim must not hold back an upload
        for due in p.kills:
            time.sleep(max(0.0, began + due - time.monotonic()))
            killed = kill_busy(deployment, procs, alive, wait=2 * p.interval)
            alive.remove(killed["worker"])
            killed["at"] -= began_wall
            kills.append(killed)
            print(f"bench: operations {mode}: killed worker {killed['worker'] + 1} at {killed['at']:.1f}s "
                  f"({'mid-job' if killed['busy'] else 'idle'})", flush=True)

    threads = [threading.Thread(target=killer)]
    threads[0].start()
    for k, item in enumerate(sequence):
        time.sleep(max(0.0, began + k * p.interval - time.monotonic()))
        threads.append(threading.Thread(target=client, args=(item,)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    uploads_end = time.time() - began_wall
    tasks = wait_tasks(deployment, [t["task_id"] for t in posted], timeout=600 + 10 * p.seconds)
    server_cpu = cpu_seconds(deployment.server.pid) - cpu0
    sampler.stop()
    after = counters(deployment)
    survivors = {w["worker"]: w for w in get_json(deployment.base + "/workers")}
    task_ids = {t["task_id"] for t in posted}
    jobs = jobs_of(deployment, task_ids)
    attempts = [a for task_id in sorted(task_ids)
                for a in get_json(f"{deployment.base}/tasks/{task_id}/timeline")]
    deployment.stop_workers(procs)

    rows = []
    for entry in sorted(posted, key=lambda e: e["uploaded_at"]):
        task = tasks[entry["task_id"]]
        row = {**entry, "state": task["state"], "uploaded": entry["uploaded_at"] - began_wall,
               "finished": (task["finished_at"] - began_wall) if task.get("finished_at") else None,
               "broker_bytes": task["stats"].get("broker_bytes"), "equal": None}
        row["latency"] = row["finished"] - row["uploaded"] if task["state"] == "done" else None
        if task["state"] == "done":
            hashes = output_hashes(task)
            row["equal"] = hashes == refs[entry["input"]]["hashes"]
            if not row["equal"]:
                row["differs"] = sorted(n for n in hashes if hashes[n] != refs[entry["input"]]["hashes"].get(n))
        del row["uploaded_at"]
        rows.append(row)
    end = max([r["finished"] for r in rows if r["latency"] is not None] + [uploads_end, p.seconds])
    bounds = [0.0, *[k["at"] for k in kills], p.seconds, end]
    labels = ["before"] + [f"{n} of {p.workers} down ({n / p.workers:.0%})" for n in range(1, len(kills) + 1)] + \
        ["after (drain)"]
    killed_at = {k["worker"]: k["at"] for k in kills}
    busy = busy_intervals(attempts, jobs, names, killed_at, began_wall, end)
    # what a job should take on its slow machine: N x its compute in the reference run, per media second
    rates = {kind: sum(r["compute_seconds"] for r in refs.values() if r["kind"] == kind)
             / sum(r["media_seconds"] for r in refs.values() if r["kind"] == kind)
             for kind in ("separate", "transcode")}
    planned = {j["job_id"]: slowdown * rates[j["kind"]] * j["seconds"] for j in jobs}
    phases = [{**phase(label, start, stop, rows, jobs, names, killed_at, busy, began_wall, planned),
               **sampler.between(began_wall + start, began_wall + stop)}
              for label, start, stop in zip(labels, bounds[:-1], bounds[1:], strict=True)]
    workers = []
    for index, name in enumerate(names):
        mine = [j for j in jobs if j["worker"] == name and j["state"] == "done"]
        outcomes: dict[str, int] = {}
        for a in attempts:
            if a["worker"] == name:
                outcomes[a["outcome"]] = outcomes.get(a["outcome"], 0) + 1
        workers.append({"worker": index + 1, "name": name, "killed_at": killed_at.get(index),
                        "jobs_done": len(mine), "by_kind": {k: sum(1 for j in mine if j["kind"] == k)
                                                            for k in ("separate", "transcode")},
                        "jobs_done_presence": (survivors.get(name) or {}).get("jobs_done"),
                        "attempts": outcomes})
    done = [r for r in rows if r["state"] == "done"]
    media = sum(r["media_seconds"] for r in done)
    latencies = [r["latency"] for r in done]
    return {
        "mode": mode, "prefetch": MODES[mode], "slowdown": slowdown, "uploads": len(sequence), "warm_up": warm,
        "upload_errors": errors, "kills": kills, "uploads_end": uploads_end, "end": end,
        "tasks": rows, "phases": phases, "workers": workers,
        # every job and attempt, seconds from the first upload, for a closer look
        "jobs": [{"job_id": j["job_id"], "task_id": j["task_id"], "kind": j["kind"], "worker": j["worker"],
                  "size": j["size"], "seconds": j["seconds"], "time": j["time"],
                  "queued": j["queued_at"] - began_wall if j.get("queued_at") else None,
                  "done": j["done_at"] - began_wall if j.get("done_at") else None} for j in jobs],
        "attempts": [{"job_id": a["job_id"], "worker": a["worker"], "outcome": a["outcome"],
                      "started": a["started_at"] - began_wall if a.get("started_at") else None,
                      "ended": a["ended_at"] - began_wall if a.get("ended_at") else None} for a in attempts],
        "done": len(done), "failed": sum(1 for r in rows if r["state"] != "done"),
        "equal": sum(1 for r in done if r["equal"]), "compared": len(done),
        "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
        "server_cpu": server_cpu, "media_seconds": media, "rabbitmq_cpu": sampler.totals()["rabbitmq"],
        "deployment_cpu": sampler.totals()["ours"], "whole_run": sampler.between(began_wall, began_wall + end),
        "server_cpu_per_media_second": server_cpu / media if media else None,
        "counters": {name: after.get(name, 0.0) - before.get(name, 0.0)
                     for name in ("karaoke_jobs_published", "karaoke_jobs_done", "karaoke_jobs_republished",
                                  "karaoke_jobs_redelivered", "karaoke_duplicate_results", "karaoke_jobs_failed")},
        # the job record's `attempts` counts the server's publications, not the broker's deliveries
        "jobs_published_more_than_once": sum(1 for j in jobs if (j.get("attempts") or 0) > 1),
    }


def busy_intervals(attempts: list[dict], jobs: list[dict], names: list[str], killed_at: dict[int, float],
                   began: float, end: float) -> dict[str, list[tuple[float, float]]]:
    """Per worker name, when it ran a job, in seconds from the first upload, overlaps merged. An
    attempt starts when the worker's presence said so; an accepted one lasts the job's `time` as the
    worker measured it (the server records its end only when it has handled the result, later under
    load); a killed worker's attempts end when it was killed (the server notices two heart-beats later)."""
    limit = {name: killed_at.get(index, end) for index, name in enumerate(names)}
    accepted = {j["job_id"]: j for j in jobs if j["state"] == "done"}
    spans: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for a in attempts:
        if a["worker"] not in spans or a.get("started_at") is None:
            continue
        start = a["started_at"] - began
        job = accepted.get(a["job_id"])
        if a["outcome"] == "done" and job is not None and job["worker"] == a["worker"]:
            stop = start + job["time"]
        else:
            stop = (a["ended_at"] - began) if a.get("ended_at") else end
        stop = min(stop, limit[a["worker"]])
        if stop > start:
            spans[a["worker"]].append((start, stop))
    merged: dict[str, list[tuple[float, float]]] = {}
    for name, found in spans.items():
        merged[name] = []
        for start, stop in sorted(found):
            if merged[name] and start <= merged[name][-1][1]:
                merged[name][-1] = (merged[name][-1][0], max(stop, merged[name][-1][1]))
            else:
                merged[name].append((start, stop))
    return merged


def phase(label: str, start: float, stop: float, rows: list[dict], jobs: list[dict], names: list[str],
          killed_at: dict[int, float], busy: dict[str, list[tuple[float, float]]], began: float,
          planned: dict[int, float]) -> dict:
    """One phase's figures: what finished in [start, stop) (seconds from the first upload). `stretch`:
    the time the jobs done in it took ÷ N x their compute in the reference run (1: each worker was
    the slow machine it plays; above 1: more jobs computed at once on the shared cores than in the
    reference, or other programs took them, and the slowdown multiplied that)."""
    length = max(stop - start, 1e-9)
    last = label.startswith("after")
    finished = [r for r in rows if r["state"] == "done" and (start <= r["finished"] < stop
                                                             or (last and r["finished"] == stop))]
    by_kind = {}
    for kind in ("separate", "transcode"):
        mine = [r["latency"] for r in finished if r["kind"] == kind]
        by_kind[kind] = {"tasks": len(mine), "p50": percentile(mine, 0.5), "p95": percentile(mine, 0.95)}
    latencies = [r["latency"] for r in finished]
    capacity = sum(overlap(0.0, killed_at.get(i, math.inf), start, stop) for i in range(len(names)))
    used = sum(overlap(a, b, start, stop) for spans in busy.values() for a, b in spans)
    done = [j for j in jobs if j["state"] == "done" and j["done_at"]
            and (start <= j["done_at"] - began < stop or (last and j["done_at"] - began >= stop))]
    per_worker = [sum(1 for j in done if j["worker"] == name) for name in names]
    expected = sum(planned.get(j["job_id"], 0.0) for j in done)
    return {"label": label, "start": start, "stop": stop, "seconds": stop - start, "tasks": len(finished),
            "media_seconds": sum(r["media_seconds"] for r in finished),
            "tasks_per_second": len(finished) / length,
            "media_seconds_per_second": sum(r["media_seconds"] for r in finished) / length,
            "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95), "by_kind": by_kind,
            "live_workers": sum(1 for i in range(len(names)) if killed_at.get(i, math.inf) > start),
            "busy_share": used / capacity if capacity else None, "jobs_per_worker": per_worker,
            "jobs": len(done), "stretch": sum(j["time"] for j in done) / expected if expected else None}


# -- the section ---------------------------------------------------------------------------------


def scaling(refs: dict[str, dict], runs: dict[str, dict], jobs: dict[str, list[dict]]) -> dict:
    """The figures docs/SCALING.md is written from: per kind, the server's CPU seconds and the
    broker's bytes per media second (reference run: one task at a time, upload included), and
    the job sizes; and the server's CPU per media second under the load of each run."""
    per_kind = {}
    for kind in ("separate", "transcode"):
        mine = [r for r in refs.values() if r["kind"] == kind]
        media = sum(r["media_seconds"] for r in mine)
        moved = {k: sum(r["broker_bytes"][k] for r in mine) for k in ("jobs", "results")}
        per_kind[kind] = {
            "media_seconds": media, "server_cpu_per_media_second": sum(r["server_cpu"] for r in mine) / media,
            "broker_bytes_per_media_second": {k: v / media for k, v in moved.items()},
            "broker_bytes_per_media_second_total": sum(moved.values()) / media,
            "input_bytes_per_media_second": sum(r["input_bytes"] for r in mine) / media,
            "job_sizes": size_summary(jobs[kind]) if jobs[kind] else None,
        }
    return {"per_kind": per_kind,
            "under_load": {mode: {"server_cpu_per_media_second": run["server_cpu_per_media_second"],
                                  "media_seconds": run["media_seconds"], "server_cpu": run["server_cpu"],
                                  "rabbitmq_cpu": run["rabbitmq_cpu"],
                                  "rabbitmq_cpu_per_media_second": run["rabbitmq_cpu"] / run["media_seconds"]
                                  if run["media_seconds"] else None}
                           for mode, run in runs.items()}}


def run(p: Profile, workdir: Path) -> dict:
    started = time.monotonic()
    workdir = workdir / "operations"
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs(p, workdir)
    sequence = schedule(p, inputs)
    timeout = 600 + 10 * p.seconds
    with Deployment(workdir, settings(p), [worker_env(1, 1.0)]) as deployment:
        refs = reference(deployment, inputs, timeout)
        deployment.stop_workers(deployment.workers)
        calibration = calibrate(p, sequence, refs)
        print(f"bench: operations: WORKER_SLOWDOWN={calibration['slowdown']:g} (compute per upload "
              f"{calibration['compute_per_upload']:.2f}s)", flush=True)
        runs = {}
        for mode in MODES:
            runs[mode] = load_run(deployment, p, mode, inputs, sequence, calibration["slowdown"], refs)
            r = runs[mode]
            print(f"bench: operations {mode}: {r['done']} of {r['uploads']} tasks done, {r['equal']} outputs equal "
                  f"to the reference, p50 {r['p50'] or 0:.1f}s p95 {r['p95'] or 0:.1f}s, at "
                  f"{time.monotonic() - started:.0f}s", flush=True)
    jobs = {kind: [j for r in runs.values() for j in r["jobs"] if j["kind"] == kind]
            for kind in ("separate", "transcode")}
    return {"profile": asdict(p), "settings": settings(p), "worker_kinds": KINDS, "modes": MODES,
            "inputs": {i.name: {"kind": i.kind, "file": i.path.name, "params": i.params} for i in inputs},
            "sequence": [i.name for i in sequence], "reference": refs, "calibration": calibration,
            "runs": runs, "scaling": scaling(refs, runs, jobs), "section_seconds": time.monotonic() - started}
