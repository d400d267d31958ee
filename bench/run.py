"""`make bench`: run every benchmark section and write docs/BENCHMARKS.md with its plots.

    python -m bench.run                      # the full run (about 66 minutes on 2 cores)
    BENCH_PROFILE=quick python -m bench.run  # 60 s song, 2 runs, 1 and 10 min memory
    BENCH_PROFILE=smoke python -m bench.run  # tiny inputs, for the test suite
    python -m bench.run --only transcode     # section 6 alone (about 25 minutes on 2 cores), the
                                             # other sections' figures kept from docs/benchmarks.json
    python -m bench.run --only operations    # section 8 alone: 5 workers, 2 killed (about 11 minutes)
    python -m bench.run --only broker        # section 9 alone: one RabbitMQ node's bytes per second
    python -m bench.run --only dataplane     # section 11 alone: broker bytes, server CPU and data endpoint
                                             # per media second, before and after the claim check (~5 minutes)

The realistic model is saved once under bench/.models (htdemucs' architecture, random
weights). Deployments use their own QUEUE_PREFIX and a scratch STORAGE_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import broker_capacity, dataplane, faceblur, gpu, operations, sections, transcode
from bench.report import measured, write
from tools.random_model import save_random_htdemucs

ROOT = Path(__file__).resolve().parents[1]
# sections 6-9, each `--only`-able, each with profiles of its own
LATER_SECTIONS = {"transcode": transcode, "faceblur": faceblur, "operations": operations, "broker": broker_capacity,
                  "gpu": gpu, "dataplane": dataplane}


def profile(name: str, models: Path) -> sections.Profile:
    if name == "smoke":
        save_random_htdemucs(models, "htdemucs_small", small=True)
        return sections.Profile("smoke", "htdemucs_small", str(models), speed_seconds=6, runs=1,
                                fidelity_seconds=8, memory_minutes=(0.1, 0.2), load_seconds=4, load_clients=2,
                                load_song_seconds=3)
    if not (models / "htdemucs_random.th").exists():
        save_random_htdemucs(models, "htdemucs_random")
    if name == "quick":
        return sections.Profile("quick", "htdemucs_random", str(models), speed_seconds=60, runs=2,
                                fidelity_seconds=30, memory_minutes=(1, 10), load_seconds=100, load_clients=3,
                                load_song_seconds=20)
    return sections.Profile("full", "htdemucs_random", str(models), speed_seconds=180, runs=3,
                            fidelity_seconds=60, memory_minutes=(1, 10, 60), load_seconds=180, load_clients=3,
                            load_song_seconds=20)


def timed(name: str, section: Callable[..., dict], *args: Any) -> dict:
    print(f"bench: {name} ...", flush=True)
    started = time.monotonic()
    result = section(*args)
    print(f"bench: {name} done in {time.monotonic() - started:.0f}s", flush=True)
    return result


def previous(docs: Path) -> dict:
    """The figures of an earlier run in `docs`, with when and how sections 1-5 were measured
    (taken from its BENCHMARKS.md where the figures predate keeping that)."""
    found = docs / "benchmarks.json"
    if not found.exists():
        return {}
    results = json.loads(found.read_text())
    if "speed" in results and "measured" not in results:
        report = docs / "BENCHMARKS.md"
        text = report.read_text() if report.exists() else ""
        at = re.search(r"^Measured (.+?) UTC on (.+)\.$", text, re.M)
        command = re.search(r"^Command: `(.+?)`", text, re.M)
        results["measured"] = {"at": at[1] if at else "?", "on": at[2] if at else "?",
                               "command": command[1] if command else "make bench"}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--profile", default=os.environ.get("BENCH_PROFILE", "full"),
                        choices=["full", "quick", "smoke"])
    parser.add_argument("--only", choices=list(LATER_SECTIONS),
                        help="run only this section; the others' figures are kept from DOCS/benchmarks.json")
    args = parser.parse_args()
    command = "make bench" if args.profile == "full" else f"BENCH_PROFILE={args.profile} make bench"
    if args.only:
        command = ("" if args.profile == "full" else f"BENCH_PROFILE={args.profile} ") + \
            f"python -m bench.run --only {args.only}"
        results = previous(args.docs)
        results.pop(args.only, None)
    else:
        chosen = profile(args.profile, ROOT / "bench" / ".models")
        results = {"profile": chosen.__dict__}
    with tempfile.TemporaryDirectory(prefix="karaoke-bench-") as scratch:
        workdir = Path(scratch)
        if not args.only:
            results["speed"] = timed("speed", sections.speed, chosen, workdir)
            results["fidelity"] = timed("fidelity", sections.fidelity, chosen, workdir)
            results["memory"] = timed("memory", sections.memory, chosen, workdir)
            # the load's pace comes from the speed section's measured cost per second of audio
            results["load"] = timed("load", sections.load, chosen, workdir, results["speed"])
        for name, section in LATER_SECTIONS.items():
            if args.only in (None, name):
                results[name] = timed(name, section.run, section.profile(args.profile), workdir)
                results[name]["measured"] = measured(command)
    if args.only:  # another section may have been written meanwhile (runs of `--only` overlap): keep it
        results = {**previous(args.docs), args.only: results[args.only]}
    print(f"bench: wrote {write(results, args.docs, command)}")


if __name__ == "__main__":
    main()
