"""`make workers`: run WORKERS_HEALTHY + WORKERS_UNHEALTHY worker processes in the foreground.

Unhealthy workers are started with `--simulate WORKER_SIMULATE`: WORKER_SIMULATE_CRASH_AFTER
seconds into their first job they die hard (SIGKILL: no ACK, no goodbye) or freeze
(SIGSTOP: connection open, heart-beats stopped, so only the broker's heart-beat check
frees the job). The supervisor announces that before starting them, relays their logs,
and stops them all on Ctrl-C.

Where the workers run. On a GPU host (DEVICE=cuda, or auto where a GPU is visible) it runs
WORKERS_PER_GPU workers on each GPU (DEVICE=cuda:0,cuda:2 names the GPUs), each told its own
device. On a CPU host it runs WORKERS_HEALTHY workers, whose default follows the core count
(`config.cpu_layout`: on 16 cores 4 workers of 4 threads, on 2 cores 2 of 1).

It keeps N workers alive: a worker that exits (crashed, killed, or a poison message
that got past every guard) is started again after a back-off that doubles from 1 s up to
60 s while restarts keep failing quickly, and starts over once a worker has run for a
minute. A restarted unhealthy worker is started healthy: the simulation is "this worker
crashes once", and restarting it as unhealthy would crash it on every job forever, which
simulates nothing but a retry loop.
"""

from __future__ import annotations

import importlib.util
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
    config.configure_logging()
    settings = config.load()
    healthy, unhealthy = settings.workers_healthy, settings.workers_unhealthy
    if unhealthy and settings.worker_simulate == "crash":
        log.info("Simulating workers crash. Killing %d workers. (%.0fs into their first job)",
                 unhealthy, settings.worker_simulate_crash_after)
    elif unhealthy and settings.worker_simulate == "hang":
        log.info("Simulating workers hang. Freezing %d workers. (%.0fs into their first job)",
                 unhealthy, settings.worker_simulate_crash_after)
    elif unhealthy:
        log.info("Simulating %s results: %d worker(s) damage their first job's result", settings.worker_simulate,
                 unhealthy)
    env = {**os.environ, **settings.as_env(), "PYTHONUNBUFFERED": "1"}
    devices = gpu_devices(settings.device)
    if devices:
        healthy = len(devices) * settings.workers_per_gpu - unhealthy
        if healthy < 0:
            raise SystemExit(f"WORKERS_UNHEALTHY={unhealthy} is more than the {len(devices)} GPU(s) x "
                             f"WORKERS_PER_GPU={settings.workers_per_gpu} workers")
        threads = settings.worker_threads or max(1, (os.cpu_count() or 1) // (healthy + unhealthy))
        log.info("GPU workers: %d on each of %s, %d CPU thread(s) each", settings.workers_per_gpu,
                 ", ".join(devices), threads)
        env["WORKER_THREADS"] = str(threads)
    slots = [_Slot(index, simulate=settings.worker_simulate if index >= healthy else None,
                   device=devices[index % len(devices)] if devices else None)
             for index in range(healthy + unhealthy)]
    for slot in slots:
        slot.start(env)
    log.info("Started %d healthy and %d unhealthy workers: pids %s", healthy, unhealthy,
             [slot.process.pid for slot in slots])

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        for slot in slots:
            slot.watch(env)
    for slot in slots:
        if slot.process.poll() is None:
            slot.process.send_signal(signal.SIGCONT)  # a frozen worker must run to hear SIGTERM
            slot.process.terminate()
    deadline = time.monotonic() + 10
    for slot in slots:
        try:
            slot.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            slot.process.kill()


def gpu_devices(device: str) -> list[str]:
    """The GPUs that DEVICE names, one entry per GPU: a `cuda:N` list as given; `cuda` (and `auto`)
    every GPU torch sees. Empty for the CPU. `cuda` on a host without a GPU stays `["cuda"]`: the
    worker then refuses separation jobs with the reason, as a misconfigured host should."""
    if device == "cpu":
        return []
    if device.startswith("cuda:"):
        return device.split(",")
    count = visible_gpus()
    if count == 0:
        return ["cuda"] if device == "cuda" else []
    return [f"cuda:{index}" for index in range(count)]


def visible_gpus() -> int:
    """GPUs torch sees; 0 without torch or an NVIDIA driver (checked first: importing torch costs seconds)."""
    if not os.path.exists("/dev/nvidiactl") or importlib.util.find_spec("torch") is None:
        return 0
    import torch

    return torch.cuda.device_count()


RESTART_DELAY, RESTART_DELAY_MAX, HEALTHY_RUN_SECONDS = 1.0, 60.0, 60.0


class _Slot:
    """One of the N workers: its process, restarted with back-off when it exits."""

    def __init__(self, index: int, simulate: str | None, device: str | None = None):
        self.index = index
        self.simulate = simulate
        self.device = device  # its own GPU, or None: DEVICE as configured
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.delay = RESTART_DELAY
        self.restart_at: float | None = None

    def start(self, env: dict[str, str]) -> None:
        command = [sys.executable, "-m", "src.audio_worker"]
        if self.simulate:
            command += ["--simulate", self.simulate]
            self.simulate = None  # crash once: a restart is a healthy worker
        self.process = subprocess.Popen(command, env={**env, "DEVICE": self.device} if self.device else env)
        self.started_at = time.monotonic()

    def watch(self, env: dict[str, str]) -> None:
        now = time.monotonic()
        if self.restart_at is None:
            code = self.process.poll()
            if code is None:
                return
            if now - self.started_at >= HEALTHY_RUN_SECONDS:
                self.delay = RESTART_DELAY
            log.warning("Worker %d (pid %d) exited with code %d; restarting it in %.0fs", self.index,
                        self.process.pid, code, self.delay)
            self.restart_at = now + self.delay
            self.delay = min(self.delay * 2, RESTART_DELAY_MAX)
        elif now >= self.restart_at:
            self.restart_at = None
            self.start(env)
            log.info("Worker %d restarted: pid %d", self.index, self.process.pid)


if __name__ == "__main__":
    main()
