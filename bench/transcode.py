"""Section 6 of `make bench`: transcoding, the farm against one ffmpeg on the whole file.

For each codec at one preset and each output height: the wall time of a deployment with
2 workers x 1 encoder thread (POST /tasks → task done; the upload is not counted) against
one `ffmpeg` with the encoder's own threading on the whole file, both with the same
quality settings and both writing the audio; CPU seconds of either; PSNR of either against
the source (scaled the same way) and the sizes. Then the results cache on a repeated task,
the cost of checking (VERIFY=psnr, VERIFY_REPLICAS=2 and 3), Amdahl's projection from the
measured serial part (prepare: probe + split; merge: stitch + audio), bytes through the
broker per second of video, and joules.

Energy, cache hits, the serial part and the broker's bytes are the server's own figures in
a task's `stats` (energy, cache, timing, broker_bytes).

The farm's deployments run with CACHE_MB=0 except in the cache measurement, so a repeated
task is a real encode. Runs of the farm and of ffmpeg alternate, so a drift in the shared
machine's load falls on both alike; the idle farm's CPU during the ffmpeg runs is recorded.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.harness import Deployment, cpu_seconds, get_json, http
from src import config
from src.kinds.transcode import encode, stitch, tools
from src.kinds.transcode.kind import DEFAULT_CONTAINER, output_size

HOSTS = (1, 2, 4, 8, 16, 32)
GOAL = 1.05  # farm wall ÷ ffmpeg wall
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
    heights: tuple[int, ...]  # outputs; the last one is used for the check cost and the projection
    runs: int
    chunk_seconds: float
    preset: str = "veryfast"
    noise: int = 3  # temporal noise on testsrc2 before the source's encode: grain, so motion search has work


def profile(name: str) -> Profile:
    if name == "smoke":
        return Profile("smoke", 320, 240, 2.0, 25, 12, ("h264",), (240, 120), runs=1, chunk_seconds=0.5)
    if name == "quick":
        return Profile("quick", 1920, 1080, 6.0, 25, 25, encode.CODECS, (1080, 360), runs=1, chunk_seconds=1.0)
    # 400 frames in 8 jobs: about 17 minutes for the section on 2 quiet cores
    return Profile("full", 1920, 1080, 16.0, 25, 25, encode.CODECS, (1080, 360), runs=3, chunk_seconds=2.0)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def watts_per_core() -> float:
    return float(os.environ.get("WATTS_PER_CORE") or config.DEFAULTS.get("WATTS_PER_CORE", 3.5))


# -- the input ---------------------------------------------------------------------------


def source_command(p: Profile, path: Path) -> list[str]:
    """testsrc2 with temporal noise and a 440 Hz tone, as H.264 (CRF 20, a keyframe every
    `keyint` frames, 2 B-frames) and AAC in MP4: what a phone or an editor hands over."""
    return ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error",
            "-f", "lavfi", "-i", f"testsrc2=size={p.width}x{p.height}:rate={p.fps},noise=alls={p.noise}:allf=t",
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
            "-t", f"{p.seconds:g}", "-map", "0:v", "-map", "1:a", "-c:a", "aac", "-b:a", "128k",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
            "-g", str(p.keyint), "-keyint_min", str(p.keyint), "-sc_threshold", "0", "-bf", "2", "-y", str(path)]


def make_source(p: Profile, workdir: Path) -> tuple[Path, dict]:
    path = workdir / f"testsrc2-{p.width}x{p.height}-{p.fps}fps-{p.seconds:g}s.mp4"
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


def workers(count: int) -> list[dict[str, str]]:
    return [{"WORKER_THREADS": "1", "WORKER_KINDS": "transcode"}] * count


def settings(p: Profile, **extra: str) -> dict[str, str]:
    return {"CHUNK_SECONDS": f"{p.chunk_seconds:g}", "CACHE_MB": "0", "VERIFY": "off", "VERIFY_REPLICAS": "1",
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
    return cpu_seconds(deployment.server.pid) + sum(cpu_seconds(w.pid) for w in deployment.workers)


def run_task(deployment: Deployment, media_id: int, params: dict[str, Any], timeout: float,
             download: Path | None = None, kind: str = "transcode") -> dict:
    """POST /tasks, wait for done; wall (POST → the server's finished_at), CPU seconds of
    the server and workers meanwhile, the task's stats."""
    cpu0 = farm_cpu(deployment)
    posted = time.time()
    status, body = http("POST", deployment.base + "/tasks",
                        json.dumps({"kind": kind, "media_id": media_id, "params": params}).encode(),
                        "application/json")
    if status != 202:
        raise RuntimeError(f"POST /tasks -> {status} {body[:300]!r}")
    task_id = json.loads(body)["task_id"]
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
    cpu = farm_cpu(deployment) - cpu0
    if download is not None:
        got, data = http("GET", task["outputs"][0]["url"])
        if got != 200:
            raise RuntimeError(f"GET output -> {got}")
        download.write_bytes(data)
    return {"task_id": task_id, "wall": task["finished_at"] - posted, "cpu": cpu, "stats": task.get("stats") or {},
            "jobs_total": task.get("jobs_total"), "created_at": task.get("created_at"),
            "finished_at": task["finished_at"]}


def serial_part(run: dict) -> dict:
    """Prepare (probe + split) and merge (stitch + audio) seconds, as the server timed them."""
    timing = run["stats"]["timing"]
    return {"prepare": float(timing["prepare_seconds"]), "merge": float(timing["merge_seconds"]),
            "source": "stats.timing"}


def broker_bytes(stats: dict) -> int:
    return int(stats["broker_bytes"]["jobs"]) + int(stats["broker_bytes"]["results"])


# -- the section ---------------------------------------------------------------------------


def run(p: Profile, workdir: Path) -> dict:
    started = time.monotonic()
    workdir = workdir / "transcode"
    workdir.mkdir(parents=True, exist_ok=True)
    source, facts = make_source(p, workdir)
    print(f"bench: transcode: source made in {time.monotonic() - started:.0f}s", flush=True)
    timeout = 600 + 60 * p.seconds
    speed = farm_against_ffmpeg(p, source, facts, workdir, timeout)
    check_height = p.heights[-1]
    h264 = next(row for row in speed["rows"] if row["codec"] == "h264" and row["height"] == check_height)
    print(f"bench: transcode: farm against ffmpeg done at {time.monotonic() - started:.0f}s", flush=True)
    cache = measure_cache(p, source, timeout)
    print(f"bench: transcode: cache done at {time.monotonic() - started:.0f}s", flush=True)
    verify = measure_verify(p, source, timeout, h264)
    print(f"bench: transcode: check's cost done at {time.monotonic() - started:.0f}s", flush=True)
    projection = measure_projection(p, source, timeout, h264)
    chunk_frames = max(1, round(p.chunk_seconds * p.fps))
    return {"profile": asdict(p), "source": facts, "watts_per_core": watts_per_core(), "goal": GOAL,
            "crf": {codec: encode.DEFAULT_CRF[codec] for codec in p.codecs},
            "jobs_per_task": speed["rows"][0]["farm"]["jobs"] or -(-facts["frames"] // chunk_frames),
            "rows": speed["rows"], "idle_farm_cpu_during_ffmpeg": speed["idle_farm_cpu_during_ffmpeg"],
            "cache": cache, "verify": verify, "projection": projection,
            "section_seconds": time.monotonic() - started}


def farm_against_ffmpeg(p: Profile, source: Path, facts: dict, workdir: Path, timeout: float) -> dict:
    combos = [(codec, height) for codec in p.codecs for height in p.heights]
    farm: dict[tuple[str, int], list[dict]] = {c: [] for c in combos}
    whole: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in combos}
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
                before = farm_cpu(deployment)
                whole[(codec, height)].append(run_whole_file(command))
                idle_cpu += farm_cpu(deployment) - before
                theirs = workdir / f"farm-{codec}-{height}.{DEFAULT_CONTAINER[codec]}" if first else None
                farm[(codec, height)].append(run_task(deployment, media_id, params, timeout, theirs))
                print(f"bench: transcode {codec} {height}p run {index + 1}: farm "
                      f"{farm[(codec, height)][-1]['wall']:.1f}s, ffmpeg {whole[(codec, height)][-1][0]:.1f}s",
                      flush=True)
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
        found = runs[0]["stats"]["energy"]
        bytes_moved = broker_bytes(runs[0]["stats"])
        encoder = encode.encoder_for(codec, tools.encoders())
        farm_args = encode.encoder_args({**task_params(codec, height, p.preset), "bitrate": None, "threads": 1},
                                        encoder)
        command = whole_file_command(Path(source.name), Path(mine.name), task_params(codec, height, p.preset), size)
        rows.append({
            "codec": codec, "height": height, "width": size[0], "encoder": encoder, "container": ext,
            "params": task_params(codec, height, p.preset),
            "farm": {"wall": spread(walls), "cpu": spread(cpus), "psnr": farm_psnr, "bytes": farm_size,
                     "jobs": runs[0]["jobs_total"], "energy": found,
                     "joules_from_cpu": statistics.median(cpus) * watts, "encoder_args": shlex.join(farm_args),
                     "timing": runs[0]["stats"].get("timing"), "cache": runs[0]["stats"].get("cache"),
                     "broker_bytes": runs[0]["stats"].get("broker_bytes"),
                     "broker_bytes_per_video_second": bytes_moved / facts["seconds"]},
            "ffmpeg": {"wall": spread(base_walls), "cpu": spread(base_cpus), "psnr": ffmpeg_psnr,
                       "bytes": ffmpeg_size, "joules_estimated": statistics.median(base_cpus) * watts,
                       "command": shlex.join(command)},
            "ratio": statistics.median(walls) / statistics.median(base_walls),
            "ratios": spread([w / b for w, b in zip(walls, base_walls, strict=True)]),
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
            "repeat_job_rows": job_rows}


def measure_verify(p: Profile, source: Path, timeout: float, h264: dict) -> dict:
    """The check's cost on the h264 task at the smallest height: VERIFY=off (from the
    speed runs), VERIFY=psnr, VERIFY_REPLICAS=2 and 3 (as many workers as replicas, at
    least 2: a replica runs on another worker)."""
    params = task_params("h264", p.heights[-1], p.preset)
    configs = [("VERIFY=off", None, 2), ("VERIFY=psnr", {"VERIFY": "psnr"}, 2),
               ("VERIFY_REPLICAS=2", {"VERIFY_REPLICAS": "2"}, 2), ("VERIFY_REPLICAS=3", {"VERIFY_REPLICAS": "3"}, 3)]
    rows = []
    for label, extra, count in configs:
        if extra is None:
            rows.append({"label": label, "workers": 2, "wall": h264["farm"]["wall"], "cpu": h264["farm"]["cpu"]})
            continue
        walls, cpus = [], []
        # replicas vote once per broker login: each worker has its own, as each host would
        with Deployment(source.parent, settings(p, **extra), workers(count),
                        own_logins="VERIFY_REPLICAS" in extra) as deployment:
            media_id = upload(deployment, source)
            for _ in range(p.runs):
                done = run_task(deployment, media_id, params, timeout)
                walls.append(done["wall"])
                cpus.append(done["cpu"])
        rows.append({"label": label, "workers": count, "wall": spread(walls), "cpu": spread(cpus)})
    base = rows[0]
    for row in rows:
        row["wall_ratio"] = row["wall"]["median"] / base["wall"]["median"]
        row["cpu_ratio"] = row["cpu"]["median"] / base["cpu"]["median"]
    return {"params": params, "rows": rows}


def amdahl(serial_share: float, n: int) -> float:
    return 1 / (serial_share + (1 - serial_share) / n)


def measure_projection(p: Profile, source: Path, timeout: float, h264: dict) -> dict:
    """A 1-worker run of the h264 task at the smallest height: the serial share s is
    (prepare + merge) ÷ its wall time; S(N) = 1 / (s + (1 − s) / N)."""
    params = task_params("h264", p.heights[-1], p.preset)
    walls, serials = [], []
    with Deployment(source.parent, settings(p), workers(1)) as deployment:
        media_id = upload(deployment, source)
        for _ in range(p.runs):
            done = run_task(deployment, media_id, params, timeout)
            walls.append(done["wall"])
            serials.append(serial_part(done))
    prepare = statistics.median(s["prepare"] for s in serials)
    merge = statistics.median(s["merge"] for s in serials)
    wall = statistics.median(walls)
    share = min(1.0, (prepare + merge) / wall)
    return {"params": params, "wall_1_worker": spread(walls), "wall_2_workers": h264["farm"]["wall"],
            "measured_speedup_2": wall / h264["farm"]["wall"]["median"],
            "serial": {"prepare": prepare, "merge": merge, "share": share, "source": serials[0]["source"]},
            "speedup": {str(n): amdahl(share, n) for n in HOSTS}, "limit": 1 / share if share else None}
