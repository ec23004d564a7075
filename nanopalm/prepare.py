"""Prepare any text corpus for training: Hugging Face datasets or local text/jsonl/parquet files.

One pipeline, used by data/openwebtext/prepare.py and data/text/prepare.py:
  1. load documents with `datasets.load_dataset` (a hub dataset, or local files with --data_files:
     the very same code after loading);
  2. hold out whole documents for validation (a seeded shuffle);
  3. make the tokenizer (gpt2 fixed; char and palm learn from the data; or reuse one with
     --tokenizer_from, which finetuning needs);
  4. tokenize in --num_proc processes (progress bars by `datasets`), an end-of-document token
     after every document;
  5. write train.bin and val.bin through a memmap, shard by shard, never holding the corpus in memory,
     then the tokenizer, then meta.json (last: it marks the dataset complete).
`datasets` is imported inside the functions: it is slow to import and the built-in Shakespeare
corpus does not need it.
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanopalm.atomic import check_dir
from nanopalm.data import DATA_ROOT, SplitStats, TokenFileWriter, token_dtype, write_dataset
from nanopalm.errors import ArgumentParser, UserError
from nanopalm.textfiles import COMPRESSION, check_text_files
from nanopalm.tokenizer import (
    CONFIG_FILE as TOKENIZER_CONFIG,
)
from nanopalm.tokenizer import (
    PALM_VOCAB_SIZE,
    TOKENIZER_NAMES,
    CharTokenizer,
    Tokenizer,
    get_tokenizer,
    load_tokenizer,
)

BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet"}  # file suffix -> datasets' packaged loader
WRITE_BATCH = 1024  # documents per write into the memmap


def local_files(patterns: list[str]) -> tuple[str, list[str]]:
    """Expand --data_files globs; returns the datasets builder they all need and the file list."""
    files: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not found:
            raise UserError(f"--data_files {pattern!r} matches no file: check the path")
        for path in found:
            if os.path.isdir(path):
                raise UserError(f"--data_files {path} is a directory: give files, or a glob such as "
                                f"'{os.path.join(path, '*.txt')}'")
        files += found
    kinds = set()
    for f in files:
        stem = f[: -len(s)] if (s := next((c for c in COMPRESSION if f.endswith(c)), "")) else f
        kind = BUILDERS.get(Path(stem).suffix.lower())
        if kind is None:
            raise UserError(f"cannot read {f}: --data_files takes {', '.join(BUILDERS)} files (optionally "
                            f"compressed {', '.join(COMPRESSION)})")
        kinds.add(kind)
    if len(kinds) > 1:
        raise UserError(f"--data_files mixes {' and '.join(sorted(kinds))} files: prepare one kind at a time")
    return kinds.pop(), files


def load_documents(dataset: str | None, data_files: list[str] | None, text_column: str, sample_by: str,
                   cache_dir: str | None):
    """All documents as one `datasets.Dataset` with a `text_column`."""
    import datasets

    try:
        if data_files:
            builder, files = local_files(data_files)
            if builder in ("text", "json"):
                check_text_files(files, builder, text_column)
            extra = {"sample_by": sample_by} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **extra)
        elif dataset:
            ds = datasets.load_dataset(dataset, split="train", cache_dir=cache_dir)
        else:
            raise UserError("nothing to prepare: give --data_files (local files) or --dataset (a hub name)")
    except ConnectionError as e:
        raise UserError(f"cannot load {dataset} from the Hugging Face hub ({e}): connect, or prepare local "
                        "files with --data_files") from None
    except datasets.exceptions.DatasetNotFoundError as e:
        raise UserError(f"{e}: check --dataset") from None
    except datasets.exceptions.DatasetGenerationError as e:  # a file datasets cannot parse; it says why in __cause__
        reason = e.__cause__ or e
        raise UserError(f"cannot read the documents ({type(reason).__name__}: {str(reason).splitlines()[0]}): "
                        "check that --data_files are valid files of their kind") from None
    if text_column not in ds.column_names:
        raise UserError(f"the documents have no column {text_column!r} (they have {', '.join(ds.column_names)}): "
                        "set --text_column")
    return ds.select_columns([text_column])


def split_documents(ds, val_fraction: float, seed: int):
    """(train, val): a seeded shuffle of whole documents, `val_fraction` of them (at least one) held out."""
    n_val = max(1, round(len(ds) * val_fraction))
    if len(ds) - n_val < 1:
        raise UserError(f"{len(ds)} document(s) cannot be split into train and val: give more text (for a "
                        "single .txt file, --sample_by paragraph or line makes more documents)")
    parts = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _charset(batch: dict, column: str) -> dict:
    return {"chars": ["".join(set("".join(batch[column])))]}


def _encode(batch: dict, tokenizer: Tokenizer, column: str, dtype: np.dtype) -> dict:
    texts = batch[column]
    ids = [np.array(doc + [tokenizer.eot_id], dtype=dtype) for doc in tokenizer.encode_batch(texts)]
    return {"ids": ids, "len": [len(d) for d in ids], "bytes": [len(t.encode()) for t in texts]}


def make_tokenizer(name: str, train, val, column: str, vocab_size: int | None, train_chars: int,
                   num_proc: int | None) -> Tokenizer:
    """gpt2 as is; char from every character of train and val; palm trained on up to `train_chars`
    characters of (shuffled) train documents."""
    if name == "char":
        charsets = [d.map(_charset, batched=True, fn_kwargs={"column": column}, remove_columns=d.column_names,
                          num_proc=num_proc, desc="collecting characters") for d in (train, val)]
        return CharTokenizer("".join(c for d in charsets for c in d["chars"]))
    if name == "palm":
        def sample():
            seen = 0
            for batch in train.iter(batch_size=1000):
                for text in batch[column]:
                    yield text
                    seen += len(text)
                    if seen >= train_chars:
                        return

        print(f"training the palm tokenizer on up to {train_chars:,} characters of train documents")
        return get_tokenizer("palm", texts=sample(), vocab_size=vocab_size)
    return get_tokenizer(name)


def tokenize(ds, tokenizer: Tokenizer, column: str, num_proc: int | None, split: str):
    """Each document as token ids followed by the end-of-document id, with its token and byte counts."""
    dtype = token_dtype(tokenizer.vocab_size)  # cache ids no wider than the token file will
    return ds.map(_encode, batched=True, fn_kwargs={"tokenizer": tokenizer, "column": column, "dtype": dtype},
                  remove_columns=ds.column_names, num_proc=num_proc, desc=f"tokenizing {split}")


def write_split(tokenized, path: Path, tokenizer: Tokenizer) -> SplitStats:
    """Concatenate the tokenized documents into the token file `path`, batch by batch through a memmap."""
    table = tokenized.with_format("arrow")
    lengths = table[:]["len"].to_numpy()
    stats = SplitStats(len(tokenized), int(lengths.sum()), int(table[:]["bytes"].to_numpy().sum()))
    with TokenFileWriter(path, stats.tokens, tokenizer.vocab_size, tokenizer.name) as writer:
        for start in tqdm(range(0, len(tokenized), WRITE_BATCH), desc=f"writing {path.name}"):
            ids = table[start:start + WRITE_BATCH]["ids"].combine_chunks()
            writer.write(ids.flatten().to_numpy())
    return stats


def prepare(args: argparse.Namespace) -> Path:
    """Run the whole pipeline for parsed `args` (see `build_parser`); returns the output directory."""
    started = time.time()
    if args.vocab_size is not None and (args.tokenizer or args.default_tokenizer) != "palm":
        raise UserError("--vocab_size only applies to --tokenizer palm (gpt2 and char have fixed vocabularies)")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.num_proc < 1:
        raise UserError(f"--num_proc must be at least 1, got {args.num_proc}")
    if args.tokenizer_from and (args.tokenizer or args.vocab_size):
        raise UserError("--tokenizer_from reuses a tokenizer as it is: drop --tokenizer and --vocab_size")
    reused = load_tokenizer(tokenizer_dir(args.tokenizer_from)) if args.tokenizer_from else None
    out_dir = check_dir(args.out_dir, "--out_dir")  # a bad output path fails now; created only when written
    name = args.tokenizer or args.default_tokenizer
    num_proc = args.num_proc if args.num_proc > 1 else None

    docs = load_documents(args.dataset, args.data_files, args.text_column, args.sample_by, args.cache_dir)
    train, val = split_documents(docs, args.val_fraction, args.seed)
    tok = reused or make_tokenizer(name, train, val, args.text_column, args.vocab_size,
                                   args.tokenizer_train_chars, num_proc)
    tokenized = {"train": tokenize(train, tok, args.text_column, num_proc, "train"),
                 "val": tokenize(val, tok, args.text_column, num_proc, "val")}
    source = ", ".join(args.data_files) if args.data_files else f"{args.dataset} (Hugging Face hub)"
    write_dataset(out_dir, tok, source, started, lambda split, path: write_split(tokenized[split], path, tok))
    return out_dir


def tokenizer_dir(name_or_path: str) -> Path:
    """--tokenizer_from: a dataset name (data/<name>/) or a directory holding tokenizer.json."""
    named, path = DATA_ROOT / name_or_path, Path(name_or_path).expanduser()
    directory = named if named.is_dir() else path
    if not (directory / TOKENIZER_CONFIG).is_file():
        what = ("is a file" if path.is_file() else "does not exist" if not directory.exists()
                else "has no tokenizer.json")
        raise UserError(f"--tokenizer_from={name_or_path} {what}: give a dataset name under data/, or a dataset or "
                        "run directory that holds tokenizer.json")
    return directory


def build_parser(description: str, dataset: str | None, tokenizer: str, val_fraction: float,
                 out_dir: Path) -> argparse.ArgumentParser:
    """The command line shared by the prepare scripts; each passes its own defaults."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=dataset, help="a Hugging Face hub dataset (ignored with --data_files)")
    p.add_argument("--data_files", nargs="+", default=None,
                   help="local .txt/.md, .json/.jsonl or .parquet files or globs, used instead of --dataset")
    p.add_argument("--text_column", default="text", help="the column holding each document's text")
    p.add_argument("--sample_by", choices=("paragraph", "line", "document"), default="paragraph",
                   help="what one document of a .txt file is: blank-line separated paragraph, line or whole file")
    p.add_argument("--tokenizer", choices=TOKENIZER_NAMES, default=None, help=f"(default: {tokenizer})")
    p.set_defaults(default_tokenizer=tokenizer)
    p.add_argument("--vocab_size", type=int, default=None, help=f"palm only (default {PALM_VOCAB_SIZE})")
    p.add_argument("--tokenizer_from", default=None,
                   help="reuse the tokenizer of this dataset name or directory (needed to finetune a model)")
    p.add_argument("--tokenizer_train_chars", type=int, default=50_000_000,
                   help="palm: characters of train text its vocabulary is learned from")
    p.add_argument("--val_fraction", type=float, default=val_fraction, help="share of documents held out")
    p.add_argument("--seed", type=int, default=2357, help="seed of the train/val split")
    p.add_argument("--num_proc", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="tokenizer processes")
    p.add_argument("--out_dir", type=Path, default=out_dir, help="where train.bin, val.bin, meta.json go")
    p.add_argument("--cache_dir", default=None, help="datasets cache (default: ~/.cache/huggingface/datasets)")
    return p
