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
    for heading in ("1. Speed", "2. Where the time goes", "3. Fidelity", "4. Memory", "5. Load", "6. Transcoding",
                    "7. Face blurring", "8. Operations", "9. One broker node", "10. Separation on one device",
                    "11. The data plane"):
        assert heading in report
    for plot in ("speed.png", "memory.png", "load.png", "transcode-ratio.png", "amdahl.png", "operations.png",
                 "operations-workers.png"):
        assert (docs / plot).stat().st_size > 1000
    results = json.loads((docs / "benchmarks.json").read_text())
    assert min(results["fidelity"]["distributed"].values()) >= 60
    assert max(results["fidelity"]["naive"].values()) < min(results["fidelity"]["distributed"].values()) - 20
    assert all(run["songs"] > 0 for run in results["load"]["runs"].values())
    assert len(results["memory"]["rows"]) == 2
    transcoded = results["transcode"]["rows"]
    assert transcoded and all(row["farm"]["psnr"] > 30 and row["ffmpeg"]["psnr"] > 30 for row in transcoded)
    blurred = results["faceblur"]
    assert all(row["fps"] > 0 for row in blurred["rows"]) and blurred["rows"][1]["faces"] > 0
    operations = results["operations"]
    for run in operations["runs"].values():  # pull and push, each with a worker killed mid-run
        assert run["done"] == run["uploads"] > 0 and run["equal"] == run["done"]
        assert len(run["kills"]) == 1 and sum(w["jobs_done"] for w in run["workers"]) > 0
    assert all(k["server_cpu_per_media_second"] > 0 for k in operations["scaling"]["per_kind"].values())
    assert all(row["megabytes_per_second"] > 0 for row in results["broker"]["rows"])
    dataplane = results["dataplane"]  # every kind's task done, its broker octets counted
    assert [row["kind"] for row in dataplane["rows"]] == ["separate", "transcode", "faceblur"]
    assert all(row["broker_octets"]["total"] > 0 for row in dataplane["rows"]) and dataplane["download"]
    separation = results["gpu"]  # bench.gpu on this host's CPU, small model: the batched path stays exact
    assert separation["worker_fp32"]["sdr_db_min"] >= 60 and separation["jobs_unbatched"]["sdr_db"] >= 60
    assert separation["worker_fp32"]["batch"] == 1 and len(separation["batch"]) == 4


def test_one_section_alone_keeps_the_others(tmp_path):
    """`--only faceblur` on a docs folder from a full run: the other sections stay as they were measured."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("benchmarks.json", "BENCHMARKS.md"):
        (docs / name).write_bytes((ROOT / "docs" / name).read_bytes())
    before = json.loads((docs / "benchmarks.json").read_text())
    header = (docs / "BENCHMARKS.md").read_text().splitlines()[2]
    subprocess.run([sys.executable, "-m", "bench.run", "--profile", "smoke", "--only", "faceblur", "--docs",
                    str(docs)], cwd=ROOT, check=True, timeout=600)
    report = (docs / "BENCHMARKS.md").read_text()
    assert report.splitlines()[2] == header  # when sections 1-5 were measured, not now
    for heading in ("1. Speed", "5. Load", "6. Transcoding", "7. Face blurring"):
        assert heading in report
    results = json.loads((docs / "benchmarks.json").read_text())
    assert results["speed"] == before["speed"] and results["load"] == before["load"]
    assert results["transcode"] == before["transcode"]
    assert results["faceblur"]["profile"]["name"] == "smoke"
