"""Whole-split evaluation: the loss and bits per byte of every token of a split, or of your own text.

    python eval.py --out_dir=RUN                           # the run's whole val split, non-overlapping windows
    python eval.py --out_dir=RUN --stride=128              # sliding windows: each token scored once, more context
    python eval.py --out_dir=RUN --data_files a.txt b.md   # your own text, tokenized with the run's tokenizer

What is scored. A stream (a split, or one text file) of n tokens is scored after one end-of-document token,
so its first token is predicted as the start of a document, as every document is in training, and all n
tokens are scored exactly once. A split already holds an end-of-document token after each document, which
is scored too (as in training). The bytes are the UTF-8 bytes of the scored text: a split's documents (its
end-of-document tokens count 0 bytes, as in the dataset's meta.json, whose bytes_per_token_val training
divides by), a file's text. So the whole val split's bits per byte and training's val_bpb are the same
quantity, one over every val token and the other over 20 random batches.

Windows. The model sees at most block_size tokens. Window k feeds stream positions [start, end) and predicts
the tokens one later; start = k * stride, except the last window, which ends the stream and takes as much
context as fits. A window counts only the predictions no earlier window made. With the default stride of
block_size the windows are disjoint (the context restarts every block_size tokens); with a smaller stride
every token after the first window sees at least block_size - stride + 1 tokens of context, for
block_size / stride times the compute. lm-eval's loglikelihood_rolling is the same rule (harness.py calls it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanopalm import distributed as D
from nanopalm.atomic import write_atomic
from nanopalm.checkpoint import Checkpoint, load_model_and_tokenizer
from nanopalm.data import read_token_file, resolve_dataset
from nanopalm.device import Precision, inference_precision, pick_device
from nanopalm.errors import UserError
from nanopalm.textfiles import check_utf8
from nanopalm.tokenizer import Tokenizer, tokenizer_fingerprint


# ---- windows ---------------------------------------------------------------------------------------
def count_windows(n: int, block_size: int, stride: int) -> int:
    """How many windows score n tokens."""
    return 1 + max(0, math.ceil((n - block_size) / stride))


def window(k: int, n: int, block_size: int, stride: int) -> tuple[int, int, int]:
    """Window k of a stream of n tokens after its end-of-document token (stream positions 0..n): (start,
    end, scored). It feeds positions [start, end), predicts positions start+1..end, and counts the last
    `scored` of those predictions. Computed from k alone, so ranks can split the windows without a list."""
    start = min(k * stride, max(0, n - block_size))
    end = min(start + block_size, n)
    previous_end = 0 if k == 0 else min((k - 1) * stride + block_size, n)
    return start, end, end - previous_end


def check_stride(stride: int | None, block_size: int) -> int:
    """The stride to use: block_size (disjoint windows) when None; a UserError outside 1..block_size-1."""
    if stride is None:
        return block_size
    if not 0 < stride < block_size:
        raise UserError(f"--stride {stride} must be between 1 and block_size - 1 = {block_size - 1} (leave it out "
                        "for disjoint windows)")
    return stride


# ---- scoring ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    """The summed negative log-likelihood of `tokens` tokens that are `bytes` bytes of text."""

    nats: float
    tokens: int
    bytes: int

    @property
    def loss(self) -> float:
        """Nats per token."""
        return self.nats / self.tokens if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes if self.bytes else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "bits_per_byte": self.bits_per_byte,
                "perplexity": math.exp(self.loss) if self.tokens else math.nan}


def _batch(tokens: np.ndarray, eot_id: int, first: int, count: int, block_size: int, stride: int, batch_size: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (-1: not counted) of windows first..first+count-1, padded to (batch_size,
    block_size): every batch has one shape (torch.compile compiles once), padding comes after the tokens
    (causal attention: it changes nothing before it)."""
    x = np.full((batch_size, block_size), eot_id, dtype=np.int64)
    y = np.full((batch_size, block_size), -1, dtype=np.int64)
    n = len(tokens)
    for row, k in enumerate(range(first, first + count)):
        start, end, scored = window(k, n, block_size, stride)
        # stream position p is tokens[p - 1]; position 0 is the end-of-document token before the stream
        span = np.concatenate([[eot_id], tokens[:end]]) if start == 0 else tokens[start - 1:end]
        length = end - start
        x[row, :length] = span[:-1]
        y[row, length - scored:length] = span[1 + length - scored:]
    return x, y


ONE_PROCESS = D.DistInfo()


@dataclass(frozen=True)
class Scorer:
    """Scores token streams, every token exactly once (module docstring), with one model and one setting.

    The model's own loss path does the work (a forward with targets; the fused output layer never holds the
    logits), under the precision's autocast. Under torchrun the batches are dealt round-robin to the ranks
    and every rank runs the same number of forwards (a rank out of batches repeats one, uncounted): under
    FSDP2 each forward all-gathers the weights, which needs every rank. Every rank gets the total.
    stride None: block_size, disjoint windows."""

    model: torch.nn.Module
    block_size: int
    batch_size: int
    device: torch.device
    precision: Precision
    stride: int | None = None
    info: D.DistInfo = ONE_PROCESS

    def __post_init__(self) -> None:
        check_stride(self.stride, self.block_size)

    @torch.no_grad()
    def score(self, tokens: np.ndarray, eot_id: int, progress: str = "") -> tuple[float, int]:
        """(summed nats, predictions counted) of a stream: every token once, so n when all is well (the tests hold
        it to that). `progress`: a tqdm description ('' = no bar; rank 0 only)."""
        n, block, size, info = len(tokens), self.block_size, self.batch_size, self.info
        stride = check_stride(self.stride, block)
        if n == 0:
            return 0.0, 0
        self.model.eval()
        windows = count_windows(n, block, stride)
        batches = math.ceil(windows / size)
        sums, scored = [], 0
        for j in tqdm(range(math.ceil(batches / info.world_size)), desc=progress, unit="batch",
                      disable=not progress or not info.is_main, delay=2):  # a bar only where one waits
            b = j * info.world_size + info.rank
            first = (b % batches) * size
            x, y = _batch(tokens, eot_id, first, min(size, windows - first), block, stride, size)
            counted = int((y != -1).sum())
            x, y = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
            with self.precision.autocast(self.device):
                ce = self.model(x, y).ce  # the mean over counted targets
            if b < batches:
                sums.append(ce.float() * counted)
                scored += counted
        # One host sync at the end; summed in float64 (float32 would lose digits over millions of tokens).
        nats = torch.stack(sums).cpu().double().sum() if sums else torch.zeros((), dtype=torch.float64)
        totals = torch.stack([nats, torch.tensor(float(scored), dtype=torch.float64)])
        if info.enabled:
            totals = D.all_reduce_sum(totals.to(self.device), info)
        nats, scored = totals.tolist()
        return nats, round(scored)

    def split(self, tokenizer: Tokenizer, data_dir: Path, split: str, progress: bool = True) -> Score:
        """The whole of a prepared split (data_dir/split.bin). Its bytes are counted on rank 0 only."""
        tokens, header = read_token_file(Path(data_dir) / f"{split}.bin")
        if header.vocab_size > tokenizer.vocab_size:
            raise UserError(f"{data_dir}/{split}.bin has a {header.vocab_size}-token vocabulary, the run's "
                            f"tokenizer {tokenizer.vocab_size}: give --dataset the data this run was trained on")
        nats, n = self.score(tokens, tokenizer.eot_id, f"{split} split" if progress else "")
        return Score(nats, n, document_bytes(tokens, tokenizer) if self.info.is_main else 0)

    def texts(self, tokenizer: Tokenizer, texts: dict[str, str]) -> dict[str, Score]:
        """Each text scored as a document of its own, tokenized with `tokenizer`."""
        scores = {}
        for name, text in texts.items():
            tokens = np.array(tokenizer.encode(text), dtype=np.int64)
            if len(tokens) < 2:  # the first token has no context: scoring starts at the second
                raise UserError(f"--data_files {name} is {len(tokens)} token(s) long: scoring needs at least 2")
            nats, n = self.score(tokens, tokenizer.eot_id, progress=Path(name).name)
            scores[name] = Score(nats, n, len(text.encode("utf-8")))
        return scores


def document_bytes(tokens: np.ndarray, tokenizer: Tokenizer) -> int:
    """UTF-8 bytes of the documents in a token stream, end-of-document tokens counting 0 (meta.json's way)."""
    total, start = 0, 0
    for end in [*np.flatnonzero(np.asarray(tokens) == tokenizer.eot_id).tolist(), len(tokens)]:
        if end > start:  # decode whole documents: a character cut between two pieces would not decode
            total += len(tokenizer.decode(np.asarray(tokens[start:end]).tolist()).encode("utf-8"))
        start = end + 1
    return total


def read_texts(paths: list[str]) -> dict[str, str]:
    """The text of each file; a missing or non-UTF-8 file is a UserError, found before any model loads."""
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"--data_files {path}: no such file; give paths of text files")
        if not check_utf8(path):
            raise UserError(f"--data_files {path} is empty (or only whitespace): there is nothing to score")
    return {path: Path(path).read_text(encoding="utf-8") for path in paths}


def total(scores: list[Score]) -> Score:
    return Score(sum(s.nats for s in scores), sum(s.tokens for s in scores), sum(s.bytes for s in scores))


def write_json(path: Path, result: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(result, indent=2) + "\n").encode())
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}): give --output a writable path") from None


def describe(name: str, score: Score) -> str:
    return (f"{name}: {score.tokens:,} tokens, {score.bytes:,} bytes | loss {score.loss:.4f} nats/token | "
            f"{score.bits_per_byte:.4f} bits per byte | perplexity {math.exp(score.loss):.2f}")


# ---- eval.py ---------------------------------------------------------------------------------------
def run_dataset(checkpoint: Checkpoint, dataset: str) -> Path:
    """The prepared dataset to score: `dataset`, or the one the run trained on; its tokenizer must be the run's."""
    data_dir = resolve_dataset(dataset or checkpoint.config().train.dataset)
    expected = checkpoint.meta.get("tokenizer_sha256")
    if expected and expected != tokenizer_fingerprint(data_dir):
        raise UserError(f"{data_dir} was prepared with another tokenizer than the run in {checkpoint.run_dir}: give "
                        "--dataset the data the run was trained on (or data prepared with --tokenizer_from)")
    return data_dir


def evaluate_run(run: str, split: str = "val", texts: dict[str, str] | None = None, dataset: str = "",
                 stride: int | None = None, batch_size: int = 16, device: str = "auto", dtype: str = "auto") -> dict:
    """eval.py without --tasks: score a split of the run's data (or `texts`), print and return the result."""
    started = time.perf_counter()
    where = pick_device(device)
    model, tokenizer, checkpoint = load_model_and_tokenizer(run, where)
    precision = inference_precision(dtype, where)
    scorer = Scorer(model, model.config.block_size, batch_size, where, precision, stride)
    result = {"run": str(checkpoint.run_dir), "checkpoint": str(checkpoint.path), "step": checkpoint.step}
    if texts:
        scores = scorer.texts(tokenizer, texts)
        score = total(list(scores.values()))
        result["data_files"] = {name: s.to_dict() for name, s in scores.items()}
        for name, s in scores.items():
            print(describe(name, s))
    else:
        data_dir = run_dataset(checkpoint, dataset)
        score = scorer.split(tokenizer, data_dir, split)
        result.update(dataset=str(data_dir), split=split)
    result.update(score.to_dict(), block_size=scorer.block_size, stride=scorer.stride or scorer.block_size,
                  batch_size=batch_size, device=str(where), dtype=str(precision.dtype).removeprefix("torch."),
                  parameters=model.num_params(), seconds=round(time.perf_counter() - started, 2))
    print(describe("all files" if texts else f"{split} split", score))
    return result
