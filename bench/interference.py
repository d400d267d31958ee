"""Why one worker with 2 torch threads is slower than plain demucs with 2 threads on 2 cores.

`make bench` measured 1 worker x 2 threads about 14 % slower than plain `apply_model`,
while 2 workers x 1 thread matched it. This probe separates the worker's own code from
its surroundings. In one process, with N torch threads, it runs either demucs' own
`apply_model` on a whole song ("plain") or the worker's `run_job` over the song's jobs
("jobs"), optionally while a competitor process keeps one core busy for a fraction of the
time (standing in for the server's decode and merge and for RabbitMQ), and prints the
wall and CPU seconds of each run. `OMP_WAIT_POLICY=passive` in the environment stops the
OpenMP threads from spinning while they wait for each other.

    python -m bench.interference [--seconds 30] [--threads 2] [--runs 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "bench" / ".models"


def competitor(duty: float, stop) -> None:
    """Keep one core busy `duty` of the time, in 10 ms sleeps between busy spells."""
    busy = 0.01 * duty / (1 - duty)
    while not stop.is_set():
        end = time.perf_counter() + busy
        while time.perf_counter() < end:
            pass
        time.sleep(0.01)


def one_run(mode: str, threads: int, duty: float, seconds: float) -> tuple[float, float]:
    """(wall, CPU) seconds of one run in this process."""
    import numpy as np
    import torch

    from bench.sections import whole_file
    from src.kinds.separation.compute import run_job
    from src.kinds.separation.model import describe, load_model
    from src.kinds.separation.plan import job_params, plan_jobs

    torch.set_num_threads(threads)
    model = load_model("htdemucs_random", str(MODELS))
    spec = describe(model, "htdemucs_random", None)
    wav = (np.random.default_rng(0).standard_normal((2, int(44100 * seconds))) * 0.1).astype(np.float32)
    stop = multiprocessing.Event()
    rival = multiprocessing.Process(target=competitor, args=(duty, stop), daemon=True) if duty else None
    if rival:
        rival.start()
    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "plain":
        whole_file(model, wav)
    else:
        frames = wav.shape[1]
        for plan in plan_jobs(spec, frames, 30.0):
            run_job(model, job_params(spec, plan, frames, 0.0, 1.0), wav[:, plan.slice_start:plan.slice_end])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if rival:
        stop.set()
        rival.join()
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--one", nargs=3, metavar=("MODE", "DUTY", "POLICY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: one measurement, printed for the parent
        wall, cpu = one_run(args.one[0], args.threads, float(args.one[1]), args.seconds)
        print(f"{wall} {cpu}")
        return
    if not (MODELS / "htdemucs_random.th").exists():
        from tools.random_model import save_random_htdemucs

        save_random_htdemucs(MODELS, "htdemucs_random")
    cases = [(mode, duty, policy) for duty, policy in ((0.0, ""), (0.1, ""), (0.1, "passive"))
             for mode in ("plain", "jobs")]
    measured: dict[tuple, list[tuple[float, float]]] = {case: [] for case in cases}
    for _ in range(args.runs):  # interleaved, so drifts of the machine hit every case alike
        for mode, duty, policy in cases:
            env = {**os.environ, "OMP_WAIT_POLICY": policy} if policy else dict(os.environ)
            out = subprocess.run([sys.executable, "-m", "bench.interference", "--seconds", str(args.seconds),
                                  "--threads", str(args.threads), "--one", mode, str(duty), policy or "-"],
                                 cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
            measured[mode, duty, policy].append(tuple(map(float, out.split()[-2:])))
    print(f"{args.seconds:.0f} s of audio, htdemucs (random weights), {args.threads} torch threads, "
          f"median of {args.runs}:")
    for (mode, duty, policy), runs in measured.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"  {mode:5}  competitor {duty:4.0%}  OMP_WAIT_POLICY={policy or 'default':8}  "
              f"wall {wall:6.2f} s  CPU {cpu:6.2f} s")


if __name__ == "__main__":
    main()
