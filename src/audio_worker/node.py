"""What a worker's presence says about its machine and itself: CPU, memory, load (psutil).

The process figure counts the worker and the encoders it runs (ffmpeg children, live ones
by their RSS, finished ones by the CPU time `wait` hands back), because for a transcode
the encoder does the work; a worker that reported only its own Python process would look
idle while its machine is full. CPU percentages are of one core for the process (top's
convention: 200 % is two busy cores) and of the whole host for the host. A GPU worker also
reports its GPU: the memory its process holds there, the card's size, and its utilisation.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class NodeFigures:
    cpu_percent: float
    memory_bytes: int
    host_cpu_percent: float
    host_memory_percent: float
    load: float
    gpu_memory_bytes: int = 0  # what this process holds on its GPU (torch's caching allocator)
    gpu_memory_total_bytes: int = 0  # the GPU's size; 0 without one
    gpu_percent: float | None = None  # the GPU's utilisation, from NVML where the driver offers it


class NodeProbe:
    """Samples figures since the previous sample (the first covers the time since it was made)."""

    def __init__(self, gpu: str | None = None) -> None:
        self._gpu = gpu  # the torch device of a GPU worker ("cuda:1"), None on a CPU
        self._process = psutil.Process()
        self._lock = threading.Lock()  # presence is sent from the job, control and heart-beat threads
        self._last_cpu, self._last_at = self._cpu_seconds(), time.monotonic()
        psutil.cpu_percent(None)  # starts the host's interval

    def _cpu_seconds(self) -> float:
        t = self._process.cpu_times()
        live = 0.0
        for child in self._children():
            try:
                c = child.cpu_times()
                live += c.user + c.system
            except psutil.Error:
                pass
        return t.user + t.system + t.children_user + t.children_system + live

    def _children(self) -> list[psutil.Process]:
        try:
            return self._process.children(recursive=True)
        except psutil.Error:
            return []

    def sample(self) -> NodeFigures:
        with self._lock:
            cpu, now = self._cpu_seconds(), time.monotonic()
            # a child that ended between samples moves from "live" to "waited": never below zero
            share = max(0.0, cpu - self._last_cpu) / max(now - self._last_at, 1e-3)
            self._last_cpu, self._last_at = cpu, now
        memory = self._process.memory_info().rss
        for child in self._children():
            try:
                memory += child.memory_info().rss
            except psutil.Error:
                pass
        cores = os.cpu_count() or 1
        return NodeFigures(
            cpu_percent=round(min(100.0 * share, 100.0 * cores), 1),
            memory_bytes=int(memory),
            host_cpu_percent=round(psutil.cpu_percent(None), 1),
            host_memory_percent=round(psutil.virtual_memory().percent, 1),
            load=round(os.getloadavg()[0], 2),
            **self._gpu_figures(),
        )

    def _gpu_figures(self) -> dict:
        """From torch, which the worker already runs its model with; utilisation needs NVML (pynvml),
        which torch asks for when it is installed: without it the figure is unknown, not zero."""
        if self._gpu is None:
            return {}
        try:
            import torch

            figures = {"gpu_memory_bytes": int(torch.cuda.memory_reserved(self._gpu)),
                       "gpu_memory_total_bytes": int(torch.cuda.get_device_properties(self._gpu).total_memory)}
        except Exception:  # no driver, no such device: the worker says why elsewhere (its jobs fail)
            return {}
        try:
            figures["gpu_percent"] = float(torch.cuda.utilization(self._gpu))
        except Exception:
            pass
        return figures
