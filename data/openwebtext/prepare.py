"""Prepare OpenWebText (the seed's dataset) with the GPT-2 tokenizer, as nanoGPT did.

    python data/openwebtext/prepare.py                              # download from the hub (~54GB cache)
    python data/openwebtext/prepare.py --data_files 'owt/*.parquet' # the same pipeline on local files

Source: `Skylion007/openwebtext` on the Hugging Face hub. Its loading script (what the seed's
`load_dataset("openwebtext")` ran) no longer works: `datasets` 4 removed script datasets. The
repository's owner has since replaced the script by parquet shards (data/train-*.parquet), which
current `datasets` loads natively. If that changes again, point --data_files at any copy of the
parquet files (for example its `refs/convert/parquet` branch through an hf:// path).
~8M documents -> about 9B GPT-2 tokens: train.bin ~17GB, val.bin ~8.5MB (0.05% of documents held out).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from nanopalm.errors import run_cli  # noqa: E402
from nanopalm.prepare import build_parser, prepare  # noqa: E402


def main(argv: list[str]) -> None:
    parser = build_parser(__doc__, dataset="Skylion007/openwebtext", tokenizer="gpt2", val_fraction=0.0005,
                          out_dir=Path(__file__).resolve().parent)
    prepare(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
