"""The energy a worker spends on one job: measured by RAPL where it can be read, estimated where not.

A worker calls `EnergyMeter.start()` before a job and `EnergyMeter.stop(mark)` after it, and
gets an `Energy`: joules, the CPU seconds the job used, and whether the joules were
`measured` or `estimated`. Every figure carries its source, so a reader never takes an
estimate for a measurement, and a host that cannot measure reports an estimate, never a
silent 0.

CPU seconds are this process's user + system time (all its threads) plus that of its
children that were waited for (`getrusage` RUSAGE_SELF and RUSAGE_CHILDREN). A job runs
either in-process (torch threads: the separation kind) or in an ffmpeg child the worker
waits for (the transcode kind), so both must count. Anything else the process does
meanwhile (the broker client's heart-beat thread, a second prefetched job) counts too.

Measured: Linux exposes Intel RAPL, and AMD's on kernels that support it (under the same
`intel-rapl` names), as powercap zones. The package domains are the top-level zones
`<POWERCAP_ROOT>/intel-rapl:N` whose `name` starts with `package`; their sub-zones
(`intel-rapl:N:M`: core, uncore, dram) are parts of, or beside, the package and are not
summed, nor are `psys` (the whole platform) or `intel-rapl-mmio:N` (a second interface to
the same package). Each package's `energy_uj` is a cumulative counter in microjoules that
wraps to 0 at `max_energy_range_uj`. Package energy covers everything running on the
socket during the job, not only this job: that is what the issue asks for and what RAPL
tools report, and it is an upper bound on this job's share when other work shares the
socket.

One wrap between start and stop is corrected; a job longer than one wrap period would
under-count by a whole range per extra wrap. For the typical range of 262143328850 µJ
(~262 kJ) one wrap takes ~44 minutes at 100 W and ~15 minutes at 300 W, so that only
matters for very long jobs on big, busy sockets.

Estimated: where no package zone exists (a VM, a container without /sys, another OS) or
a read fails (since 2020, CVE-2020-8694, `energy_uj` is readable by root only on many
kernels), joules are CPU seconds × WATTS_PER_CORE, the average power of one busy vCPU.
Whether RAPL is readable is decided once, when the meter is made, and logged once; a
read that fails later makes that one job estimated instead of crashing the worker.
"""

from __future__ import annotations

import logging
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("worker.energy")

MEASURED = "measured"
ESTIMATED = "estimated"

# Top-level zones only: a second colon means a sub-zone, whose energy is already inside
# (core, uncore) or outside (dram) its package, never to be added to it.
_PACKAGE_ZONE = re.compile(r"intel-rapl:\d+")

# A job longer than one wrap period at this power (a large server socket's TDP) may have
# wrapped a counter more than once, which cannot be seen afterwards: only used to warn.
_WRAP_WARNING_WATTS = 300.0


@dataclass(frozen=True)
class Energy:
    """What one job cost: `source` says whether `joules` was measured (RAPL) or estimated."""

    joules: float
    cpu_seconds: float
    source: str  # "measured" or "estimated"

    def as_json(self) -> dict[str, Any]:
        # Microjoules and microseconds are the resolution of the counters read
        return {"joules": round(self.joules, 6), "cpu_seconds": round(self.cpu_seconds, 6), "source": self.source}


@dataclass(frozen=True)
class Mark:
    """A snapshot at the start of a job; opaque to callers, handed back to `stop`."""

    monotonic: float
    cpu_seconds: float
    rapl_uj: tuple[int, ...] | None  # one reading per package zone, None: this job is estimated


@dataclass(frozen=True)
class _Zone:
    path: Path
    max_energy_range_uj: int


class EnergyMeter:
    """Measures jobs one at a time with RAPL where it is readable, else estimates from CPU seconds."""

    def __init__(self, powercap_root: Path, watts_per_core: float) -> None:
        self.watts_per_core = watts_per_core
        self.zones: tuple[_Zone, ...] = ()
        try:
            self.zones = _package_zones(Path(powercap_root))
            self.reason = "" if self.zones else f"no RAPL package zone under {powercap_root}"
        except (OSError, ValueError) as error:
            self.reason = f"RAPL under {powercap_root} is not readable ({error})"
        self.source = MEASURED if self.zones else ESTIMATED
        if self.zones:
            log.info("Energy is measured: RAPL, %d package(s) under %s", len(self.zones), powercap_root)
        else:
            log.info("Energy is estimated: CPU seconds × %.2f W per core, because %s", watts_per_core, self.reason)

    def start(self) -> Mark:
        return Mark(time.monotonic(), _cpu_seconds(), self._read_rapl())

    def stop(self, mark: Mark) -> Energy:
        cpu_seconds = _cpu_seconds() - mark.cpu_seconds
        if mark.rapl_uj is not None:
            end = self._read_rapl()
            if end is not None:
                self._warn_if_long(time.monotonic() - mark.monotonic)
                joules = sum(_delta_uj(start, stop, zone.max_energy_range_uj)
                             for start, stop, zone in zip(mark.rapl_uj, end, self.zones, strict=True)) / 1e6
                return Energy(joules, cpu_seconds, MEASURED)
        return Energy(cpu_seconds * self.watts_per_core, cpu_seconds, ESTIMATED)

    def _read_rapl(self) -> tuple[int, ...] | None:
        """Every package's counter, or None (this job is then estimated) when RAPL is off or a read fails."""
        if not self.zones:
            return None
        try:
            return tuple(_read_int(zone.path / "energy_uj") for zone in self.zones)
        except (OSError, ValueError) as error:
            # A zone can vanish (module unloaded) or lose its permission at run time: one job
            # estimated is better than a worker that crashes on every job from now on.
            log.warning("RAPL read failed, this job's energy is estimated: %s", error)
            return None

    def _warn_if_long(self, seconds: float) -> None:
        shortest_wrap = min(zone.max_energy_range_uj for zone in self.zones) / 1e6 / _WRAP_WARNING_WATTS
        if seconds > shortest_wrap:
            log.warning("A job of %.0f s may have wrapped the RAPL counter more than once (one wrap is %.0f s "
                        "at %.0f W): its measured energy may be too low", seconds, shortest_wrap, _WRAP_WARNING_WATTS)


def _package_zones(root: Path) -> tuple[_Zone, ...]:
    """The package zones under `root`, each read once now so that an unreadable one shows at start-up."""
    if not root.is_dir():
        return ()
    zones = []
    candidates = [path for path in root.iterdir() if _PACKAGE_ZONE.fullmatch(path.name) and path.is_dir()]
    for path in sorted(candidates, key=lambda path: int(path.name.rpartition(":")[2])):
        if not (path / "name").read_text().strip().startswith("package"):
            continue  # psys: the whole platform, which contains the packages
        _read_int(path / "energy_uj")  # raises where only root may read it
        zones.append(_Zone(path, _read_int(path / "max_energy_range_uj")))
    return tuple(zones)


def _delta_uj(start: int, end: int, max_energy_range_uj: int) -> int:
    # A counter below its start value has wrapped to 0 at the range once (see the docstring)
    return end - start if end >= start else end + max_energy_range_uj - start


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # only children already waited for
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
