"""`make workers`: run WORKERS_HEALTHY + WORKERS_UNHEALTHY worker processes in the foreground.

Unhealthy workers are started with `--simulate WORKER_SIMULATE`: WORKER_SIMULATE_CRASH_AFTER
seconds into their first job they die hard (SIGKILL: no ACK, no goodbye) or freeze
(SIGSTOP: connection open, heart-beats stopped, so only the broker's heart-beat check
frees the job). The supervisor announces that before starting them, relays their logs,
and stops them all on Ctrl-C.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from src import config

log = logging.getLogger("workers")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    settings = config.load()
    healthy, unhealthy = settings.workers_healthy, settings.workers_unhealthy
    if unhealthy and settings.worker_simulate == "crash":
        log.info("Simulating workers crash. Killing %d workers. (%.0fs into their first job)",
                 unhealthy, settings.worker_simulate_crash_after)
    elif unhealthy:
        log.info("Simulating workers hang. Freezing %d workers. (%.0fs into their first job)",
                 unhealthy, settings.worker_simulate_crash_after)
    env = {**os.environ, **settings.as_env(), "PYTHONUNBUFFERED": "1"}
    children: list[subprocess.Popen] = []
    for index in range(healthy + unhealthy):
        command = [sys.executable, "-m", "src.audio_worker"]
        if index >= healthy:
            command += ["--simulate", settings.worker_simulate]
        children.append(subprocess.Popen(command, env=env))
    log.info("Started %d healthy and %d unhealthy workers: pids %s", healthy, unhealthy,
             [c.pid for c in children])

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1):
        if all(c.poll() is not None for c in children):
            break
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGCONT)  # a frozen worker must run to hear SIGTERM
            child.terminate()
    deadline = time.monotonic() + 10
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()


if __name__ == "__main__":
    main()
