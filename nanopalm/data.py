"""Datasets on disk and the batches training draws from them.

A prepared dataset is a directory holding `train.bin`, `val.bin` (token files: a 64-byte header,
then the tokens), `meta.json` (tokenizer, sizes, bytes per val token) and the tokenizer files.
Prepare scripts write `meta.json` last and delete it first, so a directory with a `meta.json`
is complete, and one without it is not used.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanopalm.atomic import ensure_dir, temporary_path, write_atomic
from nanopalm.errors import UserError
from nanopalm.tokenizer import Tokenizer

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"  # data/<name>/prepare.py writes data/<name>/
META_FILE = "meta.json"
SPLITS = ("train", "val")

# Token file header, little-endian, 64 bytes so that the tokens after it stay aligned.
MAGIC = b"NPALMTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ32s")  # magic, version, bytes per token, vocab size, token count, tokenizer
assert HEADER.size == 64


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while the vocabulary fits (GPT-2, small palm vocabularies); uint32 beyond (PaLM's 256k)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass(frozen=True)
class TokenFileHeader:
    vocab_size: int
    num_tokens: int
    tokenizer: str

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def pack(self) -> bytes:
        name = self.tokenizer.encode()
        if len(name) > 32:
            raise ValueError(f"tokenizer name {self.tokenizer!r} is longer than 32 bytes")
        return HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.vocab_size, self.num_tokens, name)


class TokenFileWriter:
    """Fills a token file of known length through a memmap, so no corpus is ever held in memory.

    The file is written as `<path>.tmp` and renamed to `path` by `commit` only once every token is
    in, so an interrupted prepare leaves nothing that looks complete. Use it as a context manager:
    leaving the block normally commits, an exception removes the temporary file.
    """

    def __init__(self, path: str | Path, num_tokens: int, vocab_size: int, tokenizer_name: str):
        if num_tokens < 1:
            raise ValueError("a token file holds at least one token")
        self.path = Path(path)
        self.tmp = temporary_path(self.path)
        self.header = TokenFileHeader(vocab_size, num_tokens, tokenizer_name)
        self.pos = 0
        with open(self.tmp, "wb") as f:
            f.write(self.header.pack())
            f.truncate(HEADER.size + num_tokens * self.header.dtype.itemsize)
        self.tokens = np.memmap(self.tmp, dtype=self.header.dtype, mode="r+", offset=HEADER.size,
                                shape=(num_tokens,))

    def write(self, tokens: np.ndarray) -> None:
        """Append `tokens` after those already written."""
        tokens = np.asarray(tokens)
        end = self.pos + len(tokens)
        if end > self.header.num_tokens:
            raise ValueError(f"{end} tokens written to a file sized for {self.header.num_tokens}")
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.header.vocab_size):
            raise ValueError(f"token ids outside [0, {self.header.vocab_size})")
        self.tokens[self.pos:end] = tokens
        self.pos = end

    def commit(self) -> None:
        if self.pos != self.header.num_tokens:
            self.abort()
            raise ValueError(f"{self.pos} tokens written to a file sized for {self.header.num_tokens}")
        self.tokens.flush()
        del self.tokens  # unmap before the rename
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.tokens = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TokenFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_token_file(path: str | Path, tokens, vocab_size: int, tokenizer_name: str) -> None:
    """Write the array-like `tokens` as a token file (header, then uint16 or uint32 tokens)."""
    tokens = np.asarray(tokens)
    with TokenFileWriter(path, len(tokens), vocab_size, tokenizer_name) as w:
        w.write(tokens)


def read_header(path: str | Path) -> TokenFileHeader:
    """Read and check a token file's header against the file's size; any problem is one UserError."""
    path = Path(path)
    fix = prepare_hint(path.parent)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): {fix}") from None
    if len(raw) < HEADER.size:
        raise UserError(f"{path} is truncated ({size} bytes, shorter than its {HEADER.size}-byte header): "
                        f"{fix}")
    magic, version, itemsize, vocab_size, num_tokens, name = HEADER.unpack(raw)
    if magic != MAGIC:
        raise UserError(f"{path} is not a nanoPALM token file (it does not start with {MAGIC!r}): {fix}")
    if version != VERSION:
        raise UserError(f"{path} has format version {version}, this nanoPALM reads version {VERSION}: {fix}")
    header = TokenFileHeader(vocab_size, num_tokens, name.rstrip(b"\0").decode(errors="replace"))
    if itemsize != header.dtype.itemsize:
        raise UserError(f"{path} has a corrupt header ({itemsize}-byte tokens for a vocabulary of "
                        f"{vocab_size}): {fix}")
    expected = HEADER.size + num_tokens * itemsize
    if size != expected:
        what = "is truncated" if size < expected else "has trailing bytes"
        raise UserError(f"{path} {what}: its header promises {num_tokens} tokens ({expected} bytes) but "
                        f"the file has {size} bytes: {fix}")
    return header


def read_token_file(path: str | Path) -> tuple[np.memmap, TokenFileHeader]:
    """The tokens of a checked token file, memory-mapped read-only, and its header."""
    header = read_header(path)
    tokens = np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER.size, shape=(header.num_tokens,))
    return tokens, header


def prepare_hint(data_dir: Path) -> str:
    """How to (re)make the dataset in `data_dir`: its own prepare script when it has one."""
    script = data_dir / "prepare.py"
    if script.is_file():
        try:
            script = script.resolve().relative_to(Path.cwd())
        except ValueError:
            pass
        return f"run `python {script}`"
    return f"re-run the prepare.py that wrote {data_dir} (see docs/DATA.md)"


def invalidate_dataset(data_dir: Path) -> None:
    """Mark `data_dir` incomplete before rewriting it: training refuses a directory without meta.json."""
    (data_dir / META_FILE).unlink(missing_ok=True)


@dataclass(frozen=True)
class SplitStats:
    documents: int
    tokens: int  # end-of-document tokens included
    bytes: int  # UTF-8 bytes of the documents' text


def write_meta(data_dir: Path, tokenizer: Tokenizer, source: str, train: SplitStats, val: SplitStats,
               extra: dict | None = None) -> dict:
    """Write meta.json, the last file of a prepare: from then on the dataset counts as complete.

    `bytes_per_token_val` turns a val loss in nats per token into bits per byte
    (loss * tokens / bytes / ln 2), a number comparable across tokenizers.
    """
    meta = {
        "format_version": VERSION,
        "source": source,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "train_documents": train.documents,
        "val_documents": val.documents,
        "train_tokens": train.tokens,
        "val_tokens": val.tokens,
        "val_bytes": val.bytes,
        "bytes_per_token_val": val.bytes / val.tokens,
        **(extra or {}),  # instruction data: its kind and template (nanopalm/instruct.py)
    }
    write_atomic(data_dir / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def write_dataset(out_dir: Path, tokenizer: Tokenizer, source: str, started: float,
                  write_split: Callable[[str, Path], SplitStats], extra: dict | None = None) -> dict:
    """The one way every prepare path writes a dataset directory: mark it incomplete, write train.bin and
    val.bin (`write_split(split, path)` writes one and returns its stats), the tokenizer, then meta.json
    last. Returns the meta and prints a summary (`started`: the prepare's start, time.time())."""
    ensure_dir(out_dir, "--out_dir")
    invalidate_dataset(out_dir)
    stats = {split: write_split(split, out_dir / f"{split}.bin") for split in SPLITS}
    tokenizer.save(out_dir)
    meta = write_meta(out_dir, tokenizer, source, stats["train"], stats["val"], extra)
    print(f"{out_dir}: {stats['train'].tokens:,} train and {stats['val'].tokens:,} val tokens in "
          f"{stats['train'].documents:,} + {stats['val'].documents:,} documents ({tokenizer.name}, vocabulary "
          f"{tokenizer.vocab_size}), {meta['bytes_per_token_val']:.3f} bytes per val token, "
          f"{time.time() - started:.1f} s")
    return meta


def load_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared dataset (tokenizer, vocab_size, eot_id, train_tokens, val_tokens,
    bytes_per_token_val, ...)."""
    path = Path(data_dir) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing, so the dataset is not (completely) prepared: "
                        f"{prepare_hint(path.parent)}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): {prepare_hint(path.parent)}") from None
    required = ("tokenizer", "vocab_size", "eot_id", "bytes_per_token_val", "train_tokens", "val_tokens")
    if not isinstance(meta, dict) or any(k not in meta for k in required):
        raise UserError(f"{path} lacks some of {', '.join(required)}: {prepare_hint(path.parent)}")
    return meta


def resolve_dataset(dataset: str) -> Path:
    """The directory of `dataset`: a name (`shakespeare` -> <repo>/data/shakespeare/) or a path.

    The directory must hold a complete prepared dataset (train.bin, val.bin, meta.json); if it
    does not, the error says which prepare command makes it.
    """
    named, path = DATA_ROOT / dataset, Path(dataset).expanduser()
    if path.is_file():
        raise UserError(f"--dataset={dataset} is a file: give a prepared dataset's directory (train.bin, val.bin, "
                        "meta.json) or a name under data/")
    data_dir = path if path.is_dir() and not named.is_dir() else named
    if not data_dir.is_dir():
        raise UserError(
            f"no dataset {dataset!r}: expected a directory {named} or a path to one; make it with "
            f"`python data/text/prepare.py --data_files <your files> --out_dir {named}`"
        )
    for name in (META_FILE, "train.bin", "val.bin"):
        if not (data_dir / name).is_file():
            raise UserError(f"dataset {dataset!r} is not prepared ({data_dir / name} is missing): "
                            f"{prepare_hint(data_dir)}")
    return data_dir


class BatchLoader:
    """Random windows of one split as (x, y) int64 tensors of shape (batch_size, block_size); y is x one
    token later.

    Determinism contract: the rows of `get_batch(step, micro_step)` are a pure function of
    (seed, split, step, micro_step) -- not of the process, the rank or what was loaded before. So
    training replays exactly after a resume, and a step's batch can be skipped on purpose (PaLM's
    loss-spike remedy, Section 5.1) by simply not asking for it.

    Distributed training: rank `r` of `world_size` asks for the *global* micro-step
    `local_micro_step * world_size + r`. No two ranks (nor two micro-steps) share a random stream,
    so each draws its own rows, and the union of all ranks' batches at a step is exactly what one
    process would draw for the same global micro-steps. As in nanoGPT, windows are sampled with
    replacement: two draws may overlap in text by chance, never by construction.
    Validation uses `get_batch(0, i)` for i < eval_iters: the same batches at every evaluation.

    Memory: each batch is read with plain seeks and reads into a fresh array; no memmap stays
    open, so resident memory does not grow over a long run (pages of a long-lived memmap are
    counted against the process as they are touched; nanoGPT remakes its memmap every batch for
    the same reason). The file is reopened per batch, so forked workers never share a file offset.
    """

    windows = True  # rows are windows of block_size + 1 tokens (instruct.ExampleLoader: whole examples)

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, block_size: int, seed: int,
                 device: torch.device | str, model_vocab_size: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.path = Path(data_dir) / f"{split}.bin"
        self.split_id = SPLITS.index(split)
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.device = torch.device(device)
        self.header = read_header(self.path)
        if self.header.num_tokens < block_size + 1 and self.windows:
            raise UserError(f"--block_size {block_size} needs {block_size + 1} tokens but {self.path} has "
                            f"{self.header.num_tokens}: lower --block_size or prepare more data")
        if model_vocab_size is not None and self.header.vocab_size > model_vocab_size:
            raise UserError(f"{self.path} was tokenized with a {self.header.vocab_size}-token vocabulary "
                            f"({self.header.tokenizer}) but the model has {model_vocab_size}: set "
                            f"--vocab_size to at least {self.header.vocab_size}, or use data of its tokenizer")
        self.num_starts = self.header.num_tokens - block_size  # a window needs block_size + 1 tokens

    def offsets(self, step: int, micro_step: int) -> np.ndarray:
        """Start positions of the batch's rows: counter-based randomness keyed on the contract's inputs."""
        if min(self.seed, step, micro_step) < 0:
            raise ValueError("seed, step and micro_step must be >= 0")
        key = np.random.SeedSequence([self.seed, self.split_id, step, micro_step])
        # raw 64-bit draws (stable across NumPy versions, unlike Generator methods); modulo bias < 2^-20
        return np.random.Philox(key).random_raw(self.batch_size) % np.uint64(self.num_starts)

    def get_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        dtype, n = self.header.dtype, self.block_size + 1
        rows = np.empty((self.batch_size, n), dtype=dtype)
        with open(self.path, "rb") as f:
            for row, start in zip(rows, self.offsets(step, micro_step), strict=True):
                f.seek(HEADER.size + int(start) * dtype.itemsize)
                f.readinto(row)
        x = torch.from_numpy(rows[:, :-1].astype(np.int64))
        y = torch.from_numpy(rows[:, 1:].astype(np.int64))
        if self.device.type == "cuda":
            # pin_memory() gives a fresh pinned buffer every call, taken from PyTorch's caching host
            # allocator, which does not hand a block out again until the copy reading it has finished.
            # Reusing one pinned buffer across calls instead races the in-flight copy (the seed's bug).
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)
