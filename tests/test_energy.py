"""EnergyMeter against scripted powercap trees (POWERCAP_ROOT) and against real CPU time.

The trees are real files laid out as Linux lays out /sys/class/powercap; a test rewrites
`energy_uj` between `start()` and `stop()` the way the kernel would during a job.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src import config
from src.audio_worker.energy import EnergyMeter

RANGE_UJ = 262143328850  # a common max_energy_range_uj


def zone(root: Path, directory: str, name: str, energy_uj: int, max_uj: int = RANGE_UJ) -> Path:
    path = root / directory
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


def set_energy(path: Path, energy_uj: int) -> None:
    (path / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """Two packages, each with sub-zones, plus the top-level zones that are not packages."""
    root = tmp_path / "powercap"
    root.mkdir()
    (root / "intel-rapl").mkdir()  # the control type's own folder, not a zone
    zone(root, "intel-rapl:0", "package-0", 1_000_000)
    zone(root, "intel-rapl:0:0", "core", 500_000)
    zone(root, "intel-rapl:0:1", "dram", 200_000)
    zone(root, "intel-rapl:1", "package-1", 7_000_000)
    zone(root, "intel-rapl:1:0", "core", 600_000)
    zone(root, "intel-rapl:2", "psys", 9_000_000)  # the whole platform: contains the packages
    zone(root, "intel-rapl-mmio:0", "package-0", 3_000_000)  # the same package, another interface
    return root


def burn_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_measured_sums_packages_only(powercap: Path) -> None:
    meter = EnergyMeter(powercap, 3.5)
    assert meter.source == "measured"
    mark = meter.start()
    set_energy(powercap / "intel-rapl:0", 1_000_000 + 12_500_000)
    set_energy(powercap / "intel-rapl:1", 7_000_000 + 2_250_000)
    # Sub-zones and non-package zones move too, and must not be added
    for other in ("intel-rapl:0:0", "intel-rapl:0:1", "intel-rapl:1:0", "intel-rapl:2", "intel-rapl-mmio:0"):
        set_energy(powercap / other, 99_000_000_000)
    energy = meter.stop(mark)
    assert energy.source == "measured"
    assert energy.joules == pytest.approx(14.75)
    assert energy.cpu_seconds >= 0
    as_json = json.loads(json.dumps(energy.as_json()))
    assert as_json["joules"] == 14.75 and as_json["source"] == "measured"


def test_a_wrapped_counter_counts_up_to_its_range_and_on_from_zero(powercap: Path) -> None:
    set_energy(powercap / "intel-rapl:0", RANGE_UJ - 3_000_000)  # 3 J before the wrap
    meter = EnergyMeter(powercap, 3.5)
    mark = meter.start()
    set_energy(powercap / "intel-rapl:0", 4_000_000)  # wrapped, then 4 J more
    set_energy(powercap / "intel-rapl:1", 7_000_000 + 1_000_000)  # did not wrap
    energy = meter.stop(mark)
    assert energy.source == "measured" and energy.joules == pytest.approx(3 + 4 + 1)


def test_a_small_range_wraps_at_its_own_max(tmp_path: Path) -> None:
    package = zone(tmp_path, "intel-rapl:0", "package-0", 900, max_uj=1_000)
    meter = EnergyMeter(tmp_path, 3.5)
    mark = meter.start()
    set_energy(package, 50)
    assert meter.stop(mark).joules == pytest.approx(150 / 1e6)


def test_unreadable_energy_falls_back_to_an_estimate_and_says_why(powercap: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # Tests run as root, which chmod 000 does not stop: a folder in the file's place fails every read
    (powercap / "intel-rapl:1" / "energy_uj").unlink()
    (powercap / "intel-rapl:1" / "energy_uj").mkdir()
    with caplog.at_level(logging.INFO, logger="worker.energy"):
        meter = EnergyMeter(powercap, 3.5)
    assert meter.source == "estimated"
    assert "estimated" in caplog.text and "not readable" in caplog.text
    mark = meter.start()
    burn_cpu(0.05)
    energy = meter.stop(mark)
    assert energy.source == "estimated"
    assert energy.joules == pytest.approx(energy.cpu_seconds * 3.5)


def test_a_read_failing_mid_job_estimates_that_job_and_measures_the_next(powercap: Path) -> None:
    meter = EnergyMeter(powercap, 3.5)
    mark = meter.start()
    (powercap / "intel-rapl:0" / "energy_uj").unlink()  # the zone went away during the job
    assert meter.stop(mark).source == "estimated"
    set_energy(powercap / "intel-rapl:0", 5_000_000)
    mark = meter.start()
    set_energy(powercap / "intel-rapl:0", 6_000_000)
    energy = meter.stop(mark)
    assert energy.source == "measured" and energy.joules == pytest.approx(1.0)


def test_a_tree_without_packages_is_estimated(tmp_path: Path) -> None:
    zone(tmp_path, "intel-rapl:0", "psys", 1_000)
    zone(tmp_path, "intel-rapl:0:0", "package-0", 1_000)  # only top-level zones are packages
    assert EnergyMeter(tmp_path, 3.5).source == "estimated"


def test_missing_root_estimates_from_own_and_childrens_cpu_seconds(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    settings = config.load({"CONFIG_FILE": str(tmp_path / "none.yaml"), "POWERCAP_ROOT": str(tmp_path / "absent"),
                            "WATTS_PER_CORE": "2.5"})
    with caplog.at_level(logging.INFO, logger="worker.energy"):
        meter = EnergyMeter(settings.powercap_root, settings.watts_per_core)
    assert meter.source == "estimated" and "no RAPL package zone" in caplog.text

    mark = meter.start()
    burn_cpu(0.2)
    in_process = meter.stop(mark)
    assert in_process.source == "estimated"
    assert in_process.cpu_seconds >= 0.2
    assert in_process.joules == pytest.approx(in_process.cpu_seconds * 2.5) and in_process.joules > 0

    # A child that is waited for (an ffmpeg encoder) counts: this process itself barely works meanwhile
    mark = meter.start()
    subprocess.run([sys.executable, "-c", "import time\nend = time.process_time() + 0.3\n"
                    "while time.process_time() < end: pass"], check=True)
    with_child = meter.stop(mark)
    assert with_child.cpu_seconds >= 0.3
    assert with_child.joules == pytest.approx(with_child.cpu_seconds * 2.5)
    assert with_child.as_json()["source"] == "estimated"
