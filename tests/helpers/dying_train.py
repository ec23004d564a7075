"""train.py, except that on torchrun's first attempt rank 1 dies at step DIE_AT: the elastic-restart test.

    torchrun --max_restarts=1 ... tests/helpers/dying_train.py DIE_AT [train.py arguments]
"""

import os
import sys

from nanopalm import trainer
from nanopalm.config import parse_args
from nanopalm.errors import run_cli


def main(argv: list[str]) -> None:
    die_at, args = int(argv[0]), argv[1:]
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "1":
        train_step = trainer.Trainer.train_step

        def dying_train_step(self: trainer.Trainer) -> None:
            if self.state.step == die_at:
                os._exit(13)  # no cleanup and no checkpoint, as when a process crashes or a node is lost
            train_step(self)

        trainer.Trainer.train_step = dying_train_step
    trainer.train(parse_args(args))


if __name__ == "__main__":
    sys.exit(run_cli(main))
