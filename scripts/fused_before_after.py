"""nanopalm/fused.py before and after a change, on full training steps of one model, interleaved in one
process: the old file for both fused functions, this tree's output layer with the old projection, and this
tree's file for both. From the repository root:

    git show 2a8de46~1:nanopalm/fused.py > /tmp/old_fused.py
    python scripts/fused_before_after.py /tmp/old_fused.py palm_6m 1 30 cpu    # OLD PRESET THREADS ROUNDS CLOCK

Each round times one step of each variant, in an order reversed every round, on the same model, optimizer and
batch (nanopalm.tools.bench.make_train_bench); it prints the median step and the median of the per-round ratios
(old / variant), which a change in the machine's load between rounds cancels out of, with its interval.
Before any step all variants must give the same loss on the batch (to fp32 rounding); then each takes one
untimed step.
"""

import statistics

import torch

import nanopalm.model as model_module
from nanopalm import fused
from nanopalm.config import model_config
from nanopalm.errors import ArgumentParser, UserError, run_cli
from nanopalm.tools.bench import CLOCKS, describe_ratios, load_module, make_train_bench


def main(old_path: str, preset: str, threads: int, rounds: int, clock_name: str = "wall") -> dict[str, list[float]]:
    old = load_module(old_path, "old_fused")
    torch.set_num_threads(threads)
    variants = {  # model.py calls these two names; each variant sets them before its step
        "before": (old.linear_cross_entropy, old.split_projection),
        "after: output layer": (fused.linear_cross_entropy, old.split_projection),
        "after": (fused.linear_cross_entropy, fused.split_projection),
    }
    bench = make_train_bench(preset, model_config(preset), 8, torch.device("cpu"), torch.float32, False)
    clock = CLOCKS[clock_name]
    this_tree = model_module.linear_cross_entropy, model_module.split_projection
    try:
        times = _time_variants(variants, bench, clock, rounds)
    finally:  # model.py calls this tree's functions again
        model_module.linear_cross_entropy, model_module.split_projection = this_tree
    names = list(variants)
    print(f"{preset}, {threads} thread(s), fp32 CPU, {rounds} rounds, {clock_name} clock; ms per training step")
    for name in names:
        ratios = [a / b for a, b in zip(times["before"], times[name], strict=True)]
        print(f"{name}: median {statistics.median(times[name]):.1f} ms; before / this, per round: "
              f"{describe_ratios(ratios, 3)}")
    return times


def _time_variants(variants: dict, bench, clock, rounds: int) -> dict[str, list[float]]:
    """Milliseconds of each variant's steps, one a round, in turns."""

    def use(name: str) -> None:
        model_module.linear_cross_entropy, model_module.split_projection = variants[name]

    def step(name: str) -> float:
        use(name)
        start = clock()
        bench.step()
        return clock() - start

    losses = {}
    for name in variants:  # the same weights: the same loss from every variant
        use(name)
        with torch.no_grad():
            losses[name] = bench.model(bench.x, bench.y).loss.item()
    for name in variants:  # untimed warm-up
        step(name)
    first = next(iter(losses.values()))
    if any(abs(loss - first) > 1e-5 * abs(first) for loss in losses.values()):
        raise SystemExit(f"the variants disagree on the loss: {losses}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(1000 * step(name))
    return times


def cli(argv: list[str]) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="the older fused.py (git show COMMIT:nanopalm/fused.py > PATH)")
    p.add_argument("preset", help="a model preset of config/, e.g. shakespeare")
    p.add_argument("threads", type=int, help="CPU threads")
    p.add_argument("rounds", type=int, help="rounds of one step per variant")
    p.add_argument("clock", nargs="?", default="wall", choices=sorted(CLOCKS), help="wall (default) or cpu")
    args = p.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        raise UserError(f"threads={args.threads}, rounds={args.rounds}: both must be at least 1")
    main(args.old, args.preset, args.threads, args.rounds, args.clock)


if __name__ == "__main__":
    raise SystemExit(run_cli(cli))
