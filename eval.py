"""Evaluate a trained model: every token of its val split (or train split, or your own text) in bits per byte,
or the lm-evaluation-harness's tasks. docs/EVAL.md has the details and the figures.

    python eval.py --out_dir=out-shakespeare           # the whole val split: loss, bits per byte, a JSON file
    python eval.py --out_dir=RUN --stride=128          # sliding windows: each token once, with more context
    python eval.py --out_dir=RUN --split=train         # or --data_files a.txt b.md (the run's tokenizer)
    python eval.py --out_dir=RUN --tasks=lambada_openai,hellaswag --num_fewshot=0 --limit=200  # the [eval] extra
    python eval.py --out_dir=RUN --instructions=val.jsonl    # greedy answers' exact match (docs/FINETUNE.md)

The weights come from the run's best checkpoint (or the checkpoint directory given). The result is also
written as JSON, by default to RUN/eval/<split, the files' names, or tasks>.json.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from nanopalm.errors import ArgumentParser, UserError, run_cli
from nanopalm.evaluate import evaluate_run, read_texts, write_json
from nanopalm.instruct import exact_match


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out-shakespeare",
                   help="the run to evaluate (or one checkpoint directory in it), as train.py and sample.py name it")
    text = p.add_argument_group("whole-split scoring (the default)")
    text.add_argument("--split", choices=("val", "train"), default=None, help="the split to score (default: val)")
    text.add_argument("--data_files", nargs="+", metavar="FILE", help="score these UTF-8 text files instead")
    text.add_argument("--dataset", default="", help="a prepared dataset (default: the one the run trained on)")
    text.add_argument("--stride", type=int, default=None,
                      help="sliding windows moved by this many tokens (default: disjoint windows of block_size); "
                           "also the harness's loglikelihood_rolling")
    tasks = p.add_argument_group("lm-evaluation-harness")
    tasks.add_argument("--tasks", default=None, help="comma-separated task names, e.g. lambada_openai,hellaswag")
    tasks.add_argument("--num_fewshot", type=int, default=None, help="examples in the prompt (default: the task's)")
    tasks.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    tasks.add_argument("--include_path", default=None, help="a directory of your own task YAML files")
    p.add_argument("--instructions", type=Path, default=None, metavar="FILE",
                   help="JSON lines of instruction or chat examples: the exact match of the greedy answers")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per forward")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="autocast precision; auto: bf16 on CUDA, float32 elsewhere")
    p.add_argument("--output", default=None, help="the JSON file to write (default: RUN/eval/<what>.json)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """Every flag checked before the model loads; returns the task names (empty: whole-split scoring)."""
    names = [name.strip() for name in (args.tasks or "").split(",") if name.strip()]
    if args.tasks is not None and not names:
        raise UserError("--tasks is empty: give task names separated by commas, e.g. --tasks hellaswag,piqa")
    if names and (args.split or args.data_files or args.dataset):
        raise UserError("--tasks runs the harness, --split/--data_files/--dataset score text: give one or the other")
    if not names and (args.num_fewshot is not None or args.limit is not None or args.include_path):
        raise UserError("--num_fewshot, --limit and --include_path go with --tasks")
    if args.instructions and (names or args.split or args.data_files or args.dataset or args.stride):
        raise UserError("--instructions scores answers on its own: drop --tasks, --split, --data_files, --dataset "
                        "and --stride")
    if args.split and args.data_files:
        raise UserError("--split scores the run's data, --data_files your files: give one of them")
    for flag, lowest in (("limit", 1), ("batch_size", 1), ("stride", 1), ("num_fewshot", 0)):
        value = getattr(args, flag)
        if value is not None and value < lowest:
            raise UserError(f"--{flag}={value} must be at least {lowest}")
    return names


def output_name(files: list[str]) -> str:
    """The JSON file's name for scored --data_files: their names, so that scoring other files writes another."""
    stems = [Path(f).stem for f in files]
    name = "+".join(stems)
    return name if len(name) <= 80 else f"{stems[0][:60]}+{len(stems) - 1}_more"


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    names = check_args(args)
    if args.instructions:
        result = exact_match(args.out_dir, args.instructions, args.device, args.dtype)
        print(f"exact match {result['exact_match']:.3f} ({result['correct']} of {result['examples']}), "
              f"{result['template']} template")
        what = f"instructions_{args.instructions.stem}"
    elif names:
        try:
            from nanopalm import harness
        except ImportError as e:
            raise UserError(f"--tasks needs the lm-evaluation-harness ({e}): pip install -e \".[eval]\"") from None
        manager = harness.task_manager(names, args.include_path)  # an unknown task fails before the model loads
        lm = harness.NanoPalmLM(run=args.out_dir, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                                stride=args.stride)
        result = {**lm.get_model_info(), **harness.run_tasks(lm, names, manager, args.num_fewshot, args.limit)}
        what = "tasks"
    else:
        texts = read_texts(args.data_files) if args.data_files else None
        result = evaluate_run(args.out_dir, args.split or "val", texts, args.dataset, args.stride, args.batch_size,
                              args.device, args.dtype)
        what = output_name(args.data_files) if texts else args.split or "val"
        if args.stride:
            what += f"_stride{args.stride}"
    result["command"] = shlex.join(["python", "eval.py", *argv])
    output = Path(args.output) if args.output else Path(result["run"]) / "eval" / f"{what}.json"
    write_json(output, result)
    print(f"wrote {output}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
