"""A learnable dataset made from nothing but a seeded grammar, for machines without the corpus packages (the
GPU check): `python tests/gpu/synthetic.py OUT_DIR` writes train.bin, val.bin, meta.json and a char tokenizer."""

import sys
import time
from pathlib import Path

import numpy as np

from nanopalm.data import SplitStats, write_dataset, write_token_file
from nanopalm.tokenizer import CharTokenizer

WORDS = {"subject": ["the cat", "a dog", "my king", "the queen", "our ship"],
         "verb": ["sees", "loves", "follows", "fears", "finds"],
         "object": ["the sea", "a crown", "the moon", "my horse", "the storm"]}


def write_synthetic_dataset(out_dir: Path, documents: int = 400) -> Path:
    rng = np.random.default_rng(0)
    docs = [" ".join(" ".join(rng.choice(WORDS[part]) for part in WORDS) + "." for _ in range(20)) + "\n"
            for _ in range(documents)]
    splits = {"train": docs[: documents * 9 // 10], "val": docs[documents * 9 // 10:]}
    tok = CharTokenizer.from_texts(docs)

    def write_split(split: str, path: Path) -> SplitStats:
        tokens = [t for doc in splits[split] for t in tok.encode(doc) + [tok.eot_id]]
        write_token_file(path, tokens, tok.vocab_size, tok.name)
        return SplitStats(len(splits[split]), len(tokens), sum(len(d.encode()) for d in splits[split]))

    write_dataset(Path(out_dir), tok, "synthetic sentences (tests/gpu/synthetic.py)", time.time(), write_split)
    return Path(out_dir)


if __name__ == "__main__":
    write_synthetic_dataset(Path(sys.argv[1]))
