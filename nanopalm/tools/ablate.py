"""The paper's choices, measured: an ablation study you can rerun.

    python -m nanopalm.tools.ablate                 # the default: 10 variants x 2 seeds x 3 minutes on the CPU
    python -m nanopalm.tools.ablate --set both      # also GPT-2 plus each PaLM choice (18 variants)
    python -m nanopalm.tools.ablate --only palm,palm-rope --seeds 1 --minutes 1
    python -m nanopalm.tools.ablate --profile gpu   # a larger model and longer runs, for one GPU

Every PaLM choice is a switch (SWITCHES). From the PaLM default, `palm-X` flips switch X to GPT-2's choice;
from the GPT-2-style model, `gpt2+X` adds PaLM's choice X. Every variant holds the PaLM default's parameter
count within 2% by its width: d_model (and d_ff = 4 d_model) is the multiple of 2 whose count comes closest,
with depth, heads and head size unchanged (d_ff fine-tuned within 12.5% of 4 d_model where a step of d_model
is too coarse, in small models). All variants train on the same data, tokenizer and budget (a time
budget, --minutes, or a token budget, --tokens) for --seeds seeds each, one run after another. A finished run
is skipped; a killed one resumes from its checkpoint (its time budget counts the time already spent).
The results go to docs/ABLATIONS.md: one table (whole-val bits per byte, mean +- sd over seeds; tokens/s; time
to a given bpb; KV-cache bytes), the paper's claim beside each measurement, and a plot of val bpb against
tokens and against wall time (one line per variant, its seeds as a band).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from nanopalm.atomic import ensure_dir, write_atomic
from nanopalm.config import build_config, load_preset, parse_overrides
from nanopalm.errors import ArgumentParser, UserError, run_cli
from nanopalm.metrics import read_metrics
from nanopalm.variants import equal_size, param_count

# The two recipes, whatever the preset's recipe (the default's, docs/DEFAULT_RUN.md, has a cooldown): as studied.
ADAFACTOR = dict(optimizer="adafactor", learning_rate=1e-2, lr_schedule="palm", weight_decay_mode="lr_squared",
                 cooldown=0.0)
ADAMW = dict(optimizer="adamw", learning_rate=6e-3, min_lr=6e-4, lr_schedule="cosine", warmup_iters=20,
             weight_decay_mode="decoupled", weight_decay=0.1, cooldown=0.0)

# name -> (PaLM's choice, GPT-2's choice, what the paper says it is worth). The paper's words are quoted from
# Chowdhery et al. 2022 (PaLM), with the section.
SWITCHES: dict[str, tuple[dict, dict, str]] = {
    "parallel": ({"parallel_block": True}, {"parallel_block": False},
                 "Sec. 2: 'roughly 15% faster training speed at large scales'; 'small degradation in quality at 8B "
                 "scale but no degradation at 62B'"),
    "multi_query": ({"n_kv_head": 1}, {"n_kv_head": 0},  # 0: one K/V head per query head (set per variant)
                    "Sec. 2: 'a neutral effect on model quality and training speed' but 'a significant cost "
                    "savings at autoregressive decoding time'"),
    "swiglu": ({"mlp": "swiglu"}, {"mlp": "gelu"},
               "Sec. 2: 'significantly increase quality' (Shazeer 2020), at equal compute"),
    "rope": ({"pos_emb": "rope"}, {"pos_emb": "learned"},
             "Sec. 2: 'better performance on long sequence lengths' than absolute or relative embeddings"),
    "no_bias": ({"bias": False}, {"bias": True},
                "Sec. 2: no biases 'increased training stability for large models'"),
    "palm_init": ({"init": "palm", "logit_scale": True}, {"init": "gpt2", "logit_scale": False},
                  "Sec. 5: kernels N(0, 1/sqrt(n_in)), embeddings N(0, 1), logits scaled by 1/sqrt(n) because "
                  "the embeddings are shared; no claim of its worth"),
    "z_loss": ({"z_loss": 1e-4}, {"z_loss": 0.0},
               "Sec. 5: an auxiliary loss 'to increase the stability of training'"),
    "adafactor": (ADAFACTOR, ADAMW,
                  "Sec. 5: Adafactor without factorization, 'effectively equivalent to Adam with parameter "
                  "scaling'; 1e-2 then 1/sqrt(k), lr^2 decay"),
}
PROFILES = {  # the model and budget of each profile; keys of `python train.py --help`
    # A 3-minute run costs about 4 minutes with its evaluations and the final whole-val score: 10 variants
    # x 2 seeds fit in about 80 minutes on 2 CPU cores (3 seeds would take 2 hours).
    # cpu: the model the study measured, the default run's before docs/DEFAULT_RUN.md made it smaller
    "cpu": dict(preset="shakespeare", minutes=3.0, seeds=2,
                overrides={"n_head": 4, "d_model": 256, "d_ff": 1024, "palm_constant_steps": 100}),
    "gpu": dict(preset="shakespeare", minutes=20.0, seeds=3,
                overrides={"n_layer": 8, "d_model": 512, "n_head": 8, "head_dim": 64, "block_size": 512,
                           "batch_size": 32, "palm_constant_steps": 1000}),
}
BASE_KEYS = {"eval_interval": 50, "log_interval": 10, "sample_tokens": 0, "max_iters": 10**9, "resume": True}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    switch: str | None  # the switch flipped (None: a base model)
    values: dict  # the config keys that make it


def variants(which: str) -> list[Variant]:
    """palm, gpt2, then palm-X for every switch ('palm'), gpt2+X ('gpt2') or both."""
    palm = {k: v for choice, _, _ in SWITCHES.values() for k, v in choice.items()}
    gpt2 = {k: v for _, choice, _ in SWITCHES.values() for k, v in choice.items()}
    out = [Variant("palm", None, palm), Variant("gpt2", None, gpt2)]
    if which in ("palm", "both"):
        out += [Variant(f"palm-{name}", name, {**palm, **choice}) for name, (_, choice, _) in SWITCHES.items()]
    if which in ("gpt2", "both"):
        out += [Variant(f"gpt2+{name}", name, {**gpt2, **choice}) for name, (choice, _, _) in SWITCHES.items()]
    return out


def run_values(variant: Variant, base: dict, seed: int, out: Path, budget: dict) -> dict:
    """The flat config of one run: the base preset, the variant's switches at equal size, the budget."""
    values = {**base, **variant.values, **BASE_KEYS, **budget, "seed": seed, "out_dir": str(out)}
    if values.get("n_kv_head") == 0:
        values["n_kv_head"] = values["n_head"]
    base_model = build_config({k: v for k, v in base.items()}).model
    model = build_config(values).model
    sized = equal_size(model, param_count(base_model)) if variant.name != "palm" else model
    return {**values, "d_model": sized.d_model, "d_ff": sized.d_ff}


# What each claim predicts, where our measurement can test it: (quality, training speed), each "better",
# "worse", "neutral" or None (no claim). Quality: lower val bpb; speed: tokens/s.
EXPECTED = {"parallel": ("worse", "better"), "multi_query": ("neutral", "neutral"), "swiglu": ("better", None),
            "rope": ("better", None), "no_bias": (None, None), "palm_init": (None, None), "z_loss": (None, None),
            "adafactor": (None, None)}


def source_commit() -> str | None:
    """The code that runs, as `git describe --always --dirty` names it (a commit, "-dirty" when tracked files
    have changed since), or None outside a git checkout. Read once when the study starts, the code it loaded:
    each run records it, the report lists them."""
    try:
        found = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip() if found.returncode == 0 else None


def code_line(plan: list[tuple[Variant, dict, list[dict]]]) -> str:
    """The report's sentence on which code the runs used, with how many runs each (older runs have none)."""
    counts = Counter(run.get("commit") or "not recorded" for _, _, runs in plan for run in runs)
    return "Code: " + ", ".join(f"{name} ({n} run{'s' if n > 1 else ''})" for name, n in counts.most_common()) + "."


def run_one(values: dict, commit: str | None) -> dict:
    """Train one run (or finish a killed one) and summarise it, with the commit of the code that trained it; a
    finished run is read back, not retrained."""
    from nanopalm.trainer import train  # the trainer imports torch's distributed and compile machinery

    out = Path(values["out_dir"])
    done = out / "ablation.json"
    if done.is_file():
        return json.loads(done.read_text())
    started = time.perf_counter()
    train(build_config(values))
    rows = read_metrics(out)
    evals = [r for r in rows if "val_bpb" in r]
    full = [r for r in rows if "val_bpb_full" in r]
    if not full:
        raise UserError(f"{out}: the run ended without a whole-val score; raise --full_val_tokens")
    result = {
        "val_bpb_full": full[-1]["val_bpb_full"],
        "steps": evals[-1]["step"], "tokens": evals[-1]["tokens"], "seconds": evals[-1]["seconds"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r),
        "curve": [(r["tokens"], r["seconds"], r["val_bpb"]) for r in evals],
        "wall_s": time.perf_counter() - started,
        "commit": commit,
    }
    write_atomic(done, json.dumps(result).encode())
    return result


def common_tokens(plan: list[tuple[Variant, dict, list[dict]]]) -> int:
    """The most tokens at which every run of the plan was evaluated (the curves' shared point furthest on)."""
    shared = set.intersection(*({t for t, _, _ in r["curve"] if t > 0} for _, _, results in plan for r in results))
    return max(shared, default=0)


def summarize(results: list[dict], target_bpb: float, at_tokens: int) -> dict:
    """Over the seeds: whole-val bpb at the end of the budget (mean, sd), the val estimate at `at_tokens`
    tokens (mean, sd), tokens/s (median and relative sd), median seconds to reach target_bpb."""
    def mean_sd(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    bpb, sd = mean_sd([r["val_bpb_full"] for r in results])
    at, sd_at = mean_sd([next(b for t, _, b in r["curve"] if t == at_tokens) for r in results]) if at_tokens else (
        float("nan"), 0.0)
    speeds = [r["tokens_per_s"] for r in results]
    reached = [next((s for _, s, b in r["curve"] if b <= target_bpb), None) for r in results]
    reached = [s for s in reached if s is not None]
    return {"bpb": bpb, "sd": sd, "bpb_at": at, "sd_at": sd_at, "seeds": len(results),
            "tokens_per_s": statistics.median(speeds), "speed_sd": mean_sd(speeds)[1] / statistics.mean(speeds),
            "time_to_target": statistics.median(reached) if len(reached) == len(results) else None}


def verdict(expected: str | None, delta: float, noise: float, better_if_negative: bool) -> str:
    """Compare a claim ("better", "worse", "neutral") with a measured effect of PaLM's choice."""
    if expected is None:
        return "no claim to test"
    effect = "neutral" if abs(delta) <= noise else ("better" if (delta < 0) == better_if_negative else "worse")
    if effect == expected:
        return "agrees"
    return f"differs: {'within noise' if effect == 'neutral' else 'measured ' + effect}"


def plot(curves: dict[str, list[list[dict]]], path: Path) -> None:
    """val bpb against tokens and against seconds, one line a variant (the seeds' mean), its seeds as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for i, (name, runs) in enumerate(curves.items()):
        steps = min(len(r) for r in runs)  # a time budget ends the seeds at slightly different steps
        for ax, column, label in ((axes[0], 0, "tokens seen"), (axes[1], 1, "training seconds")):
            x = [statistics.mean(r[k][column] for r in runs) for k in range(steps)]
            ys = [[r[k][2] for r in runs] for k in range(steps)]
            ax.plot(x, [statistics.mean(y) for y in ys], color=f"C{i % 10}", label=name,
                    linestyle="-" if name.startswith("palm") else "--")
            ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=f"C{i % 10}", alpha=0.15)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
    axes[0].set_ylabel("val bits per byte (eval batches)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, image.getvalue())


def report(plan: list[tuple[Variant, dict, list[dict]]], args, command: str, machine: str) -> str:
    """docs/ABLATIONS.md: the table, the paper's claims beside the measurements, the command."""
    at_tokens = common_tokens(plan)
    stats = {v.name: summarize(results, args.target_bpb, at_tokens) for v, _, results in plan}
    models = {v.name: build_config(values).model for v, values, _ in plan}
    sizes = {name: (param_count(model), model) for name, model in models.items()}
    palm = stats.get("palm")
    lines = [
        "# Ablations: what each PaLM choice is worth at this scale", "",
        "Generated by `nanopalm/tools/ablate.py`; rerun it to check or to extend it (finished runs are skipped):", "",
        f"    {command}", "",
        f"{machine}. {code_line(plan)} Budget per run: {args.budget_text}; {args.seeds} seeds a variant, one run "
        "after another. "
        f"Model: the PaLM of `{args.preset}`{', with ' + args.profile_text if args.profile_text else ''} "
        "and every variant at its parameter count (within 2%, by width: d_model with d_ff = 4 d_model, then d_ff "
        "alone within 12.5% of that where a step of d_model is too coarse; depth, heads and head size "
        "unchanged: `nanopalm.variants.equal_size`; the `gpt2` base is `variants.equal_size_gpt2`, the very model "
        "`python bench.py --compare` times in BENCHMARKS.md). Two qualities, mean +- sd over seeds: **at equal "
        "tokens**, the val estimate (the same "
        f"fixed val batches for every run) after {at_tokens:,} tokens, the most that every run reached, which "
        "measures the choice itself; and **in the time budget**, the whole val split at the end of each run "
        "(`val_bpb_full`), which also counts how many steps a run got: on a shared machine that varies with the "
        f"load (tokens/s of identical models differ by 10-20% here; `python bench.py --compare`, which times "
        f"models in turns in one process, is the speed measure to trust). Time to {args.target_bpb:.3f} bpb: median "
        "over seeds of the training seconds until an evaluation first reaches it (-: not every seed did). KV "
        "cache: bytes a sequence at the full context, fp32.", "",
        f"| variant | PaLM choice flipped or added | params | d_model | val bpb at {at_tokens:,} tokens | vs palm | "
        f"val bpb in the budget | vs palm | tokens/s | time to {args.target_bpb:.3f} | KV cache |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, _, _ in plan:
        s, (params, model) = stats[v.name], sizes[v.name]
        vs = palm is not None and v.name != "palm"
        delta_at = f"{s['bpb_at'] - palm['bpb_at']:+.4f}" if vs else ""
        delta = f"{s['bpb'] - palm['bpb']:+.4f}" if vs else ""
        reach = f"{s['time_to_target']:.0f} s" if s["time_to_target"] is not None else "-"
        lines.append(f"| {v.name} | {v.switch or 'base'} | {params:,} | {model.d_model} | {s['bpb_at']:.4f} +- "
                     f"{s['sd_at']:.4f} | {delta_at} | {s['bpb']:.4f} +- {s['sd']:.4f} | {delta} | "
                     f"{s['tokens_per_s']:,.0f} | {reach} | {model.kv_cache_bytes():,} |")
    lines += ["", "## The paper's claims beside ours", "",
              f"The effect of PaLM's choice: bpb at {at_tokens:,} tokens with it minus without it (negative: better), "
              "and tokens/s with it over tokens/s without it (above 1: faster), from `palm` against `palm-X` and, "
              "where run, `gpt2+X` against `gpt2` (the two given as a / b). A difference counts as an effect when "
              "it exceeds twice the larger of the two variants' seed sd (bpb), or twice the larger relative sd of "
              "their seeds' tokens/s and at least 3% (speed).", "",
              "| choice | the paper says | bpb effect | speed effect | quality | speed |",
              "|---|---|---:|---:|---|---|"]
    for name, (_, _, claim) in SWITCHES.items():
        pairs = [(f"palm-{name}", "palm"), ("gpt2", f"gpt2+{name}")]
        pairs = [(without, with_) for without, with_ in pairs if without in stats and with_ in stats]
        if not pairs:
            continue
        bpb = [stats[w]["bpb_at"] - stats[without]["bpb_at"] for without, w in pairs]
        noise = [2 * max(stats[w]["sd_at"], stats[without]["sd_at"]) for without, w in pairs]
        speed = [stats[w]["tokens_per_s"] / stats[without]["tokens_per_s"] for without, w in pairs]
        speed_noise = max([0.03] + [2 * max(stats[w]["speed_sd"], stats[without]["speed_sd"]) for without, w in pairs])
        quality_claim, speed_claim = EXPECTED[name]
        lines.append(f"| {name} | {claim} | {' / '.join(f'{d:+.4f}' for d in bpb)} | "
                     f"{' / '.join(f'{r:.2f}x' for r in speed)} | "
                     f"{verdict(quality_claim, statistics.mean(bpb), max(noise), better_if_negative=True)} | "
                     f"{verdict(speed_claim, statistics.mean(speed) - 1, speed_noise, better_if_negative=False)} |")
    lines += ["", f"![val bpb against tokens and seconds](ablations/{args.plot_name})", "",
              f"Raw results: `docs/ablations/{args.results_name}` (per run: final whole-val bpb, tokens/s, the "
              "eval curve).", ""]
    return "\n".join(lines)


def parse_args(argv: list[str]):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       usage="python -m nanopalm.tools.ablate [options] [--key=value ...]")
    p.add_argument("--profile", choices=tuple(PROFILES), default="cpu", help="model and budget defaults")
    p.add_argument("--preset", default=None, help="the base run (a preset or JSON file; default: the profile's)")
    p.add_argument("--set", choices=("palm", "gpt2", "both"), default="palm",
                   help="palm: PaLM minus each choice; gpt2: GPT-2 plus each; both (the bases always run)")
    p.add_argument("--only", default="", help="comma-separated variant names (default: all of --set)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the profile's)")
    p.add_argument("--minutes", type=float, default=None, help="training minutes per run (default: the profile's)")
    p.add_argument("--tokens", type=int, default=0, help="a token budget per run instead of --minutes")
    p.add_argument("--target_bpb", type=float, default=0.0,
                   help="the bpb for 'time to reach' (0: the worst variant's final eval bpb)")
    p.add_argument("--out", type=Path, default=Path("runs/ablate"), help="run directories")
    p.add_argument("--doc", type=Path, default=None,
                   help="the report to write (default: OUT/ABLATIONS.md, beside the runs; the repository's own "
                        "report is written with --doc docs/ABLATIONS.md)")
    p.add_argument("--dry_run", action="store_true", help="print the plan (variants, sizes) and stop")
    args, extra = p.parse_known_args(argv)
    profile = PROFILES[args.profile]
    args.preset = args.preset or profile["preset"]
    args.doc = args.doc or args.out / "ABLATIONS.md"  # a user's first study must not overwrite the repository's
    args.seeds = profile["seeds"] if args.seeds is None else args.seeds
    args.minutes = profile["minutes"] if args.minutes is None else args.minutes
    if args.seeds < 1 or args.minutes <= 0 or args.tokens < 0:
        raise UserError("--seeds must be >= 1, --minutes > 0 and --tokens >= 0")
    args.overrides = {**profile["overrides"], **parse_overrides(extra)}
    args.profile_text = ", ".join(f"{k}={v}" for k, v in args.overrides.items())
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    base = {**load_preset(args.preset), **args.overrides}
    train_cfg = build_config(base).train
    if args.tokens:
        per_step = train_cfg.batch_size * train_cfg.gradient_accumulation_steps * build_config(base).model.block_size
        budget = {"max_iters": math.ceil(args.tokens / per_step), "max_minutes": 0.0}
        args.budget_text = f"{args.tokens:,} tokens"
    else:
        budget, args.budget_text = {"max_minutes": args.minutes}, f"{args.minutes:g} minutes of training"
    chosen = variants(args.set)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {v.name for v in variants("both")})
        if unknown:
            raise UserError(f"--only: no variant {', '.join(unknown)}; the variants: "
                            f"{', '.join(v.name for v in variants('both'))}")
        chosen = [v for v in variants("both") if v.name in names]
    ensure_dir(args.out, "--out")
    plan = [(v, [run_values(v, base, seed, args.out / v.name / f"seed{seed}", budget) for seed in range(args.seeds)])
            for v in chosen]
    for v, runs in plan:
        model = build_config(runs[0]).model
        print(f"{v.name:22s} {param_count(model):>12,} parameters, d_model {model.d_model}", flush=True)
    if args.dry_run:
        return
    done, commit = [], source_commit()
    for v, runs in plan:
        results = []
        for values in runs:
            print(f"=== {v.name}, seed {values['seed']}", flush=True)
            results.append(run_one(values, commit))
        done.append((v, runs[0], results))
    write_results(done, args, argv)


def write_results(done: list[tuple[Variant, dict, list[dict]]], args, argv: list[str]) -> None:
    from nanopalm.device import pick_device, pick_precision
    from nanopalm.tools.bench import machine_name

    if not args.target_bpb:
        args.target_bpb = max(statistics.mean(r["curve"][-1][2] for r in results) for _, _, results in done)
    device = pick_device(build_config(done[0][1]).train.device)
    dtype = str(pick_precision(build_config(done[0][1]).train.dtype, device).dtype).removeprefix("torch.")
    machine = f"Measured on {machine_name(device)}, {dtype}, {time.strftime('%Y-%m-%d')}"
    folder = ensure_dir(args.doc.parent / "ablations", "--doc")
    args.plot_name, args.results_name = "curves.png", "results.json"
    write_atomic(folder / args.results_name, json.dumps(
        {v.name: {"switch": v.switch, "config": values, "runs": results} for v, values, results in done},
        indent=1).encode())
    plot({v.name: [r["curve"] for r in results] for v, _, results in done}, folder / args.plot_name)
    command = " ".join(["python -m nanopalm.tools.ablate", *argv])
    write_atomic(args.doc, report(done, args, command, machine).encode())
    print(f"wrote {args.doc}, {folder / args.plot_name} and {folder / args.results_name}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
