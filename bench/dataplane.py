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
  done, each time once the statistics have settled (RabbitMQ samples them every 5 s, later on a
  loaded host: reads a refresh apart until two agree), so it counts every message of the task
  where it enters and where it leaves the broker, heart-beats and presence included, and the
  idle traffic of the reads' window (measured on its own, `idle`, and taken off in the report);
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
import statistics
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import requests

from bench.harness import ROOT, Deployment, cpu_seconds, free_port, get_json, http, make_song, make_video

MANAGEMENT = "http://localhost:15672/api"
STATS_REFRESH_SECONDS = 5.5  # RabbitMQ's collect_statistics_interval (5 s) and a margin
# Two reads a refresh apart that differ by less than this: every octet of the task is in the
# statistics (idle, the deployment moves ~200 bytes a second; a loaded host delays the samples)
SETTLED_BYTES = 3000
BEFORE = Path(__file__).with_name("dataplane-before.json")
DOWNLOADS = 3  # downloads per client: the host is shared, a single one moves with the load


@dataclass(frozen=True)
class Profile:
    name: str
    song_seconds: float
    video_seconds: float
    width: int
    height: int
    chunk_seconds: float
    download_mb: int
    idle_seconds: float = 30.0


def profile(name: str) -> Profile:
    if name == "smoke":
        return Profile("smoke", 6, 1, 320, 180, 2, 32, 5.0)
    return Profile(name, 60, 8, 640, 360, 4, 1024)


def load() -> str:
    """The load averages as `uptime` prints them: the host is shared, timings move with it."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


# -- inputs -------------------------------------------------------------------------------------


def inputs(p: Profile, workdir: Path) -> list[tuple[str, Path, dict]]:
    """(kind, medium, params) of each task: the bench's song and clip."""
    song = make_song(workdir / f"dataplane-song-{p.song_seconds:g}s.wav", p.song_seconds)
    clip = make_video(workdir / f"dataplane-{p.width}x{p.height}-{p.video_seconds:g}s.mp4", p.video_seconds,
                     p.width, p.height)
    return [("separate", song, {}),
            ("transcode", clip, {"codec": "h264", "height": min(360, p.height), "preset": "veryfast"}),
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


def settled(pids: list[int]) -> dict[int, tuple[int, int]]:
    """`octets` once the broker's statistics have caught up: read every refresh until two reads agree
    within SETTLED_BYTES (at most a minute)."""
    last = octets(pids)
    for _ in range(11):
        time.sleep(STATS_REFRESH_SECONDS)
        now = octets(pids)
        if octets_between(last, now)["total"] < SETTLED_BYTES:
            return now
        last = now
    return last


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
    octets0 = settled(pids)  # the previous task's last octets are in the broker's statistics
    cpu0, read0 = cpu_seconds(deployment.server.pid), time.monotonic()
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
    moved = octets_between(octets0, settled(pids))
    moved["window_seconds"] = round(time.monotonic() - read0, 1)
    seconds = float(media["duration"])
    return {"kind": kind, "params": params, "media_seconds": seconds, "jobs": task["jobs_total"],
            "broker_octets": moved, "broker_bytes_per_media_second": round(moved["total"] / seconds),
            "server_cpu_seconds": round(cpu, 3), "server_cpu_per_media_second": round(cpu / seconds, 4),
            "wall_seconds": round(wall, 2), "load_at_start": load_at_start, "load_at_end": load(),
            # the media bytes of the task's jobs and results (raw): the broker's before, the data plane's after
            "payload_bytes": (task.get("stats") or {}).get("broker_bytes")}


def idle(deployment: Deployment, seconds: float) -> dict:
    """The deployment's broker octets per second while it has nothing to do: heart-beats and
    presence, a cost per process and not per media second."""
    pids = [deployment.server.pid, *(w.pid for w in deployment.workers)]
    before, started = settled(pids), time.monotonic()
    time.sleep(seconds)
    moved = octets_between(before, settled(pids))
    window = time.monotonic() - started
    return {"seconds": round(window, 1), "octets": moved["total"], "per_second": round(moved["total"] / window),
            "processes": len(pids)}


# -- the data endpoint ---------------------------------------------------------------------------------

FETCH = """
import hashlib, sys, time
from src.data import client
size, digest, url = int(sys.argv[1]), sys.argv[2], sys.argv[3]
started = time.monotonic()
body = client.fetch(url, size, digest)
print(time.monotonic() - started)
"""


def download_throughput(workdir: Path, megabytes: int) -> dict | None:
    """One download of a `megabytes` job input from the data endpoint over loopback; None where
    the code has no data endpoint (before the claim check).

    The endpoint is the server's own code (`DataEndpoint` under waitress, `create_server`) run in
    this process on a free port with a store of its own: its `admit` lets every reference through,
    where the server's looks the job up in its database once a request. Two clients, each a process
    of its own: curl (what the endpoint can send) and the worker's own `client.fetch` (what a worker
    gets: it keeps the bytes in memory and checks their SHA-256)."""
    try:
        from src import config
        from src.data.capability import load_secret
        from src.data.endpoint import DataEndpoint, create_server
        from src.data.local import ServerStore
    except ImportError:
        return None
    import hashlib
    import sys
    import threading

    port = free_port()
    settings = config.load({"CONFIG_FILE": "/nonexistent.yaml", "STORAGE_DIR": str(workdir / "endpoint"),
                            "SERVER_HOST": "127.0.0.1", "DATA_PORT": str(port)})
    root = settings.storage_dir / "data"
    store = ServerStore(root, f"http://127.0.0.1:{port}", load_secret("", root))
    job_id, token = 1, "0" * 32
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    with store.input_path(job_id).open("wb") as out:  # written in blocks: 1 GiB never sits in memory
        for _ in range(megabytes):
            out.write(block)
            digest.update(block)
    server = create_server(DataEndpoint(store, lambda *_: None, lambda _: 1 << 40), settings)
    threading.Thread(target=server.run, daemon=True).start()
    url, size = store.input_ref(job_id, token), megabytes << 20
    try:
        load_at_start = load()
        curl, fetched = [], []
        for _ in range(DOWNLOADS):
            got = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
                                 capture_output=True, text=True, check=True, timeout=600).stdout.split()
            if int(got[0]) != size:
                raise RuntimeError(f"curl got {got[0]} of {size} bytes")
            curl.append(float(got[1]))
            fetched.append(float(subprocess.run([sys.executable, "-c", FETCH, str(size), digest.hexdigest(), url],
                                                cwd=ROOT, capture_output=True, text=True, check=True,
                                                timeout=600).stdout.split()[-1]))
        rows = {name: {"seconds": round(statistics.median(times), 3), "runs": len(times),
                       "megabytes_per_second": round(size / 1e6 / statistics.median(times)),
                       "min": round(size / 1e6 / max(times)), "max": round(size / 1e6 / min(times))}
                for name, times in (("curl", curl), ("worker client", fetched))}
    finally:
        server.close()
        store.delete_jobs([job_id])
    return {"bytes": size, "clients": rows, "load_at_start": load_at_start, "load_at_end": load()}


# -- the section --------------------------------------------------------------------------------------------


def measure(p: Profile, workdir: Path) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    # DATA_PORT of its own: its default, SERVER_PORT + 1, may be taken on a shared host
    settings = {"MODEL": "demucs_unittest", "CHUNK_SECONDS": str(p.chunk_seconds), "WORKER_THREADS": "1",
                "DATA_PORT": str(free_port())}
    tasks = inputs(p, workdir)
    with Deployment(workdir, settings, [{}]) as deployment:
        rows = [run_task(deployment, kind, medium, params) for kind, medium, params in tasks]
        quiet = idle(deployment, p.idle_seconds)
    download = download_throughput(workdir, p.download_mb)
    return {"profile": asdict(p), "commit": commit, "rows": rows, "idle": quiet, "download": download}


def run(p: Profile, workdir: Path) -> dict:
    results = measure(p, workdir)
    if BEFORE.exists():
        results["before"] = json.loads(BEFORE.read_text())
    return results


# -- the report ----------------------------------------------------------------------------------------------

LABELS = {"separate": "song (`separate`, demucs_unittest)", "transcode": "{size} video (`transcode` h264)",
          "faceblur": "{size} video (`faceblur` blur)"}


def net_per_second(row: dict, idle_per_second: float) -> int:
    """A task's broker bytes per media second less the idle traffic of its measuring window."""
    moved = row["broker_octets"]
    return round(max(0.0, moved["total"] - idle_per_second * moved["window_seconds"]) / row["media_seconds"])


def report(d: dict) -> list[str]:
    """Section 11 of docs/BENCHMARKS.md."""
    p, when = d["profile"], d["measured"]
    # the old code's figures, where they were measured on the same inputs (the same profile)
    earlier = d.get("before", {})
    before = {row["kind"]: row for row in earlier.get("rows", [])} if earlier.get("profile") == p else {}
    lines = ["## 11. The data plane: media off the broker (issue 24)", "",
             f"Measured {when['at']} UTC on {when['on']}. Command: `{when['command']}` (profile `{p['name']}`), "
             f"commit {d['commit']}; the **before** figures are the same module run on commit "
             f"{d.get('before', {}).get('commit', '?')} (jobs and results carried their media on the broker, "
             "base64), kept in `bench/dataplane-before.json`.", "",
             f"One server and one worker (demucs_unittest, CHUNK_SECONDS {p['chunk_seconds']:g}: the videos' jobs; "
             "the song's follow the tiny model's own segment grid, see `jobs`) take a "
             f"{p['song_seconds']:g}-second song, then a {p['video_seconds']:g}-second {p['width']}x{p['height']} "
             "clip to transcode and the same clip to face-blur (`POST /media`, `POST /tasks`). **Broker bytes**: "
             "RabbitMQ's management API gives each connection's `recv_oct` and `send_oct`; the deployment's "
             "connections are the ones whose client port belongs to one of its processes (it logs in as guest, "
             "which others on this host share). Their sum, read before the upload and again once the task is "
             "done, each once the broker's statistics have settled (they are sampled every 5 s, later on a loaded "
             "host: reads a refresh apart until two agree within 3 kB), counts each byte where it enters the "
             "broker and where it leaves, heart-beats and presence included. **Server CPU**: utime + stime of "
             "the server and its waited-for ffmpeg children from the upload to done. **Wall**: `POST /tasks` "
             "to done, one run, with the load "
             "average at its start: the host is shared (2 cores, 5 engineers), so timings move with the load; "
             "byte counts do not.", "",
             "| kind | jobs | broker bytes per media second, before → **after** | server CPU-s per media second, "
             "before → after | POST /tasks → done, before → after (load at start) |", "|---|---|---|---|---|"]
    size = f"{p['width']}x{p['height']}"
    for row in d["rows"]:
        old = before.get(row["kind"])

        def was(key: str, spec: str, old: dict | None = old) -> str:
            return format(old[key], spec) + " → " if old else ""

        wall_was = f"{old['wall_seconds']:.1f} s ({old['load_at_start'].split(',')[0]}) → " if old else ""
        lines.append(
            f"| {LABELS.get(row['kind'], row['kind']).format(size=size)}, "
            f"{row['media_seconds']:.3g} s | {row['jobs']} | "
            f"{was('broker_bytes_per_media_second', ',')} **{row['broker_bytes_per_media_second']:,}** | "
            f"{was('server_cpu_per_media_second', '.3f')}{row['server_cpu_per_media_second']:.3f} | "
            f"{wall_was}{row['wall_seconds']:.1f} s ({row['load_at_start'].split(',')[0]}) |")
    quiet = d.get("idle")
    if quiet:
        lines += ["", f"Idle, the same deployment ({quiet['processes']} processes) sends and receives "
                  f"**{quiet['per_second']:,} bytes a second** on the broker (heart-beats and presence, measured over "
                  f"{quiet['seconds']:g} s): a cost per process, not per media second, and part of each row above "
                  "for the window between the two reads. Net of it: " + "; ".join(
                      f"{row['kind']} {net_per_second(row, quiet['per_second']):,} bytes per media second"
                      for row in d["rows"] if "window_seconds" in row["broker_octets"]) + "."]
    media = {row["kind"]: sum(row["payload_bytes"].values()) / row["media_seconds"]
             for row in d["rows"] if row.get("payload_bytes")}
    if media:
        lines += ["", "Media bytes of the jobs and results (raw; the data plane carries them now; the task's "
                  "`stats.broker_bytes`): " + "; ".join(f"{kind} {per / 1e3:,.0f} kB per media second"
                                                          for kind, per in media.items()) + "."]
    download = d.get("download")
    if download:
        lines += ["", f"**Data endpoint throughput**: a {download['bytes'] >> 20} MiB job input downloaded over "
                  "loopback from the server's own endpoint code (`DataEndpoint` under waitress, its `admit` "
                  "letting every reference through), each client a process of its own, one download at a time, "
                  f"median of {DOWNLOADS} (range); load {download['load_at_start']} at the start and "
                  f"{download['load_at_end']} at the end:", "", "| client | seconds | MB/s |", "|---|---|---|"]
        for name, row in download["clients"].items():
            lines.append(f"| {name} | {row['seconds']:.2f} | **{row['megabytes_per_second']:,}** "
                         f"({row.get('min', '?')}–{row.get('max', '?')}) |")
        lines += ["", "curl shows what the endpoint sends; the worker's client (`src/data/client.py`) also keeps "
                  "the input in memory and checks its SHA-256. docs/SCALING.md turns these figures into media "
                  "hours per hour."]
    return lines + [""]


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
