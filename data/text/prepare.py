"""Prepare your own text for pre-training or finetuning: local .txt/.md, .jsonl or .parquet files.

    python data/text/prepare.py --data_files book.txt --out_dir data/book     # then --dataset=book
    python data/text/prepare.py --data_files 'corpus/*.jsonl' --tokenizer gpt2
    python data/text/prepare.py --data_files chat.jsonl --tokenizer_from shakespeare   # finetune data

A .txt file is split into documents by --sample_by (default: blank-line separated paragraphs);
.jsonl/.parquet rows are documents (their --text_column). 10% of documents are held out for val.
To finetune a model, its data must use the model's tokenizer: --tokenizer_from <its dataset>.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from nanopalm.errors import run_cli  # noqa: E402
from nanopalm.prepare import build_parser, prepare  # noqa: E402


def main(argv: list[str]) -> None:
    parser = build_parser(__doc__, dataset=None, tokenizer="palm", val_fraction=0.1,
                          out_dir=Path(__file__).resolve().parent)
    prepare(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
