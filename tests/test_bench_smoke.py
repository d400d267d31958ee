"""`make bench` on tiny inputs, so the benchmark scripts never rot. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_section_runs_and_reports(tmp_path):
    docs = tmp_path / "docs"
    subprocess.run([sys.executable, "-m", "bench.run", "--profile", "smoke", "--docs", str(docs)], cwd=ROOT,
                   check=True, timeout=900)
    report = (docs / "BENCHMARKS.md").read_text()
    for heading in ("1. Speed", "2. Where the time goes", "3. Fidelity", "4. Memory", "5. Load"):
        assert heading in report
    for plot in ("speed.png", "memory.png", "load.png"):
        assert (docs / plot).stat().st_size > 1000
    results = json.loads((docs / "benchmarks.json").read_text())
    assert min(results["fidelity"]["distributed"].values()) >= 60
    assert max(results["fidelity"]["naive"].values()) < min(results["fidelity"]["distributed"].values()) - 20
    assert all(run["songs"] > 0 for run in results["load"]["runs"].values())
    assert len(results["memory"]["rows"]) == 2
