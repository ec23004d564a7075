"""Instruction and chat data: JSON lines made into a dataset whose loss learns the responses alone.

Each line is one example in one of three shapes: Alpaca's `{"instruction", "input" (optional), "output"}`,
`{"prompt", "response"}`, or a chat `{"messages": [{"role": "system" | "user" | "assistant", "content"}]}`.
All are rendered by ONE template (TEMPLATE, written into the dataset's meta.json and the run directory, so
that sampling wraps a prompt exactly as training saw it):

    User:
    {instruction, then a blank line and the input if there is one}

    Assistant:
    {output}<|endoftext|>

(a chat renders each message so, "System:" too, turns separated by a blank line). The assistant's text
and the end-of-text token after it are the *learned* tokens: the loss, the bits per byte and the trained-token
count see those alone; the prompt is context. On disk beside the usual token files: `{split}.mask.npy`, one
byte per token (1: the token is a learned target), and `{split}.starts.npy`, where each example begins.

Batches are padded, not packed: one example per row, after it end-of-text tokens that are never targets, to
the length of the batch's longest example rounded up to 64 tokens (a few shapes, not one per batch: fewer
torch.compile recompilations and less allocator churn).
Attention is causal, so no token sees the padding to its right, and no example ever attends to another: a
batch's loss is that of its examples scored one by one (tests/test_instruct.py). An example longer than the
model's block_size + 1 tokens is cut at its end; training says how many were.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch

from nanopalm.atomic import write_atomic
from nanopalm.data import HEADER, META_FILE, SPLITS, BatchLoader, SplitStats, write_dataset, write_token_file
from nanopalm.errors import UserError
from nanopalm.evaluate import document_bytes
from nanopalm.tokenizer import Tokenizer

# Plain words every tokenizer has (the char tokenizer of the built-in corpus has no "#" or "<"); title case, unlike
# the plays' upper-case speaker names.
TEMPLATE = {"system": "System:\n", "user": "User:\n", "assistant": "Assistant:\n", "separator": "\n\n"}
TEMPLATE_FILE = "template.json"  # the template, in a run directory
WIDTH_STEP = 64  # a batch is as wide as its longest example rounded up to this: at most block_size / 64 shapes


def messages_of(example: object) -> list[dict]:
    """A line's example as chat messages; ValueError saying what is wrong with it."""
    if not isinstance(example, dict):
        raise ValueError("a line must hold a JSON object")
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list')
        for m in messages:
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise ValueError('each message needs a "role" (system, user or assistant) and a "content" string')
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("a conversation needs an assistant message to learn")
        return messages
    if "instruction" in example or "output" in example:
        prompt, answer, extra = example.get("instruction"), example.get("output"), example.get("input") or ""
        if not all(isinstance(v, str) for v in (prompt, answer, extra)):
            raise ValueError('"instruction" and "output" (and "input", if given) must be strings')
        prompt += f"{TEMPLATE['separator']}{extra}" if extra else ""
    else:
        prompt, answer = example.get("prompt"), example.get("response")
        if not (isinstance(prompt, str) and isinstance(answer, str)):
            raise ValueError('give "instruction"/"output", "prompt"/"response" or "messages"')
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def render(messages: list[dict], tokenizer: Tokenizer, template: dict = TEMPLATE) -> tuple[list[int], list[int]]:
    """(token ids, learned flags) of a conversation: each assistant message's content and its end-of-text
    are learned (1), everything else is context (0). Each piece is encoded on its own, as prompt_ids does."""
    ids, learned = [], []
    for i, m in enumerate(messages):
        head = (template["separator"] if i else "") + template[m["role"]]
        pieces = [(head, 0), (m["content"], int(m["role"] == "assistant"))]
        for text, flag in pieces:
            tokens = tokenizer.encode(text)
            ids += tokens
            learned += [flag] * len(tokens)
        if m["role"] == "assistant":
            ids.append(tokenizer.eot_id)
            learned.append(1)
    return ids, learned


def prompt_ids(messages: list[dict], tokenizer: Tokenizer, template: dict = TEMPLATE) -> list[int]:
    """What a model finetuned on `template` continues with the assistant's answer: the conversation so far,
    then the assistant's header, tokenized piece by piece exactly as render() tokenized training examples."""
    ids, _ = render(messages + [{"role": "assistant", "content": ""}], tokenizer, template)
    return ids[:-1]  # without the end-of-text of the empty answer


def read_examples(path: Path) -> list[list[dict]]:
    """Every example of a JSON-lines file as messages; a malformed line is a UserError naming file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): give a UTF-8 JSON-lines file") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            examples.append(messages_of(json.loads(line)))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise UserError(f"{path}:{number}: {e}; fix or remove that line") from None
    if not examples:
        raise UserError(f"{path} holds no examples: one JSON object a line")
    return examples


def prepare_instructions(files: dict[str, Path], tokenizer: Tokenizer, out_dir: Path) -> dict:
    """Write a dataset of instruction examples (files: {"train": path, "val": path}) into out_dir. Every line
    of both files is checked, and tokenized, before anything is written."""
    started = time.time()
    examples = {split: read_examples(files[split]) for split in SPLITS}
    renders = {split: [render(m, tokenizer) for m in examples[split]] for split in SPLITS}  # (a char tokenizer
    # refuses a character it lacks: here, not halfway through the writing)

    def write_split(split: str, path: Path) -> SplitStats:
        rendered = renders[split]
        ids = np.concatenate([np.asarray(r[0], dtype=np.int64) for r in rendered])
        learned = np.concatenate([np.asarray(r[1], dtype=np.uint8) for r in rendered])
        starts = np.cumsum([0] + [len(r[0]) for r in rendered])
        answers = sum(len(m["content"].encode()) for ex in examples[split] for m in ex if m["role"] == "assistant")
        write_token_file(path, ids, tokenizer.vocab_size, tokenizer.name)
        np.save(path.with_suffix(".mask.npy"), learned)
        np.save(path.with_suffix(".starts.npy"), starts)
        return SplitStats(len(rendered), int(learned.sum()), answers)  # learned tokens and bytes only

    return write_dataset(out_dir, tokenizer, f"instructions: {files['train']}, {files['val']}", started, write_split,
                         extra={"kind": "instructions", "template": TEMPLATE})


def save_template(meta: dict, run_dir: Path) -> None:
    """A run trained on instructions keeps its template beside its tokenizer."""
    if meta.get("kind") == "instructions":
        write_atomic(Path(run_dir) / TEMPLATE_FILE, json.dumps(meta["template"], indent=2).encode())


def load_template(run_dir: Path) -> dict:
    path = Path(run_dir) / TEMPLATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{run_dir} was not trained on instruction data (no {TEMPLATE_FILE}): drop --chat, or "
                        "finetune it on a dataset made by data/instruct/prepare.py") from None


class ExampleLoader(BatchLoader):
    """Batches of whole examples, one a row, padded after its end: x the tokens, y the next tokens where they
    are learned and -1 elsewhere (the prompt, the padding). The rows of a batch are drawn as BatchLoader draws
    its windows, a pure function of (seed, split, step, micro_step): resume and loss-spike skips hold."""

    windows = False

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, block_size: int, seed: int,
                 device: torch.device | str, model_vocab_size: int | None = None):
        super().__init__(data_dir, split, batch_size, block_size, seed, device, model_vocab_size)
        self.eot_id = json.loads((Path(data_dir) / META_FILE).read_text())["eot_id"]
        self.starts = np.load(self.path.with_suffix(".starts.npy"), allow_pickle=False)
        self.learned = np.load(self.path.with_suffix(".mask.npy"), allow_pickle=False)
        lengths = np.diff(self.starts)
        self.cut = int((lengths > block_size + 1).sum())  # examples whose end does not fit
        # Examples with a learned target inside the block (a prompt that fills it leaves nothing to learn).
        in_block = [self.learned[s + 1:s + min(n, block_size + 1)].any()
                    for s, n in zip(self.starts[:-1], lengths, strict=True)]
        self.examples = np.flatnonzero(np.asarray(in_block, dtype=bool))
        self.skipped = len(lengths) - len(self.examples)
        if not len(self.examples):
            raise UserError(f"no example of {self.path} has a response within block_size={block_size} tokens: "
                            "raise --block_size or shorten the prompts")
        self.num_starts = len(self.examples)  # what offsets() draws from

    def rows(self, examples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (len(examples), width) of these examples (their numbers in the split), padded to the longest
        rounded up to WIDTH_STEP (at most block_size tokens)."""
        tokens = np.memmap(self.path, dtype=self.header.dtype, mode="r", offset=HEADER.size)
        ends = np.minimum(self.starts[examples + 1], self.starts[examples] + self.block_size + 1)
        longest = int((ends - self.starts[examples]).max()) - 1
        width = min(-(-longest // WIDTH_STEP) * WIDTH_STEP, self.block_size)  # few shapes: compile, allocator
        x = np.full((len(examples), width), self.eot_id, dtype=np.int64)
        y = np.full((len(examples), width), -1, dtype=np.int64)
        for row, (e, end) in enumerate(zip(examples, ends, strict=True)):
            start, end = int(self.starts[e]), int(end)
            ids, learned = tokens[start:end].astype(np.int64), self.learned[start:end].astype(bool)
            x[row, :len(ids) - 1] = ids[:-1]
            y[row, :len(ids) - 1] = np.where(learned[1:], ids[1:], -1)
        del tokens
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def get_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows(self.examples[self.offsets(step, micro_step).astype(np.int64)])


@torch.no_grad()
def score_examples(model: torch.nn.Module, loader: ExampleLoader, tokenizer: Tokenizer,
                   autocast: Callable[[], AbstractContextManager], rank: int = 0, world: int = 1
                   ) -> tuple[float, int, int]:
    """(summed cross-entropy in nats, learned tokens, their UTF-8 bytes) over every example of the loader's
    split, each once (what a cut example keeps of its answers). Rank `rank` of `world` scores every world-th
    batch (the caller all-reduces); every rank runs as many forwards (FSDP2 all-gathers in each), a rank past
    the end scoring its last batch again, uncounted."""
    model.eval()
    total, count, size = 0.0, 0, 0
    first_rows = range(0, loader.num_starts, loader.batch_size)
    for j in range(-(-len(first_rows) // world)):
        i = j * world + rank
        first = first_rows[min(i, len(first_rows) - 1)]
        x, y = loader.rows(loader.examples[first:first + loader.batch_size])
        with autocast():
            ce = model(x, y).ce
        n = int((y != -1).sum())
        if i < len(first_rows) and n:
            total, count = total + ce.item() * n, count + n
            size += sum(document_bytes(row[row != -1].numpy(), tokenizer) for row in y.cpu())
    return total, count, size


def exact_match(run: str | Path, file: Path, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 24
                ) -> dict:
    """Each example of `file` without its last answer, wrapped in the run's template (nanoPALM's, for a run not
    trained on instructions), answered greedily up to end-of-text: the share whose answer equals the expected
    one, both stripped of surrounding whitespace."""
    from nanopalm.checkpoint import load_model_and_tokenizer
    from nanopalm.device import inference_precision, pick_device
    from nanopalm.sampling import generate

    started, examples = time.perf_counter(), read_examples(file)
    where = pick_device(device)
    model, tokenizer, checkpoint = load_model_and_tokenizer(run, where)
    precision = inference_precision(dtype, where)
    own = (checkpoint.run_dir / TEMPLATE_FILE).is_file()
    template = load_template(checkpoint.run_dir) if own else TEMPLATE
    correct, answers = 0, []
    with precision.autocast(where, for_generation=True):
        for messages in examples:
            *context, last = messages if messages[-1]["role"] == "assistant" else (*messages, None)
            if last is None:
                raise UserError(f"{file}: an example that does not end with an answer cannot be scored")
            ids = prompt_ids(context, tokenizer, template)[-max(1, model.config.block_size - max_new_tokens):]
            out = generate(model, torch.tensor([ids], device=where), max_new_tokens, temperature=0.0,
                           eot_id=tokenizer.eot_id, vocab_size=tokenizer.vocab_size)[0, len(ids):].tolist()
            answer = tokenizer.decode(out[:out.index(tokenizer.eot_id)] if tokenizer.eot_id in out else out).strip()
            correct += answer == last["content"].strip()
            answers.append({"expected": last["content"], "answer": answer})
    return {"run": str(checkpoint.run_dir), "checkpoint": str(checkpoint.path), "step": checkpoint.step,
            "file": str(file), "template": "the run's" if own else "nanoPALM's (the run has none)",
            "examples": len(examples), "exact_match": correct / len(examples), "correct": correct,
            "seconds": round(time.perf_counter() - started, 2), "answers": answers}
