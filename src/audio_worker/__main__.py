"""`python -m src.audio_worker [--simulate crash|hang|corrupt|tamper]`: one worker in the foreground."""

from __future__ import annotations

import argparse

from src import config
from src.audio_worker.worker import Worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--simulate", choices=["crash", "hang", "corrupt", "tamper"], default=None,
                        help="die (or freeze) WORKER_SIMULATE_CRASH_AFTER s into the first job, or damage its "
                        "result (corrupt: it no longer decodes; tamper: plausible but wrong)")
    args = parser.parse_args()
    config.configure_logging()
    Worker(config.load(), simulate=args.simulate).run()


if __name__ == "__main__":
    main()
