"""Adafactor's step before (the per-parameter loop of commit 46aace1) and after (multi-tensor, per matrix), on
the same model and gradients, interleaved with AdamW's; from the repository root:

    git show 46aace1:nanopalm/optim.py > /tmp/old_optim.py
    python scripts/adafactor_before_after.py palm_20m 1     # PRESET THREADS
"""

import importlib.util
import statistics
import sys

import torch

from nanopalm.bench import optimizer_step_seconds
from nanopalm.config import model_config
from nanopalm.model import PaLM
from nanopalm.optim import OptimConfig, build_optimizer


def main(preset: str, threads: int) -> None:
    spec = importlib.util.spec_from_file_location("old_optim", "/tmp/old_optim.py")
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_optim"] = old
    spec.loader.exec_module(old)
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


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
