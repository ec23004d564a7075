"""The default run's recipe, measured: what `python train.py` should train in its few minutes on a CPU.

    python -m nanopalm.tools.recipes --doc docs/DEFAULT_RUN.md                 # every recipe, 2 seeds, 3 minutes
    python -m nanopalm.tools.recipes --only paper,paper+cooldown --minutes 1   # some of them

Every recipe is PaLM's architecture (Section 2: parallel blocks, multi-query attention, SwiGLU, RoPE, no
biases, shared embeddings) trained on the built-in Shakespeare corpus; they differ in shape, batch, context,
vocabulary, schedule, optimizer and dropout, each a set of train.py keys on top of PAPER, the recipe of the
paper (Section 5) at the size of the old default. Runs go through the ablation runner (nanopalm/tools/ablate.py:
a finished run is read back, a killed one resumes), one after another, budgeted by training time, and are
compared by bits per byte on the whole val split, which every vocabulary makes comparable.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from nanopalm.atomic import ensure_dir, write_atomic
from nanopalm.config import build_config, load_preset
from nanopalm.errors import ArgumentParser, UserError, run_cli
from nanopalm.tools.ablate import BASE_KEYS, plot, run_one, source_commit
from nanopalm.variants import param_count

# The old default (`config/shakespeare.json` before this study), every key pinned so that the study reruns the
# same whatever the preset says now: PaLM's recipe (Adafactor, lr 1e-2 then 1/sqrt(k), lr^2 decay, no dropout).
PAPER = dict(vocab_size=8192, block_size=256, n_layer=4, n_head=4, head_dim=64, d_model=256, d_ff=1024,
             batch_size=8, gradient_accumulation_steps=1, optimizer="adafactor", learning_rate=1e-2,
             lr_schedule="palm", palm_constant_steps=100, weight_decay_mode="lr_squared", cooldown=0.0, dropout=0.0)
WSD = dict(lr_schedule="constant", warmup_iters=0, cooldown=0.2)  # PaLM has no warmup (Section 5)
FAST = {**WSD, "learning_rate": 4e-2}

# name -> (what changes, in words; the keys on top of PAPER). Order: the schedule first, then the rest on the
# schedule the first stage chose.
RECIPES: dict[str, tuple[str, dict]] = {
    "paper": ("the paper's recipe at the old default's size", {}),
    "paper+cooldown": ("1/sqrt(k), the last 20% falling to 0", dict(cooldown=0.2)),
    "wsd": ("lr 1e-2 held, the last 20% falling to 0 (warmup-stable-decay)", WSD),
    "wsd-lr2e-2": ("wsd at lr 2e-2", {**WSD, "learning_rate": 2e-2}),
    "wsd-cooldown0.4": ("wsd, the last 40% falling", {**WSD, "cooldown": 0.4}),
    "wsd-lr4e-2": ("wsd at lr 4e-2", {**WSD, "learning_rate": 4e-2}),
    "wsd-lr8e-2": ("wsd at lr 8e-2", {**WSD, "learning_rate": 8e-2}),
    # Stage 2, on wsd at lr 4e-2 (the best lr when it began):
    "fast+batch16": ("wsd-lr4e-2, 16 sequences a step", {**FAST, "batch_size": 16}),
    "fast+vocab4k": ("wsd-lr4e-2, a 4,096-token vocabulary", {**FAST, "vocab_size": 4096}),
    "fast+6x192": ("wsd-lr4e-2, 6 layers of d_model 192", {**FAST, "n_layer": 6, "d_model": 192, "d_ff": 768,
                                                           "n_head": 3}),
    "fast+dropout0.1": ("wsd-lr4e-2 with dropout 0.1", {**FAST, "dropout": 0.1}),
    "fast+adamw": ("AdamW (lr 3e-3, decoupled decay 0.1) on the wsd schedule", {
        **FAST, "optimizer": "adamw", "learning_rate": 3e-3, "weight_decay_mode": "decoupled", "weight_decay": 0.1}),
    "fast+batch4": ("wsd-lr4e-2, 4 sequences a step", {**FAST, "batch_size": 4}),
    "fast+vocab16k": ("wsd-lr4e-2, a 16,384-token vocabulary", {**FAST, "vocab_size": 16384}),
    "fast+d192": ("wsd-lr4e-2, d_model 192 (3 heads of 64)", {**FAST, "d_model": 192, "d_ff": 768, "n_head": 3}),
    "fast+block128": ("wsd-lr4e-2, 16 x 128 tokens a step", {**FAST, "batch_size": 16, "block_size": 128}),
    # Stage 3: the two that helped most on the 256-wide model, together.
    "fast+d192+block128": ("fast+d192, 16 x 128 tokens a step", {
        **FAST, "d_model": 192, "d_ff": 768, "n_head": 3, "batch_size": 16, "block_size": 128}),
}


def dataset_for(vocab_size: int, data_root: Path) -> str:
    """The built-in corpus with a palm tokenizer of vocab_size tokens (8,192: the default's own dataset)."""
    if vocab_size == 8192:
        return "shakespeare"
    directory = data_root / f"shakespeare_{vocab_size}"
    if not (directory / "meta.json").is_file():
        from nanopalm.shakespeare import prepare

        prepare(directory, "palm", vocab_size)
    return str(directory)


def run_values(name: str, seed: int, out: Path, minutes: float) -> dict:
    """The flat config of one run: the shakespeare preset, PAPER, the recipe, the ablation runner's keys."""
    values = {**load_preset("shakespeare"), **PAPER, **RECIPES[name][1]}
    values["dataset"] = dataset_for(values["vocab_size"], out / "data")
    return {**values, **BASE_KEYS, "max_minutes": minutes, "seed": seed, "out_dir": str(out / name / f"seed{seed}")}


def report(done: list[tuple[str, dict, list[dict]]], command: str, machine: str, minutes: float) -> str:
    rows, paper, means, sds = [], None, {}, {}
    for name, values, results in done:
        bpbs = [r["val_bpb_full"] for r in results]
        mean, sd = statistics.mean(bpbs), statistics.stdev(bpbs) if len(bpbs) > 1 else 0.0
        means[name], sds[name] = mean, sd
        paper = mean if name == "paper" else paper
        delta = f"{mean - paper:+.4f}" if paper is not None and name != "paper" else ""
        model = build_config(values).model
        rows.append(f"| {name} | {RECIPES[name][0]} | {param_count(model):,} | "
                    f"{statistics.median(r['tokens_per_s'] for r in results):,.0f} | "
                    f"{statistics.mean(r['steps'] for r in results):,.0f} | {mean:.4f} +- {sd:.4f} | {delta} | "
                    f"{' '.join(f'{b:.4f}' for b in bpbs)} |")
    # A recipe whose mean is closer to the lowest than their two sds together is no measured difference.
    lowest = min(means, key=means.get)
    within = [n for n in means if n != lowest and means[n] - means[lowest] < sds[n] + sds[lowest]]
    tied = f"; within the seeds' spread of it (closer than the two sds together): {', '.join(within)}" if within else ""
    return "\n".join([
        "# The default run's recipe", "",
        "Generated by `nanopalm/tools/recipes.py` (finished runs are read back, not rerun):", "", f"    {command}", "",
        f"{machine}. Each run: {minutes:g} minutes of training (max_minutes; the evaluations every 50 steps count "
        "in it), then the whole val split scored; seeds one after another. Every recipe keeps PaLM's architecture "
        "(Section 2); `paper` is its training recipe (Section 5) at the old default's size. Val bpb: whole val "
        "split, mean +- sd over seeds, then each seed's.", "",
        "| recipe | what changes | params | tokens/s | steps | val bpb | vs paper | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---|", *rows, "",
        f"Lowest: **{lowest}**, {means[lowest]:.4f} bits per byte{tied}. The default run "
        "(`config/shakespeare.json`) is the lowest recipe; its own 8.5 minutes from a fresh clone, as a new user runs "
        "it: `scripts/default_run.sh` (output in `docs/results/default_run/`, figures in README.md).", "",
        "![val bpb against tokens and seconds](recipes/curves.png)", "",
        "Raw results: `docs/recipes/results.json` (per run: config, final whole-val bpb, tokens/s, the eval "
        "curve).", ""])


def parse_args(argv: list[str]):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], usage="python -m nanopalm.tools.recipes [options]")
    p.add_argument("--only", default="", help=f"comma-separated recipes (default: all: {', '.join(RECIPES)})")
    p.add_argument("--seeds", type=int, default=2, help="seeds per recipe")
    p.add_argument("--minutes", type=float, default=3.0, help="training minutes per run")
    p.add_argument("--out", type=Path, default=Path("runs/recipes"), help="run directories")
    p.add_argument("--doc", type=Path, default=None, help="the report (default: OUT/DEFAULT_RUN.md)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(RECIPES)
    if unknown := sorted(set(names) - set(RECIPES)):
        raise UserError(f"--only: no recipe {', '.join(unknown)}; the recipes: {', '.join(RECIPES)}")
    if args.seeds < 1 or args.minutes <= 0:
        raise UserError("--seeds must be >= 1 and --minutes > 0")
    args.names = names
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    ensure_dir(args.out, "--out")
    done, commit = [], source_commit()
    for name in args.names:
        runs = [run_values(name, seed, args.out, args.minutes) for seed in range(args.seeds)]
        results = []
        for values in runs:
            print(f"=== {name}, seed {values['seed']}", flush=True)
            results.append(run_one(values, commit))
        done.append((name, runs[0], results))
    doc = args.doc or args.out / "DEFAULT_RUN.md"
    folder = ensure_dir(doc.parent / "recipes", "--doc")
    write_atomic(folder / "results.json", json.dumps(
        {name: {"config": values, "runs": results} for name, values, results in done}, indent=1).encode())
    plot({name: [r["curve"] for r in results] for name, _, results in done}, folder / "curves.png")
    from nanopalm.device import pick_device, pick_precision
    from nanopalm.tools.bench import machine_name

    device = pick_device("auto")
    dtype = str(pick_precision("auto", device).dtype).removeprefix("torch.")
    machine = f"Measured on {machine_name(device)}, {dtype}, {time.strftime('%Y-%m-%d')}"
    write_atomic(doc, report(done, " ".join(["python -m nanopalm.tools.recipes", *argv]), machine,
                             args.minutes).encode())
    print(f"wrote {doc}, {folder / 'curves.png'} and {folder / 'results.json'}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
