"""Build an HTDemucs with random weights and save it as a local demucs model folder.

No model weights can be downloaded on the project's machines, but the cost of running
the model depends only on its architecture. A folder written here loads with
`MODEL=<name> MODEL_REPO=<folder>` (demucs' `get_model(name, repo=folder)`), offline.

    python -m tools.random_model FOLDER [--name htdemucs_random] [--small]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from demucs.htdemucs import HTDemucs
from demucs.states import get_state

SOURCES = ["drums", "bass", "other", "vocals"]


def save_random_htdemucs(folder: Path, name: str = "htdemucs_random", small: bool = False, seed: int = 0) -> Path:
    """Write `folder/name.th`: htdemucs' architecture (or a small one for tests), random weights."""
    torch.manual_seed(seed)
    if small:
        model = HTDemucs(sources=SOURCES, channels=8, t_layers=1, bottom_channels=0, t_hidden_scale=1.0, segment=4)
    else:
        # the published htdemucs configuration (demucs/remote/htdemucs.yaml), segment 7.8 s
        model = HTDemucs(sources=SOURCES, segment=7.8)
    args, kwargs = model._init_args_kwargs
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.th"
    torch.save({"klass": HTDemucs, "args": args, "kwargs": kwargs, "state": get_state(model, None, False),
                "training_args": {}}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--name", default="htdemucs_random")
    parser.add_argument("--small", action="store_true", help="a small, fast model for tests")
    args = parser.parse_args()
    print(save_random_htdemucs(args.folder, args.name, args.small))


if __name__ == "__main__":
    main()
