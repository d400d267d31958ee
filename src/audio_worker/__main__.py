"""`python -m src.audio_worker [--simulate crash|hang]`: one worker in the foreground."""

from __future__ import annotations

import argparse
import logging

from src import config
from src.audio_worker.worker import Worker

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--simulate", choices=["crash", "hang"], default=None,
                        help="die (or freeze) WORKER_SIMULATE_CRASH_AFTER seconds into the first job")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger("stomp").setLevel(logging.WARNING)
    Worker(config.load(), simulate=args.simulate).run()


if __name__ == "__main__":
    main()
