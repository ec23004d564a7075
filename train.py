"""Train a PaLM model.

    python train.py                                  # built-in Shakespeare, CPU-sized, <= 10 minutes
    python train.py owt_palm_213m                    # the seed's OpenWebText run (prepare it first)
    python train.py --max_iters=200 --out_dir=out-x  # any key of `python train.py --help`
    python train.py --resume --out_dir=out-x         # continue a run as its config.json recorded it
    torchrun --standalone --nproc_per_node=8 train.py owt_palm_213m
"""

import os
import sys

from nanopalm.config import help_text, run_config
from nanopalm.errors import run_cli
from nanopalm.trainer import train


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(help_text(argv))
        return
    cfg, notes = run_config(argv)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        for note in notes:
            print(note, flush=True)
    train(cfg)


if __name__ == "__main__":
    sys.exit(run_cli(main))
