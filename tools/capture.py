"""`make capture`: record the broker traffic of a short real run, for Wireshark.

tshark records the STOMP port on CAPTURE_IFACE while a generated 8-second song goes
through a server and two workers (the tiny `demucs_unittest` model, so the run takes
seconds), and one worker is killed mid-job so that the capture also shows a
redelivery. The capture lasts until the song is done, at most CAPTURE_SECONDS, and is
written to STORAGE_DIR/captures/<timestamp>.pcapng. Open it with the dissector:

    wireshark -X lua_script:tools/wireshark/stomp.lua storage/captures/<timestamp>.pcapng

Capturing needs root, or a user allowed to run dumpcap (Debian: the wireshark group).
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench.harness import Deployment, get_json, make_song
from src import config


def wait_until_capturing(tshark: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "Capturing on" in log.read_text(errors="replace"):
            time.sleep(1)  # tshark says so a moment before the first packets are recorded
            return
        if tshark.poll() is not None:
            raise SystemExit(f"tshark could not capture: {log.read_text(errors='replace').strip()}")
        time.sleep(0.1)
    raise SystemExit("tshark did not start capturing")


def main() -> None:
    settings = config.load()
    target_dir = settings.storage_dir / "captures"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{datetime.now():%Y%m%d-%H%M%S}.pcapng"
    with tempfile.TemporaryDirectory(prefix="karaoke-capture-") as scratch:
        workdir = Path(scratch)
        log = workdir / "tshark.log"
        tshark = subprocess.Popen(
            ["tshark", "-q", "-B", "64", "-i", settings.capture_iface, "-f", f"tcp port {settings.broker_port}",
             "-a", f"duration:{settings.capture_seconds}", "-w", str(target)],
            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        wait_until_capturing(tshark, log)
        env = {"MODEL": "demucs_unittest", "MODEL_SEGMENT": "2", "CHUNK_SECONDS": "3",
               "BROKER_HEARTBEAT_MS": "2000", "WORKER_SLOWDOWN": "3"}
        try:
            with Deployment(workdir, env, [{"WORKER_THREADS": "1"}] * 2) as deployment:
                song = make_song(workdir / "capture-song.wav", 8)
                music = deployment.upload(song)
                deployment.process(music)
                victim = _first_busy_worker(deployment)
                victim.send_signal(signal.SIGKILL)  # its job is redelivered to the other worker
                print(f"capture: killed worker pid {victim.pid} mid-job; its job goes to the other worker")
                deployment.wait_done(music["music_id"], timeout=settings.capture_seconds)
                time.sleep(1)
        finally:
            if tshark.poll() is None:
                tshark.send_signal(signal.SIGINT)
            tshark.wait(30)
    print(f"capture: wrote {target}")
    print(f"capture: open it with  wireshark -X lua_script:tools/wireshark/stomp.lua {target}")


def _first_busy_worker(deployment: Deployment, timeout: float = 30) -> subprocess.Popen:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = {w["pid"] for w in get_json(deployment.base + "/workers") if w["state"] == "busy"}
        for worker in deployment.workers:
            if worker.pid in busy:
                return worker
        time.sleep(0.05)
    raise SystemExit("no worker became busy")


if __name__ == "__main__":
    main()
