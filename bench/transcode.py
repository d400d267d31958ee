"""Section 6 of `make bench`: transcoding, the farm against one ffmpeg, and what stays serial.

- **The farm against one ffmpeg** on one 2-core host: for each codec at one preset, the wall
  time of a deployment with 2 workers x 1 encoder thread (POST /tasks → task done; the upload
  is not counted) against one `ffmpeg` with the encoder's own threading on the whole file, both
  with the same quality settings and both writing the audio; CPU seconds of either; PSNR of
  either against the source (scaled the same way) and the sizes. Runs of the farm and of
  ffmpeg alternate, so a drift in the shared machine's load falls on both alike.
- **The results cache** on a repeated task and **the cost of checking** (VERIFY=psnr,
  VERIFY_REPLICAS=2 and 3), where the profile asks for them.
- **The serial share** (issue 22): tasks run one at a time on 1 worker; the server's CPU
  seconds over all CPU seconds (server + worker). Two measures: the task's own
  `stats.serial` (prepare, plan, payload, check, merge: each phase's thread CPU plus its
  ffmpeg/ffprobe children, src/server/serial.py) and /proc (the whole server process, its
  HTTP and broker threads and idle polling included, against the worker process with its
  ffmpeg children). RabbitMQ's CPU is in neither.
- **Emulated hosts**: 1, 2, 4 and 8 workers, each WORKER_SLOWDOWN=N times slower than a core
  here (a job ends N times its CPU time after it started: what a slower machine of its own
  would take), so that 8 "hosts" fit on 2 cores as bench section 8 does; the speed-up is the
  1-worker wall time over the n-worker one, next to Amdahl's law for the serial share of
  the 1-worker run. Each run also records Σ job time ÷ (N x Σ job CPU): about 1 when the
  emulation held, above it when the shared cores were too busy to give each job its CPU.
- **First job on the broker**: POST /tasks of a 10-minute 1080p input → the first job's
  `queued_at` (the broker's receipt), with one live worker; the task is then cancelled.

The farm's deployments run with CACHE_MB=0 except in the cache measurement, so a repeated
task is a real encode, and with the default CHUNK_SECONDS unless the profile names one (the
planner then gives every live worker a part). `uptime`'s load averages are recorded at the
start and end of each part: the machine is shared.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.harness import Deployment, cpu_seconds, free_port, get_json, http
from src import config
from src.kinds.transcode import encode, stitch, tools
from src.kinds.transcode.kind import DEFAULT_CONTAINER, output_size

HOSTS = (1, 2, 4, 8, 16, 32)
GOAL = 1.15  # farm wall ÷ ffmpeg wall at 1080p (issue 22)
SERIAL_GOAL = 0.05  # server CPU ÷ all CPU of a 1-worker run (issue 22; faceblur's is 0.03)
SPEEDUP_GOAL = 6.0  # at 8 emulated hosts
FIRST_JOB_GOAL = 1.0  # seconds from POST /tasks to the first job on the broker
# Flags that pin or switch off an encoder's own parallelism in the farm's command; the
# whole-file run leaves them out, so each encoder threads as it does by default.
THREAD_FLAGS = {"-threads", "-row-mt", "-tile-columns", "-frame-parallel", "-tiles"}
THREAD_PARAMS = {"pools", "frame-threads", "lp"}  # inside -x265-params / -svtav1-params


@dataclass(frozen=True)
class Profile:
    name: str
    width: int  # the source
    height: int
    seconds: float
    fps: int
    keyint: int  # frames between the source's keyframes
    codecs: tuple[str, ...]
    heights: tuple[int, ...]  # outputs of the farm against ffmpeg
    runs: int
    chunk_seconds: float | None  # None: the default (jobs follow the clip's length and the live workers)
    preset: str = "veryfast"
    noise: int = 3  # temporal noise on testsrc2 before the source's encode: grain, so motion search has work
    extras: bool = True  # the cache and the cost of checking
    serial_codecs: tuple[str, ...] = ("h264", "av1")
    serial_heights: tuple[int, ...] = (1080, 360)
    serial_runs: int = 1
    hosts_seconds: float = 24.0  # the emulated hosts' clip (same size and rate as the source)
    hosts_codecs: tuple[str, ...] = ("h264", "av1")
    hosts_preset: str = "ultrafast"
    hosts_workers: tuple[int, ...] = (1, 2, 4, 8)
    slowdown: float = 10.0
    worker_nice: int = 5  # the emulated hosts' priority (niced), so they do not starve the server's own work
    first_job_minutes: float = 10.0


def profile(name: str) -> Profile:
    if name == "smoke":
        return Profile("smoke", 320, 240, 2.0, 25, 12, ("h264",), (240,), runs=1, chunk_seconds=0.5,
                       extras=True, serial_codecs=("h264",), serial_heights=(240,), hosts_seconds=4.0,
                       hosts_codecs=("h264",), hosts_workers=(1, 2), slowdown=2.0, first_job_minutes=0.5)
    if name == "quick":
        return Profile("quick", 1920, 1080, 6.0, 25, 25, encode.CODECS, (1080,), runs=1, chunk_seconds=None,
                       extras=False, hosts_seconds=12.0, hosts_workers=(1, 2, 4), slowdown=6.0,
                       first_job_minutes=2.0)
    # About 25 minutes on 2 cores under load, the emulated hosts 12 of them. Their clip is 32 s, not
    # the 60 s: 8 workers then get 8 equal jobs of 4 s (60 s gives 7 of 8 s and a half one), and
    # WORKER_SLOWDOWN=10 leaves 8 workers' encodes room on 2 shared cores (8 failed to under a load of 7).
    return Profile("full", 1920, 1080, 16.0, 25, 25, encode.CODECS, (1080,), runs=1, chunk_seconds=None,
                   hosts_seconds=32.0, slowdown=10.0)


def uptime() -> str:
    """The load averages now (the machine is shared: every timing says under what load it was taken)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def watts_per_core() -> float:
    return float(os.environ.get("WATTS_PER_CORE") or config.DEFAULTS.get("WATTS_PER_CORE", 3.5))


# -- the input ---------------------------------------------------------------------------


def source_command(p: Profile, path: Path) -> list[str]:
    """testsrc2 with temporal noise and a 440 Hz tone, as H.264 (CRF 20, a keyframe every
    `keyint` frames, 2 B-frames) and AAC in MP4: what a phone or an editor hands over."""
    return ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error",
            "-f", "lavfi", "-i", f"testsrc2=size={p.width}x{p.height}:rate={p.fps}"
            + (f",noise=alls={p.noise}:allf=t" if p.noise else ""),
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
            "-t", f"{p.seconds:g}", "-map", "0:v", "-map", "1:a", "-c:a", "aac", "-b:a", "128k",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
            "-g", str(p.keyint), "-keyint_min", str(p.keyint), "-sc_threshold", "0", "-bf", "2", "-y", str(path)]


def make_source(p: Profile, workdir: Path) -> tuple[Path, dict]:
    path = workdir / f"testsrc2-{p.width}x{p.height}-{p.fps}fps-{p.seconds:g}s{'' if p.noise else '-clean'}.mp4"
    command = source_command(p, path)
    if not path.exists():
        subprocess.run(command, check=True, timeout=1800)
    info = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries",
         "stream=nb_read_packets:format=duration,size,bit_rate", "-of", "json", str(path)],
        capture_output=True, check=True, timeout=120).stdout)
    return path, {"name": path.name, "width": p.width, "height": p.height, "fps": p.fps, "keyint": p.keyint,
                  "frames": int(info["streams"][0]["nb_read_packets"]), "seconds": float(info["format"]["duration"]),
                  "bytes": int(info["format"]["size"]), "bitrate": int(info["format"].get("bit_rate") or 0),
                  "command": shlex.join(command[:-1] + [path.name])}


# -- one ffmpeg on the whole file ----------------------------------------------------------


def task_params(codec: str, height: int, preset: str) -> dict[str, Any]:
    return {"codec": codec, "crf": encode.DEFAULT_CRF[codec], "height": height, "preset": preset}


def whole_file_encoder_args(params: dict[str, Any], encoder: str) -> list[str]:
    """The farm's encoder flags (`encode.encoder_args`) without its thread pinning."""
    args = encode.encoder_args({**params, "bitrate": None, "threads": 1}, encoder)
    kept: list[str] = []
    index = 0
    while index < len(args):
        flag = args[index]
        if flag in THREAD_FLAGS:
            index += 2
            continue
        if flag in ("-x265-params", "-svtav1-params"):
            rest = [kv for kv in args[index + 1].split(":") if kv.split("=", 1)[0] not in THREAD_PARAMS]
            kept += [flag, ":".join(rest)] if rest else []
            index += 2
            continue
        kept.append(flag)
        index += 1
    return kept


def whole_file_command(source: Path, output: Path, params: dict[str, Any], size: tuple[int, int]) -> list[str]:
    """What a user would run: one ffmpeg, the encoder's default threads, the same quality
    flags, scale and audio as the farm (AAC 128k, Opus in WebM), the same container."""
    codec = params["codec"]
    encoder = encode.encoder_for(codec, tools.encoders())
    if encoder is None:
        raise RuntimeError(f"this ffmpeg has no {codec} encoder")
    container = DEFAULT_CONTAINER[codec]
    args = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-i", str(source), "-map", "0:v:0", "-map", "0:a:0",
            "-vf", f"scale={size[0]}:{size[1]}:flags=bicubic,format=yuv420p",
            *whole_file_encoder_args(params, encoder), "-pix_fmt", "yuv420p",
            "-c:a", "libopus" if container == "webm" else "aac", "-b:a", stitch.AUDIO_BITRATE]
    if container == "mp4":
        args += ["-movflags", "+faststart"] + (["-tag:v", "hvc1"] if codec == "hevc" else [])
    return args + ["-f", stitch.FORMATS[container], "-y", str(output)]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_whole_file(command: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ffmpeg run."""
    cpu0, started = children_cpu(), time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, timeout=7200)
    return time.perf_counter() - started, children_cpu() - cpu0


def psnr(encoded: Path, source: Path, size: tuple[int, int]) -> float:
    """Average PSNR (dB, Y/U/V weighted as ffmpeg's psnr filter) of `encoded` against the
    source scaled to the same size the same way."""
    graph = (f"[0:v]format=yuv420p[a];[1:v]scale={size[0]}:{size[1]}:flags=bicubic,format=yuv420p[b];"
             "[a][b]psnr")
    done = subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-i", str(encoded), "-i", str(source),
                           "-lavfi", graph, "-f", "null", "-"], capture_output=True, check=True, timeout=3600)
    found = re.findall(rb"average:([0-9.]+|inf)", done.stderr)
    return float(found[-1]) if found else float("nan")


# -- the farm ----------------------------------------------------------------------------


def workers(count: int, **extra: str) -> list[dict[str, str]]:
    return [{"WORKER_THREADS": "1", "WORKER_KINDS": "transcode", **extra}] * count


def settings(p: Profile, **extra: str) -> dict[str, str]:
    chunk = {} if p.chunk_seconds is None else {"CHUNK_SECONDS": f"{p.chunk_seconds:g}"}
    # the data endpoint on a port of its own (its default, SERVER_PORT + 1, may be taken on a shared host)
    return {**chunk, "CACHE_MB": "0", "VERIFY": "off", "VERIFY_REPLICAS": "1", "DATA_PORT": str(free_port()),
            **extra}


def upload(deployment: Deployment, path: Path) -> int:
    """POST /media with the raw file and its name; the medium's id."""
    request = urllib.request.Request(deployment.base + "/media", data=path.read_bytes(), method="POST",
                                     headers={"Content-Type": "application/octet-stream", "X-Filename": path.name})
    try:
        with urllib.request.urlopen(request, timeout=600) as answer:
            return json.loads(answer.read())["media_id"]
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"upload failed: {error.code} {error.read()[:200]!r}") from None


def farm_cpu(deployment: Deployment) -> float:
    return cpu_seconds(deployment.server.pid) + live_workers_cpu(deployment)


def live_workers_cpu(deployment: Deployment) -> float:
    """CPU seconds of the deployment's worker processes still running (stopped ones are gone from /proc)."""
    total = 0.0
    for worker in deployment.workers:
        try:
            total += cpu_seconds(worker.pid)
        except OSError:
            pass
    return total


def post_task(deployment: Deployment, media_id: int, params: dict[str, Any], kind: str = "transcode"
              ) -> tuple[int, float]:
    """POST /tasks; (task id, when it was posted)."""
    posted = time.time()
    status, body = http("POST", deployment.base + "/tasks",
                        json.dumps({"kind": kind, "media_id": media_id, "params": params}).encode(),
                        "application/json")
    if status != 202:
        raise RuntimeError(f"POST /tasks -> {status} {body[:300]!r}")
    return json.loads(body)["task_id"], posted


def run_task(deployment: Deployment, media_id: int, params: dict[str, Any], timeout: float,
             download: Path | None = None, kind: str = "transcode") -> dict:
    """POST /tasks, wait for done; wall (POST → the server's finished_at), CPU seconds of
    the server and workers meanwhile (/proc, each apart), the task's stats."""
    server0, workers0 = cpu_seconds(deployment.server.pid), live_workers_cpu(deployment)
    task_id, posted = post_task(deployment, media_id, params, kind)
    deadline = time.monotonic() + timeout
    while True:
        task = get_json(f"{deployment.base}/tasks/{task_id}")
        if task["state"] == "done":
            break
        if task["state"] in ("failed", "cancelled"):
            raise RuntimeError(f"task {task_id} {task['state']}: {task.get('error')}")
        if time.monotonic() > deadline:
            http("DELETE", f"{deployment.base}/tasks/{task_id}")
            raise TimeoutError(f"task {task_id} not done in {timeout:.0f}s")
        time.sleep(0.5)
    server_cpu = cpu_seconds(deployment.server.pid) - server0
    workers_cpu = live_workers_cpu(deployment) - workers0
    if download is not None:
        got, data = http("GET", task["outputs"][0]["url"])
        if got != 200:
            raise RuntimeError(f"GET output -> {got}")
        download.write_bytes(data)
    return {"task_id": task_id, "wall": task["finished_at"] - posted, "cpu": server_cpu + workers_cpu,
            "server_cpu": server_cpu, "workers_cpu": workers_cpu, "stats": task.get("stats") or {},
            "jobs_total": task.get("jobs_total"), "created_at": task.get("created_at"),
            "finished_at": task["finished_at"]}


def broker_bytes(stats: dict) -> int:
    moved = stats.get("broker_bytes") or {}
    return int(moved.get("jobs") or 0) + int(moved.get("results") or 0)


def load_before() -> dict | None:
    """Figures of the code before issue 22 (BENCH_BEFORE: a JSON file `serial_share_before` wrote
    from a worktree of that commit), shown beside today's; None when not given."""
    path = os.environ.get("BENCH_BEFORE")
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else None


# -- the section ---------------------------------------------------------------------------


def run(p: Profile, workdir: Path) -> dict:
    started = time.monotonic()
    workdir = workdir / "transcode"
    workdir.mkdir(parents=True, exist_ok=True)

    def say(what: str) -> None:
        print(f"bench: transcode: {what} at {time.monotonic() - started:.0f}s (load {uptime()})", flush=True)

    source, facts = make_source(p, workdir)
    say("source made")
    timeout = 600 + 60 * p.seconds
    result: dict[str, Any] = {"profile": asdict(p), "source": facts, "watts_per_core": watts_per_core(),
                              "goal": GOAL, "crf": {codec: encode.DEFAULT_CRF[codec] for codec in p.codecs},
                              "load": {"start": uptime()}}
    speed = farm_against_ffmpeg(p, source, facts, workdir, timeout)
    result.update(rows=speed["rows"], idle_farm_cpu_during_ffmpeg=speed["idle_farm_cpu_during_ffmpeg"],
                  jobs_per_task=speed["rows"][0]["farm"]["jobs"])
    say("farm against ffmpeg done")
    if p.extras:
        result["cache"] = measure_cache(p, source, timeout)
        say("cache done")
        result["verify"] = measure_verify(p, source, timeout)
        say("check's cost done")
    result["serial"] = serial_share(p, source, timeout)
    say("serial share done")
    hosts_source, hosts_facts = make_source(replace(p, seconds=p.hosts_seconds), workdir)
    result["hosts"] = emulated_hosts(p, hosts_source, hosts_facts)
    say("emulated hosts done")
    result["first_job"] = first_job(p, workdir)
    say("first job done")
    before = load_before()
    if before:
        result["before"] = before.get("transcode")
    result["load"]["end"] = uptime()
    result["section_seconds"] = time.monotonic() - started
    return result


def farm_against_ffmpeg(p: Profile, source: Path, facts: dict, workdir: Path, timeout: float) -> dict:
    combos = [(codec, height) for codec in p.codecs for height in p.heights]
    farm: dict[tuple[str, int], list[dict]] = {c: [] for c in combos}
    whole: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in combos}
    loads: dict[tuple[str, int], list[str]] = {c: [] for c in combos}
    idle_cpu = 0.0
    with Deployment(workdir, settings(p), workers(2)) as deployment:
        media_id = upload(deployment, source)
        for index in range(p.runs):
            for codec, height in combos:
                params = task_params(codec, height, p.preset)
                size = output_size(p.width, p.height, height)
                first = index == 0
                mine = workdir / f"ffmpeg-{codec}-{height}.{DEFAULT_CONTAINER[codec]}"
                command = whole_file_command(source, mine, params, size)
                loads[(codec, height)].append(uptime())
                before = farm_cpu(deployment)
                whole[(codec, height)].append(run_whole_file(command))
                idle_cpu += farm_cpu(deployment) - before
                theirs = workdir / f"farm-{codec}-{height}.{DEFAULT_CONTAINER[codec]}" if first else None
                farm[(codec, height)].append(run_task(deployment, media_id, params, timeout, theirs))
                print(f"bench: transcode {codec} {height}p run {index + 1}: farm "
                      f"{farm[(codec, height)][-1]['wall']:.1f}s, ffmpeg {whole[(codec, height)][-1][0]:.1f}s "
                      f"(load {loads[(codec, height)][-1]})", flush=True)
    rows = []
    watts = watts_per_core()
    for codec, height in combos:
        size = output_size(p.width, p.height, height)
        ext = DEFAULT_CONTAINER[codec]
        mine, theirs = workdir / f"ffmpeg-{codec}-{height}.{ext}", workdir / f"farm-{codec}-{height}.{ext}"
        runs, baseline = farm[(codec, height)], whole[(codec, height)]
        farm_psnr, ffmpeg_psnr = psnr(theirs, source, size), psnr(mine, source, size)
        farm_size, ffmpeg_size = theirs.stat().st_size, mine.stat().st_size
        walls, cpus = [r["wall"] for r in runs], [r["cpu"] for r in runs]
        base_walls, base_cpus = [w for w, _ in baseline], [c for _, c in baseline]
        found = runs[0]["stats"].get("energy")
        bytes_moved = broker_bytes(runs[0]["stats"])
        encoder = encode.encoder_for(codec, tools.encoders())
        farm_args = encode.encoder_args({**task_params(codec, height, p.preset), "bitrate": None, "threads": 1},
                                        encoder)
        command = whole_file_command(Path(source.name), Path(mine.name), task_params(codec, height, p.preset), size)
        rows.append({
            "codec": codec, "height": height, "width": size[0], "encoder": encoder, "container": ext,
            "params": task_params(codec, height, p.preset), "load": loads[(codec, height)],
            "farm": {"wall": spread(walls), "cpu": spread(cpus), "psnr": farm_psnr, "bytes": farm_size,
                     "server_cpu": spread([r["server_cpu"] for r in runs]),
                     "jobs": runs[0]["jobs_total"], "energy": found,
                     "joules_from_cpu": statistics.median(cpus) * watts, "encoder_args": shlex.join(farm_args),
                     "timing": runs[0]["stats"].get("timing"), "serial": runs[0]["stats"].get("serial"),
                     "cache": runs[0]["stats"].get("cache"), "broker_bytes": runs[0]["stats"].get("broker_bytes"),
                     "broker_bytes_per_video_second": bytes_moved / facts["seconds"]},
            "ffmpeg": {"wall": spread(base_walls), "cpu": spread(base_cpus), "psnr": ffmpeg_psnr,
                       "bytes": ffmpeg_size, "joules_estimated": statistics.median(base_cpus) * watts,
                       "command": shlex.join(command)},
            "ratio": statistics.median(walls) / statistics.median(base_walls),
            "ratios": spread([w / b for w, b in zip(walls, base_walls, strict=True)]),
            "cpu_ratio": statistics.median(cpus) / statistics.median(base_cpus),
            "psnr_delta": farm_psnr - ffmpeg_psnr, "size_ratio": farm_size / ffmpeg_size,
        })
    return {"rows": rows, "idle_farm_cpu_during_ffmpeg": idle_cpu}


def measure_cache(p: Profile, source: Path, timeout: float) -> dict:
    """The same task twice on a deployment with the cache on (CACHE_MB at its default)."""
    params = task_params("h264", p.heights[0], p.preset)
    cache_mb = str(config.DEFAULTS.get("CACHE_MB", 2048))
    with Deployment(source.parent, settings(p, CACHE_MB=cache_mb), workers(2)) as deployment:
        media_id = upload(deployment, source)
        first = run_task(deployment, media_id, params, timeout)
        repeat = run_task(deployment, media_id, params, timeout)
        job_rows = len(deployment.jobs(repeat["task_id"]))
    return {"params": params, "cache_mb": int(cache_mb), "first": {k: first[k] for k in ("wall", "cpu", "jobs_total")},
            "repeat": {k: repeat[k] for k in ("wall", "cpu", "jobs_total")},
            "first_cache": first["stats"].get("cache"), "repeat_cache": repeat["stats"].get("cache"),
            "repeat_job_rows": job_rows, "load": uptime()}


def measure_verify(p: Profile, source: Path, timeout: float) -> dict:
    """The check's cost on the h264 task at the smallest serial height: VERIFY=off, VERIFY=psnr,
    VERIFY_REPLICAS=2 and 3 (as many workers as replicas, at least 2: a replica runs on another
    worker)."""
    params = task_params("h264", p.serial_heights[-1], p.preset)
    configs = [("VERIFY=off", {}, 2), ("VERIFY=psnr", {"VERIFY": "psnr"}, 2),
               ("VERIFY_REPLICAS=2", {"VERIFY_REPLICAS": "2"}, 2), ("VERIFY_REPLICAS=3", {"VERIFY_REPLICAS": "3"}, 3)]
    rows = []
    for label, extra, count in configs:
        walls, cpus = [], []
        # replicas vote once per broker login: each worker has its own, as each host would
        with Deployment(source.parent, settings(p, **extra), workers(count),
                        own_logins="VERIFY_REPLICAS" in extra) as deployment:
            media_id = upload(deployment, source)
            for _ in range(p.runs):
                done = run_task(deployment, media_id, params, timeout)
                walls.append(done["wall"])
                cpus.append(done["cpu"])
        rows.append({"label": label, "workers": count, "wall": spread(walls), "cpu": spread(cpus), "load": uptime()})
    base = rows[0]
    for row in rows:
        row["wall_ratio"] = row["wall"]["median"] / base["wall"]["median"]
        row["cpu_ratio"] = row["cpu"]["median"] / base["cpu"]["median"]
    return {"params": params, "rows": rows}


def amdahl(serial_share: float, n: int) -> float:
    return 1 / (serial_share + (1 - serial_share) / n)


def serial_of(done: dict) -> dict:
    """One 1-worker task's serial share, both ways: the task's stats.serial (the phases) and /proc."""
    stats = done["stats"].get("serial") or {}
    proc_share = done["server_cpu"] / (done["server_cpu"] + done["workers_cpu"]) if done["cpu"] > 0 else None
    return {"wall": done["wall"], "jobs": done["jobs_total"], "proc": {
        "server_cpu": done["server_cpu"], "workers_cpu": done["workers_cpu"], "share": proc_share},
        "stats": stats or None, "share": stats.get("share", proc_share), "load": uptime()}


def serial_share(p: Profile, source: Path, timeout: float, preset: str | None = None) -> dict:
    """Each serial codec and height on 1 worker, one task at a time: the server's share of all CPU."""
    rows = []
    with Deployment(source.parent, settings(p), workers(1)) as deployment:
        media_id = upload(deployment, source)
        for codec in p.serial_codecs:
            for height in p.serial_heights:
                params = task_params(codec, height, preset or p.preset)
                runs = [serial_of(run_task(deployment, media_id, params, timeout)) for _ in range(p.serial_runs)]
                best = min(runs, key=lambda r: r["share"] if r["share"] is not None else 1.0)
                rows.append({"codec": codec, "height": height, "params": params, "runs": runs,
                             "share": statistics.median(r["share"] for r in runs), "example": best})
                print(f"bench: transcode serial share {codec} {height}p: {rows[-1]['share']:.4f} "
                      f"(load {uptime()})", flush=True)
    return {"goal": SERIAL_GOAL, "rows": rows, "source": source.name}


def niced(nice: int, start: Callable[[], Any]) -> Any:
    """`start()` with this thread at `nice`: the processes it forks keep it (a worker's ffmpeg too).
    Emulated hosts stand for machines of their own, which would not take the server's cores: at a
    lower priority they no longer starve the server's cutting and checking on the shared cores.
    Going back to the thread's priority needs CAP_SYS_NICE; without it the bench stays niced."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    if nice <= before:
        return start()
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    try:
        return start()
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, before)
        except PermissionError:
            pass


def emulated_hosts(p: Profile, source: Path, facts: dict) -> dict:
    """1, 2, 4, 8 workers, each WORKER_SLOWDOWN times slower, on one server: the same task per codec
    on each; the speed-up against 1 worker and Amdahl's law for the 1-worker run's serial share."""
    timeout = 600 + 60 * p.hosts_seconds * p.slowdown
    runs: dict[str, dict[int, dict]] = {codec: {} for codec in p.hosts_codecs}
    # deadlines for jobs N times slower than this host's (a re-publication would run a job twice)
    with Deployment(source.parent, settings(p, JOB_DEADLINE_FACTOR=f"{10 * p.slowdown:g}"), []) as deployment:
        media_id = upload(deployment, source)
        for count in p.hosts_workers:
            wanted = workers(count, WORKER_SLOWDOWN=f"{p.slowdown:g}")
            started = niced(p.worker_nice, lambda wanted=wanted: deployment.add_workers(wanted))
            for codec in p.hosts_codecs:
                load = uptime()
                params = task_params(codec, p.height, p.hosts_preset)
                done = run_task(deployment, media_id, params, timeout)
                jobs = deployment.jobs(done["task_id"])
                compute = float((done["stats"].get("energy") or {}).get("cpu_seconds") or 0)
                held = sum(j["time"] for j in jobs) / (p.slowdown * compute) if compute else None
                runs[codec][count] = {"wall": done["wall"], "server_cpu": done["server_cpu"],
                                      "workers_cpu": done["workers_cpu"], "jobs": done["jobs_total"],
                                      "serial": done["stats"].get("serial"), "emulation": held,
                                      "load": [load, uptime()]}
                print(f"bench: transcode hosts {codec} x{count}: {done['wall']:.1f}s, {done['jobs_total']} jobs, "
                      f"emulation {held if held is None else round(held, 2)} (load {uptime()})", flush=True)
            deployment.stop_workers(started)
            time.sleep(1)  # the leaving workers are off the registry before the next plan counts workers
    result: dict[str, Any] = {"source": facts, "preset": p.hosts_preset, "slowdown": p.slowdown,
                              "worker_nice": p.worker_nice,
                              "workers": list(p.hosts_workers), "goal": SPEEDUP_GOAL, "codecs": {}}
    for codec, by_count in runs.items():
        one = by_count[p.hosts_workers[0]]
        share = (one["serial"] or {}).get("share")
        if share is None:
            share = one["server_cpu"] / (one["server_cpu"] + one["workers_cpu"])
        result["codecs"][codec] = {
            "runs": {str(n): r for n, r in by_count.items()},
            "speedup": {str(n): one["wall"] / r["wall"] for n, r in by_count.items()},
            "serial_share": share,
            "amdahl": {str(n): amdahl(share, n) for n in HOSTS},
            # the emulation's own Amdahl: the server at full speed, each worker N times slower
            "amdahl_emulated": {str(n): amdahl(share / (share + p.slowdown * (1 - share)), n) for n in HOSTS}}
    return result


def first_job(p: Profile, workdir: Path) -> dict:
    """A p.first_job_minutes 1080p input (a clean testsrc2 minute, stream-copied end to end), one live
    worker: POST /tasks → the first job's queued_at (published and confirmed by the broker)."""
    minute = replace(p, seconds=60.0 if p.first_job_minutes >= 1 else p.first_job_minutes * 60, noise=0)
    piece, _ = make_source(minute, workdir)
    repeats = max(1, round(p.first_job_minutes * 60 / minute.seconds))
    listing = workdir / "first-job.ffconcat"
    listing.write_text("ffconcat version 1.0\n" + f"file '{piece}'\n" * repeats)
    path = workdir / f"testsrc2-{p.width}x{p.height}-{p.first_job_minutes:g}min.mp4"
    if not path.exists():
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "concat", "-safe", "0", "-i", str(listing),
                        "-c", "copy", "-movflags", "+faststart", "-y", str(path)], check=True, timeout=600)
    rows = []
    with Deployment(workdir, settings(p, MAX_UPLOAD_MB="4000"), workers(1)) as deployment:
        media_id = upload(deployment, path)
        for _ in range(2):
            load = uptime()
            task_id, posted = post_task(deployment, media_id, task_params("h264", p.height, "ultrafast"))
            # one light request a quarter second (the job list would cost the server a request per job):
            # wait for the worker's first attempt, then read when each job was queued
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not get_json(f"{deployment.base}/tasks/{task_id}/timeline"):
                time.sleep(0.25)
            http("DELETE", f"{deployment.base}/tasks/{task_id}")
            jobs = deployment.jobs(task_id)
            queued = [j["queued_at"] for j in jobs if j.get("queued_at")]
            rows.append({"seconds": min(queued) - posted if queued else None, "jobs": len(jobs), "load": load})
            print(f"bench: transcode first job: {rows[-1]['seconds']} s after POST /tasks ({len(jobs)} jobs)",
                  flush=True)
            time.sleep(2)  # the cancelled job leaves the worker
    return {"minutes": p.first_job_minutes, "bytes": path.stat().st_size, "goal": FIRST_JOB_GOAL, "runs": rows,
            "name": path.name}
