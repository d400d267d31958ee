"""Real deployments for benchmarks and `make capture`: a server and workers as processes here.

Measures what the kernel reports: peak resident memory (VmHWM in /proc/PID/status)
and CPU seconds (utime + stime + cutime + cstime in /proc/PID/stat) of each process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def http(method: str, url: str, body: bytes | None = None, content_type: str | None = None):
    req = urllib.request.Request(url, data=body, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def get_json(url: str):
    status, body = http("GET", url)
    if status != 200:
        raise RuntimeError(f"GET {url} -> {status} {body[:200]!r}")
    return json.loads(body)


def peak_rss(pid: int) -> int:
    """Peak resident set size in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the process and of its children it has waited for: the server's
    decoding and MP3 encoding run in ffmpeg subprocesses."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """A server and `workers` worker processes with their own queues and storage; with `own_logins`,
    each worker logs in to the broker with a login of its own (as `make broker WORKER_LOGIN=<host>`
    provisions one per host): replicas (VERIFY_REPLICAS) vote once per login."""

    def __init__(self, workdir: Path, settings: dict[str, str], workers: list[dict[str, str]],
                 own_logins: bool = False):
        self.workdir = workdir
        self.own_logins = own_logins
        self.logins: list[tuple[str, str]] = []
        self.port = free_port()
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "CONFIG_FILE": "/nonexistent.yaml",
                    "QUEUE_PREFIX": self.prefix, "STORAGE_DIR": str(workdir / self.prefix),
                    # repeated runs are measurements: each must do the work (a section that
                    # measures the results cache turns it on)
                    "SERVER_PORT": str(self.port), "CACHE_MB": "0", **settings}
        self.base = f"http://127.0.0.1:{self.port}"
        self.worker_envs = workers
        self.server: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    def _spawn(self, module: str, name: str, extra: dict[str, str]) -> subprocess.Popen:
        log = (self.workdir / f"{self.prefix}-{name}.log").open("ab")
        return subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env={**self.env, **extra},
                                stdout=log, stderr=subprocess.STDOUT)

    def _provision_logins(self) -> None:
        """A worker login per worker, provisioned as make broker does, and the queues declared (a
        worker login may not declare them)."""
        from src import config
        from src.kinds import registry
        from src.messaging import accounts
        from src.messaging.broker import Broker

        settings = config.load(self.env)
        self.logins = [(f"{self.prefix}-worker-{i}", uuid.uuid4().hex) for i in range(len(self.worker_envs))]
        accounts.provision(accounts.Ctl(), self.prefix, settings.server_login, *self.logins)
        Broker(settings, "provision").declare_topology(registry.queues(registry.names()))
        self.worker_envs = [{**extra, "BROKER_WORKER_USER": user, "BROKER_WORKER_PASSWORD": password}
                            for extra, (user, password) in zip(self.worker_envs, self.logins, strict=True)]

    def __enter__(self) -> Deployment:
        if self.own_logins:
            self._provision_logins()
        self.server = self._spawn("src.server", "server", {})
        for index, extra in enumerate(self.worker_envs):
            self.workers.append(self._spawn("src.audio_worker", f"worker{index}", extra))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if len(get_json(self.base + "/workers")) == len(self.workers):
                    return self
            except (OSError, RuntimeError):
                pass
            time.sleep(0.2)
        raise RuntimeError("deployment did not come up")

    def __exit__(self, *exc) -> None:
        for proc in [*self.workers, self.server]:
            if proc and proc.poll() is None:
                proc.terminate()
        for proc in [*self.workers, self.server]:
            if proc:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True).stdout
        for name in listed.split():
            if name.startswith(self.prefix + "."):  # jobs (one per kind and route), results, dead
                subprocess.run(["rabbitmqctl", "-q", "delete_queue", name], capture_output=True)
        if self.logins:
            from src.messaging import accounts

            accounts.remove(accounts.Ctl(), self.prefix, [user for user, _ in self.logins])

    def add_workers(self, workers: list[dict[str, str]], timeout: float = 180) -> list[subprocess.Popen]:
        """Start more workers on the running deployment; returns them once GET /workers lists each."""
        started = [self._spawn("src.audio_worker", f"worker{len(self.workers) + i}", extra)
                   for i, extra in enumerate(workers)]
        self.workers += started
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(proc.poll() is not None for proc in started):
                raise RuntimeError("a worker exited while starting; see its log in " + str(self.workdir))
            try:
                if {p.pid for p in started} <= {w["pid"] for w in get_json(self.base + "/workers")}:
                    return started
            except (OSError, RuntimeError):
                pass
            time.sleep(0.2)
        raise RuntimeError("the added workers did not come up")

    def stop_workers(self, workers: list[subprocess.Popen]) -> None:
        """Stop these workers as `make workers` would (SIGTERM: each says it leaves); kill a straggler."""
        for proc in workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def upload(self, song: Path) -> dict:
        status, body = http("POST", self.base + "/music", song.read_bytes(), "application/octet-stream")
        if status != 200:
            raise RuntimeError(f"upload failed: {status} {body[:200]!r}")
        return json.loads(body)

    def process(self, music: dict, track_names: list[str] | None = None) -> float:
        ids = [t["track_id"] for t in music["tracks"] if track_names is None or t["name"] in track_names]
        started = time.time()
        status, body = http("POST", f"{self.base}/music/{music['music_id']}", json.dumps(ids).encode(),
                            "application/json")
        if status != 200:
            raise RuntimeError(f"process failed: {status} {body[:200]!r}")
        return started

    def wait_done(self, music_id: int, timeout: float = 7200, poll: float = 0.05) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = get_json(f"{self.base}/music/{music_id}")
            if status["state"] == "done":
                return status
            if status["state"] == "failed":
                raise RuntimeError(f"music {music_id} failed: {status['error']}")
            time.sleep(poll)
        raise RuntimeError(f"music {music_id} not done in {timeout}s")

    def jobs(self, music_id: int) -> list[dict]:
        return [j for j in (get_json(f"{self.base}/job/{i}") for i in get_json(self.base + "/job"))
                if j["music_id"] == music_id]

    def timeline(self, music_id: int) -> list[dict]:
        return get_json(f"{self.base}/music/{music_id}/timeline")


def make_song(path: Path, seconds: float, title: str | None = None, artist: str | None = None) -> Path:
    """A generated stereo 44.1 kHz song: two tones over pink noise, encoded as the suffix says.
    Enough structure that the stems differ; reused if it is already there."""
    if path.exists():
        return path
    graph = (f"sine=frequency=220:duration={seconds}:sample_rate=44100[a];"
             f"sine=frequency=331:duration={seconds}:sample_rate=44100[b];"
             f"anoisesrc=color=pink:duration={seconds}:sample_rate=44100:amplitude=0.2:seed=1[n];"
             "[a][b]amerge=inputs=2,volume=0.4[t];[t][n]amix=inputs=2:normalize=0[out]")
    meta = [arg for key, value in (("title", title), ("artist", artist)) if value
            for arg in ("-metadata", f"{key}={value}")]
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-filter_complex", graph, "-map", "[out]", "-ac", "2",
                    *meta, "-y", str(path)], check=True, timeout=600)
    return path


def make_video(path: Path, seconds: float, width: int, height: int) -> Path:
    """testsrc2 with a 440 Hz tone, H.264 (a keyframe a second) and AAC in MP4: a phone's clip."""
    if not path.exists():
        subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-v", "error",
                        "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate=25",
                        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", f"{seconds:g}",
                        "-map", "0:v", "-map", "1:a", "-c:a", "aac", "-b:a", "128k", "-c:v", "libx264",
                        "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", "25", "-keyint_min", "25",
                        "-sc_threshold", "0", "-y", str(path)], check=True, capture_output=True, timeout=600)
    return path
