"""Adafactor's step before (the per-parameter loop of commit 46aace1) and after (multi-tensor, per matrix), on
the same model and gradients, interleaved with AdamW's; from the repository root:

    git show 46aace1:nanopalm/optim.py > /tmp/old_optim.py
    python scripts/adafactor_before_after.py /tmp/old_optim.py palm_20m 1     # OLD PRESET THREADS
"""

import statistics

import torch

from nanopalm.config import model_config
from nanopalm.errors import ArgumentParser, UserError, run_cli
from nanopalm.model import PaLM
from nanopalm.optim import OptimConfig, build_optimizer
from nanopalm.tools.bench import load_module, optimizer_step_seconds


def main(old_path: str, preset: str, threads: int) -> None:
    old = load_module(old_path, "old_optim")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = PaLM(model_config(preset))
    rows = []
    for _ in range(5):
        before = optimizer_step_seconds(model, old.PaLMAdafactor(list(model.parameters())), 3)
        after = optimizer_step_seconds(model, build_optimizer(model, OptimConfig(optimizer="adafactor"), "cpu"), 3)
        adamw = optimizer_step_seconds(model, build_optimizer(model, OptimConfig(optimizer="adamw"), "cpu"), 3)
        rows.append((before, after, adamw))
    print(f"{preset}: {model.num_params():,} parameters, {threads} thread(s), fp32 CPU; ms per optimizer.step(), "
          "medians of 3 steps, 5 interleaved rounds")
    for name, i in (("Adafactor before (per-parameter loop)", 0), ("Adafactor after (foreach, per matrix)", 1),
                    ("AdamW (foreach)", 2)):
        values = [1000 * r[i] for r in rows]
        print(f"{name}: median {statistics.median(values):.1f} ms (range {min(values):.1f}-{max(values):.1f})")
    ratios = [r[1] / r[0] for r in rows]
    print(f"after / before: median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")


def cli(argv: list[str]) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="the older optim.py (git show COMMIT:nanopalm/optim.py > PATH)")
    p.add_argument("preset", help="a model preset of config/, e.g. palm_20m")
    p.add_argument("threads", type=int, help="CPU threads")
    args = p.parse_args(argv)
    if args.threads < 1:
        raise UserError(f"threads={args.threads}: give at least 1")
    main(args.old, args.preset, args.threads)


if __name__ == "__main__":
    raise SystemExit(run_cli(cli))
