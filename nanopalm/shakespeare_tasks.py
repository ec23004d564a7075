"""Two lm-evaluation-harness tasks made from the built-in Shakespeare corpus, for models trained on it (the
hub's English tasks mean little to them, and need the hub). They are written as task YAML files and JSON
lines into a directory, and run offline:

    python -m nanopalm.shakespeare_tasks tasks/ --docs 500
    python -m nanopalm.shakespeare_tasks data/speaker --instructions   # the speaker task for finetuning
    python eval.py --out_dir=out-shakespeare --tasks=shakespeare_next_line,shakespeare_speaker --include_path=tasks/

shakespeare_next_line  multiple choice (acc, acc_norm): a few lines of a scene; which of four lines comes
                       next? The three others are lines of other scenes: chance is 25%.
shakespeare_speaker    generation (exact_match): a scene up to the blank line before a speech; the greedy
                       continuation, cut at ":", must be the speaker's name.
The documents scored come from val scenes (never trained on), the few-shot examples (--num_fewshot) from
train scenes. The same seed and corpus give the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from nanopalm.atomic import write_atomic
from nanopalm.errors import ArgumentParser, UserError, run_cli
from nanopalm.shakespeare import load_passages, split_passages

NEXT_LINE, SPEAKER = "shakespeare_next_line", "shakespeare_speaker"
CONTEXT_LINES = 6  # lines of the scene before the line to choose
CONTEXT_SPEECHES = 2  # speeches before the one whose speaker is asked for
DECOYS = 3


def speeches(passage: str) -> list[tuple[str, list[str]]]:
    """A scene's speeches as (speaker, lines): shakespeare.scenes writes them `SPEAKER:` + lines, blank-separated."""
    out = []
    for block in passage.strip("\n").split("\n\n"):
        header, *lines = block.split("\n")
        out.append((header.removesuffix(":"), lines))
    return out


def next_line_docs(passages: list[str], count: int, rng: random.Random) -> list[dict]:
    """Lines that continue a speech, with the scene before them, and decoy lines from other scenes."""
    candidates = []  # (scene, line index in the scene's text lines)
    for p, passage in enumerate(passages):
        lines = passage.split("\n")
        candidates += [(p, i) for i in range(1, len(lines)) if lines[i] and lines[i - 1] and ":" != lines[i - 1][-1:]]
    docs = []
    for p, i in rng.sample(candidates, min(count, len(candidates))):
        lines = passages[p].split("\n")
        decoys = []
        while len(decoys) < DECOYS:
            q, j = rng.choice(candidates)
            line = passages[q].split("\n")[j]
            if q != p and line != lines[i] and line not in decoys:
                decoys.append(line)
        choices = [lines[i], *decoys]
        rng.shuffle(choices)
        context = "\n".join(lines[max(0, i - CONTEXT_LINES):i]) + "\n"
        docs.append({"context": context, "choices": choices, "label": choices.index(lines[i])})
    return docs


def speaker_docs(passages: list[str], count: int, rng: random.Random) -> list[dict]:
    """Speeches after at least CONTEXT_SPEECHES others, with those speeches before them."""
    candidates = [(p, k) for p, passage in enumerate(passages) for k in range(CONTEXT_SPEECHES, len(speeches(passage)))]
    docs = []
    for p, k in rng.sample(candidates, min(count, len(candidates))):
        scene = speeches(passages[p])
        before = "\n\n".join(f"{name}:\n" + "\n".join(lines) for name, lines in scene[k - CONTEXT_SPEECHES:k])
        docs.append({"context": before + "\n\n", "speaker": scene[k][0]})
    return docs


QUESTION = "Who speaks next?"


def write_speaker_instructions(directory: str | Path, docs: int = 500, seed: int = 0) -> tuple[Path, Path]:
    """The speaker task as instruction data (docs/FINETUNE.md): two speeches of a scene, then QUESTION, answered
    by the next speaker's name. Every such speech of the train scenes for train, `docs` of the val scenes for
    val (never trained on). Returns the two JSON-lines files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written, answers = [], {}
    for split, passages in zip(("train", "val"), split_passages(load_passages()), strict=True):
        count = 10 ** 9 if split == "train" else docs
        rows = [{"prompt": d["context"].rstrip("\n") + "\n\n" + QUESTION, "response": d["speaker"]}
                for d in speaker_docs(passages, count, random.Random(f"{seed}/instructions/{split}"))]
        written.append(directory / f"speaker.{split}.jsonl")
        write_atomic(written[-1], "".join(json.dumps(r) + "\n" for r in rows).encode())
        answers[split] = rows
    val = answers["val"]
    majority = Counter(r["response"] for r in answers["train"]).most_common(1)[0][0]
    names = {r["response"] for r in val}
    two_back = sum(r["prompt"].split(":\n", 1)[0] == r["response"] for r in val)  # the first of the two speakers
    print(f"val: {len(val)} questions, {len(names)} different answers. Baselines: chance (one of those names at "
          f"random) {1 / len(names):.4f}; majority (always {majority}, the train set's most frequent) "
          f"{sum(r['response'] == majority for r in val) / len(val):.3f}; the speaker two speeches back (the first "
          f"speech's) {two_back / len(val):.3f}")
    return written[0], written[1]


def metric(name: str) -> dict:
    return {"metric": name, "aggregation": "mean", "higher_is_better": True}


def task_config(name: str, directory: Path, fields: dict) -> dict:
    files = {split: str(directory / f"{name}.{split}.jsonl") for split in ("train", "test")}
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
            "training_split": "train", "test_split": "test", "fewshot_split": "train",
            "target_delimiter": "", "metadata": {"version": 1.0}, **fields}


def write_tasks(directory: str | Path, docs: int = 500, seed: int = 0) -> list[str]:
    """Write both tasks (YAML, and JSON lines of `docs` test documents each) into `directory`; their names."""
    if docs < 1:
        raise UserError(f"--docs {docs} must be a positive integer")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    splits = dict(zip(("train", "test"), split_passages(load_passages()), strict=True))
    shots = min(docs, 100)  # few-shot examples to draw from
    configs = {
        NEXT_LINE: ({"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                     "doc_to_target": "label", "metric_list": [metric("acc"), metric("acc_norm")]},
                    next_line_docs),
        SPEAKER: ({"output_type": "generate_until", "doc_to_text": "context", "doc_to_target": "speaker",
                   "generation_kwargs": {"until": [":", "\n"], "max_gen_toks": 24, "do_sample": False},
                   "metric_list": [metric("exact_match")]},
                  speaker_docs),
    }
    for name, (fields, make_docs) in configs.items():
        for split, count in (("train", shots), ("test", docs)):
            rows = make_docs(splits[split], count, random.Random(f"{seed}/{name}/{split}"))
            write_atomic(directory / f"{name}.{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        # JSON is YAML: no quoting questions for the stop strings
        write_atomic(directory / f"{name}.yaml", json.dumps(task_config(name, directory, fields), indent=2).encode())
    return list(configs)


def main(argv: list[str]) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", help="where to write the task files")
    p.add_argument("--docs", type=int, default=500, help="test documents per task")
    p.add_argument("--seed", type=int, default=0, help="which lines and speeches are drawn")
    p.add_argument("--instructions", action="store_true",
                   help="write the speaker task as instruction data instead (speaker.train/val.jsonl)")
    args = p.parse_args(argv)
    if args.instructions:
        train, val = write_speaker_instructions(args.directory, args.docs, args.seed)
        print(f"wrote {train} and {val}: python data/instruct/prepare.py --train_file={train} --val_file={val} ...")
        return
    names = write_tasks(args.directory, args.docs, args.seed)
    print(f"wrote {', '.join(names)} into {args.directory}: python eval.py --out_dir=RUN --tasks={','.join(names)} "
          f"--include_path {args.directory}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
