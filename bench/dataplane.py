"""Section 11 of `make bench`: the data plane. What the broker, the server and the data endpoint
carry per media second, for each kind.

One deployment (a server and one worker that runs every kind) takes, one after the other, a
song (`separate`, demucs_unittest), a 640x360 clip to transcode (h264 to 360p) and the same
clip to face-blur, each uploaded with `POST /media` and run with `POST /tasks`. Around each task:

- broker bytes: RabbitMQ's management API (`/api/connections`, port 15672) gives every
  connection's `recv_oct` and `send_oct`, the octets it sent into the broker and took out of it.
  The deployment's connections are those whose client port is a socket of one of its processes
  (psutil): they run as guest here, a login that other programs on this host share, so the login
  alone does not pick them out. Their sum is read before the upload and again after the task is
  done and the statistics have been refreshed (RabbitMQ samples them every 5 s), so it counts
  every message of the task where it enters and where it leaves the broker, heart-beats and
  presence included (about 10 s of idle traffic around the task as well);
- server CPU seconds: utime + stime of the server and of its waited-for children (ffmpeg), from
  before the upload to done (bench.harness.cpu_seconds);
- wall time: `POST /tasks` until the task is done, with the machine's load average beside it
  (the host is shared: timings move with it, byte counts do not).

Where the code has a data endpoint (`src/data`, issue 24), it also times one large download of a
job input from it over loopback, with a capability the store made.

`python -m bench.dataplane --out FILE` runs the same measurement in any checkout of this
project, so the code before the claim check (commit b01a01a, a worktree of its own) was measured
with this module: its figures are kept in bench/dataplane-before.json and shown beside today's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import requests

from bench.harness import Deployment, cpu_seconds, get_json, http, make_song

MANAGEMENT = "http://localhost:15672/api"
STATS_REFRESH_SECONDS = 6.0  # RabbitMQ's collect_statistics_interval (5 s) and a margin
BEFORE = Path(__file__).with_name("dataplane-before.json")


@dataclass(frozen=True)
class Profile:
    name: str
    song_seconds: float
    video_seconds: float
    width: int
    height: int
    chunk_seconds: float
    download_mb: int


def profile(name: str) -> Profile:
    if name == "smoke":
        return Profile("smoke", 6, 1, 320, 180, 2, 32)
    return Profile(name, 60, 8, 640, 360, 4, 1024)


def load() -> str:
    """The load averages as `uptime` prints them: the host is shared, timings move with it."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


# -- inputs -------------------------------------------------------------------------------------


def make_clip(path: Path, seconds: float, width: int, height: int) -> Path:
    """testsrc2 with a 440 Hz tone, H.264 (a keyframe a second) and AAC in MP4: a phone's clip."""
    if not path.exists():
        subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-v", "error",
                        "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate=25",
                        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", f"{seconds:g}",
                        "-map", "0:v", "-map", "1:a", "-c:a", "aac", "-b:a", "128k", "-c:v", "libx264",
                        "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", "25", "-keyint_min", "25",
                        "-sc_threshold", "0", "-y", str(path)], check=True, capture_output=True, timeout=600)
    return path


def inputs(p: Profile, workdir: Path) -> list[tuple[str, Path, dict]]:
    """(kind, medium, params) of each task: the bench's song and clip."""
    song = make_song(workdir / f"dataplane-song-{p.song_seconds:g}s.wav", p.song_seconds)
    clip = make_clip(workdir / f"dataplane-{p.width}x{p.height}-{p.video_seconds:g}s.mp4", p.video_seconds,
                     p.width, p.height)
    return [("separate", song, {}),
            ("transcode", clip, {"codec": "h264", "height": 360, "preset": "veryfast"}),
            ("faceblur", clip, {"mode": "blur"})]


# -- broker octets --------------------------------------------------------------------------------


def broker_port() -> int:
    return int(os.environ.get("BROKER_PORT", "61613"))


def client_ports(pids: list[int]) -> set[int]:
    """The local ports of these processes' TCP connections to the broker."""
    ports = set()
    for pid in pids:
        try:
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == broker_port():
                    ports.add(conn.laddr.port)
        except psutil.NoSuchProcess:
            continue
    return ports


def octets(pids: list[int]) -> dict[int, tuple[int, int]]:
    """client port -> (recv_oct, send_oct) of each broker connection of these processes, as the broker counts."""
    ports = client_ports(pids)
    listed = requests.get(f"{MANAGEMENT}/connections", params={"columns": "peer_port,recv_oct,send_oct"},
                          auth=("guest", "guest"), timeout=30).json()
    return {c["peer_port"]: (int(c.get("recv_oct") or 0), int(c.get("send_oct") or 0))
            for c in listed if c.get("peer_port") in ports}


def octets_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict:
    """Octets in and out between two reads; a connection opened in between counts whole."""
    received = sent = 0
    for port, (recv, send) in after.items():
        r0, s0 = before.get(port, (0, 0))
        received, sent = received + recv - r0, sent + send - s0
    return {"into_broker": received, "out_of_broker": sent, "total": received + sent, "connections": len(after)}


# -- one task ---------------------------------------------------------------------------------------


def upload(deployment: Deployment, path: Path) -> dict:
    request = urllib.request.Request(deployment.base + "/media", data=path.read_bytes(), method="POST",
                                     headers={"Content-Type": "application/octet-stream", "X-Filename": path.name})
    with urllib.request.urlopen(request, timeout=300) as answer:
        return json.loads(answer.read())


def run_task(deployment: Deployment, kind: str, medium: Path, params: dict) -> dict:
    pids = [deployment.server.pid, *(w.pid for w in deployment.workers)]
    time.sleep(STATS_REFRESH_SECONDS)  # the previous task's last octets are in the broker's statistics
    octets0, cpu0 = octets(pids), cpu_seconds(deployment.server.pid)
    media = upload(deployment, medium)
    started, load_at_start = time.monotonic(), load()
    status, body = http("POST", deployment.base + "/tasks",
                        json.dumps({"kind": kind, "media_id": media["media_id"], "params": params}).encode(),
                        "application/json")
    if status != 202:
        raise RuntimeError(f"POST /tasks -> {status} {body[:300]!r}")
    task_id = json.loads(body)["task_id"]
    while (task := get_json(f"{deployment.base}/tasks/{task_id}"))["state"] in ("queued", "running"):
        if time.monotonic() - started > 900:
            raise RuntimeError(f"{kind} task {task_id} not done in 900 s")
        time.sleep(0.1)
    wall = time.monotonic() - started
    if task["state"] != "done":
        raise RuntimeError(f"{kind} task {task_id} ended {task['state']}: {task.get('error')}")
    cpu = cpu_seconds(deployment.server.pid) - cpu0
    time.sleep(STATS_REFRESH_SECONDS)
    moved = octets_between(octets0, octets(pids))
    seconds = float(media["duration"])
    return {"kind": kind, "params": params, "media_seconds": seconds, "jobs": task["jobs_total"],
            "broker_octets": moved, "broker_bytes_per_media_second": round(moved["total"] / seconds),
            "server_cpu_seconds": round(cpu, 3), "server_cpu_per_media_second": round(cpu / seconds, 4),
            "wall_seconds": round(wall, 2), "load_at_start": load_at_start, "load_at_end": load(),
            "payload_bytes": (task.get("stats") or {}).get("broker_bytes")}


# -- the data endpoint ---------------------------------------------------------------------------------


def download_throughput(deployment: Deployment, megabytes: int) -> dict | None:
    """One download of a `megabytes` job input from the running server's data endpoint over
    loopback, through a read capability the store made; None where the code has no data endpoint."""
    try:
        from src import config
        from src.data.store import open_store
    except ImportError:
        return None
    settings = config.load(deployment.env)
    store = open_store(settings)
    job_id = 2_000_000_000 + os.getpid() % 1000  # no real job has it; the store files it like any other
    body = os.urandom(1 << 20) * megabytes
    store.put_input(job_id, body)
    del body
    try:
        url = store.input_ref(job_id, "bench-throughput")
        load_at_start, started, received = load(), time.monotonic(), 0
        with requests.get(url, stream=True, timeout=120) as answer:
            answer.raise_for_status()
            for piece in answer.iter_content(chunk_size=1 << 20):
                received += len(piece)
        seconds = time.monotonic() - started
    finally:
        store.delete_jobs([job_id])
    if received != megabytes << 20:
        raise RuntimeError(f"the data endpoint sent {received} bytes of {megabytes << 20}")
    return {"bytes": received, "seconds": round(seconds, 3), "megabytes_per_second": round(received / 1e6 / seconds),
            "load_at_start": load_at_start, "load_at_end": load(), "client": "requests, 1 MiB reads"}


# -- the section --------------------------------------------------------------------------------------------


def measure(p: Profile, workdir: Path) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    settings = {"MODEL": "demucs_unittest", "CHUNK_SECONDS": str(p.chunk_seconds), "WORKER_THREADS": "1"}
    tasks = inputs(p, workdir)
    with Deployment(workdir, settings, [{}]) as deployment:
        rows = [run_task(deployment, kind, medium, params) for kind, medium, params in tasks]
        download = download_throughput(deployment, p.download_mb)
    return {"profile": asdict(p), "commit": commit, "rows": rows, "download": download}


def run(p: Profile, workdir: Path) -> dict:
    results = measure(p, workdir)
    if BEFORE.exists():
        results["before"] = json.loads(BEFORE.read_text())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full", choices=["full", "quick", "smoke"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/karaoke-bench-dataplane"))
    parser.add_argument("--out", type=Path, help="write the figures here as JSON (default: print them)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from bench.report import measured

    results = {**measure(profile(args.profile), args.workdir),
               "measured": measured(f"python -m bench.dataplane --profile {args.profile}")}
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
