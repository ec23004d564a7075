"""The floor every model must beat, on a prepared dataset's val split: uniform guessing over the vocabulary,
and the unigram model (each token's frequency in train, add-one smoothed). In nats per token and bits per byte
(val bytes from meta.json, as training reports them).

    python scripts/baselines.py                       # data/shakespeare (prepare it first: python train.py does)
    python scripts/baselines.py data/shakespeare docs/results/baselines_shakespeare.json
"""

import json
import math
import sys
from pathlib import Path

import numpy as np

from nanopalm.data import load_meta, read_token_file, resolve_dataset
from nanopalm.errors import run_cli


def main(argv: list[str]) -> None:
    data_dir = resolve_dataset(argv[0] if argv else "shakespeare")
    meta = load_meta(data_dir)
    vocab = meta["vocab_size"]
    train, _ = read_token_file(data_dir / "train.bin")
    val, _ = read_token_file(data_dir / "val.bin")
    counts = np.bincount(np.asarray(train), minlength=vocab).astype(np.float64) + 1.0  # add-one: no zero
    log_p = np.log(counts / counts.sum())
    nats = {"uniform": math.log(vocab), "unigram": float(-log_p[np.asarray(val)].mean())}
    bpb = {k: v / math.log(2) / meta["bytes_per_token_val"] for k, v in nats.items()}
    result = {"dataset": str(data_dir), "vocab_size": vocab, "val_tokens": int(len(val)),
              "nats_per_token": nats, "bits_per_byte": bpb, "command": " ".join(["python scripts/baselines.py", *argv])}
    for name in nats:
        print(f"{name}: {nats[name]:.4f} nats per token, {bpb[name]:.4f} bits per byte")
    if len(argv) > 1:
        Path(argv[1]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(run_cli(main))
