"""Prepare instruction or chat data (JSON lines) for finetuning, the prompt masked out of the loss.

    python data/instruct/prepare.py --train_file=train.jsonl --val_file=val.jsonl --tokenizer_from=out-shakespeare \
        --out_dir=data/my_instructions                              # then --dataset=data/my_instructions

Each line: {"instruction", "input" (optional), "output"}, {"prompt", "response"} or {"messages": [...]}.
The tokenizer must be the model's: --tokenizer_from takes a run directory or a dataset. The template and
what is learned: nanopalm/instruct.py and docs/FINETUNE.md. A malformed line stops it with FILE:LINE, before
anything is written.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from nanopalm.errors import ArgumentParser, run_cli  # noqa: E402
from nanopalm.instruct import prepare_instructions  # noqa: E402
from nanopalm.prepare import tokenizer_dir  # noqa: E402
from nanopalm.tokenizer import load_tokenizer  # noqa: E402


def main(argv: list[str]) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_file", type=Path, required=True, help="JSON lines of training examples")
    p.add_argument("--val_file", type=Path, required=True, help="JSON lines of held-out examples")
    p.add_argument("--tokenizer_from", required=True, help="the model's run directory (or a dataset) to finetune")
    p.add_argument("--out_dir", type=Path, required=True, help="where train.bin, val.bin, the masks and meta.json go")
    args = p.parse_args(argv)
    prepare({"train": args.train_file, "val": args.val_file}, args.tokenizer_from, args.out_dir)


def prepare(files: dict[str, Path], tokenizer_from: str, out_dir: Path) -> None:
    prepare_instructions(files, load_tokenizer(tokenizer_dir(tokenizer_from)), out_dir)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
