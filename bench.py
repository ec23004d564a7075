"""Benchmarks, printed as Markdown tables for docs/BENCHMARKS.md.

    python bench.py                                     # training: the default run's model (preset shakespeare)
    python bench.py --compare                           # ... against the GPT-2 architecture of the same size
    python bench.py --preset palm_350m --block_size=2048 --batch_size 8 --device cuda --compile false true
    python bench.py generation                          # palm_20m, 256 and 1024 tokens of context
    python bench.py generation --contexts 512 --device=cuda --new_tokens=64
    python bench.py memory                              # one training step's peak, vocabulary 8192 and 256k

All take a preset (a model-shape or run preset from config/, or a JSON file) and any model key of
`python train.py --help` as --key=value.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics

import torch

from nanopalm.bench import (
    CLOCKS,
    generation_speed,
    interleave,
    machine_name,
    make_train_bench,
    matmul_flops,
    op_profile,
)
from nanopalm.config import load_preset, model_config, parse_overrides
from nanopalm.device import pick_device, pick_precision
from nanopalm.errors import ArgumentParser, UserError, run_cli
from nanopalm.metrics import gpu_peak_flops, mfu
from nanopalm.model import PaLM, PaLMConfig
from nanopalm.variants import equal_size_gpt2


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare", help="a preset from config/ or a JSON file")
    p.add_argument("--compare", action="store_true", help="also time the GPT-2 architecture of the same size")
    p.add_argument("--batch_size", type=int, default=0, help="sequences per step (0 = the preset's, else 8)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat (their median counts)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the first repeat")
    p.add_argument("--repeats", type=int, default=5, help="rounds over the models; medians are reported")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: float32 on CPU (the targets' precision), bf16/fp16 autocast on CUDA")
    p.add_argument("--compile", nargs="+", default=["false"], choices=("false", "true"),
                   help="torch.compile off and/or on: 'false true' times both")
    p.add_argument("--peak_flops", type=float, default=0.0,
                   help="peak FLOP/s for MFU (0 = the GPU's datasheet, else a matmul measured here)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS steps of each model (torch.profiler): the top operators' time per step")
    p.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                   help="wall, or (CPU) this process's CPU time: on a shared machine, without the waits for a core")
    sub = p.add_subparsers(dest="what")
    g = sub.add_parser("generation", help="tokens/s with and without the KV cache")
    g.add_argument("--preset", default="palm_20m", help="a preset from config/ or a JSON file")
    g.add_argument("--block_size", type=int, default=2048, help="context window of the benchmarked model")
    g.add_argument("--contexts", type=int, nargs="+", default=[256, 1024], help="prompt lengths to time")
    g.add_argument("--new_tokens", type=int, default=16, help="tokens generated per timing")
    g.add_argument("--repeats", type=int, default=3, help="timings per number; the median is reported")
    g.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    m = sub.add_parser("memory", help="peak memory of one training step, chunked output layer and full logits")
    m.add_argument("--preset", default="tiny", help="a preset from config/ or a JSON file (its shape, less vocabulary)")
    m.add_argument("--block_size", type=int, default=2048, help="context length of the benchmarked model")
    m.add_argument("--vocab_sizes", type=int, nargs="+", default=[8192, 262144], help="vocabularies to measure")
    m.add_argument("--batch_size", type=int, default=1, help="sequences per step")
    m.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    args, extra = p.parse_known_args(argv)
    overrides = parse_overrides(extra)  # --key=value model keys
    if args.what in ("generation", "memory"):
        overrides.setdefault("block_size", args.block_size)
    if args.what == "memory" and args.batch_size < 1:
        raise UserError("--batch_size must be >= 1")
    if args.what is None and (min(args.steps, args.repeats) < 1 or min(args.warmup, args.batch_size, args.profile) < 0):
        raise UserError("--steps and --repeats must be >= 1, --warmup, --batch_size and --profile >= 0")
    args.model = model_config(args.preset, overrides)
    args.preset_batch_size = load_preset(args.preset).get("batch_size")
    return args


def bench_generation(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    if args.threads > 0:  # on a shared CPU, fewer threads than cores avoids waiting on descheduled ones
        torch.set_num_threads(args.threads)
    config = args.model
    torch.manual_seed(0)
    model = PaLM(config).to(device).eval()
    print(f"{args.preset}: {model.num_params():,} parameters, {config.n_head} query heads, "
          f"{config.n_kv_head} K/V head(s), block_size {config.block_size}, float32 on {device} "
          f"({torch.get_num_threads()} CPU threads); greedy, {args.new_tokens} new tokens, "
          f"median of {args.repeats}\n")
    print("| context | with KV cache (tok/s) | without (tok/s) | speed-up |")
    print("|---:|---:|---:|---:|")
    for context in args.contexts:
        cached = generation_speed(model, context, args.new_tokens, True, device, args.repeats)
        uncached = generation_speed(model, context, args.new_tokens, False, device, args.repeats)
        print(f"| {context} | {cached:,.1f} | {uncached:,.1f} | {cached / uncached:,.1f}x |", flush=True)
    # The cache's size: the same model with one K/V head (PaLM's multi-query) and with one per query head.
    print("\n| attention | KV cache bytes per sequence (float32, full block) |")
    print("|---|---:|")
    for name, kv_heads in (("multi-query (PaLM)", 1), ("multi-head", config.n_head)):
        cache_bytes = dataclasses.replace(config, n_kv_head=kv_heads).kv_cache_bytes()
        print(f"| {name}, {kv_heads} K/V head(s) | {cache_bytes:,} |")


PROFILE_ROWS = 20


def print_profile(benches: list, compiled: list[str], steps: int) -> None:
    """The operators that take the most time per step, side by side for the benches (op_profile)."""
    table = op_profile(benches, steps)
    names = [b.name + (" (compiled)" if flag == "true" else "") for b, flag in zip(benches, compiled, strict=True)]
    print(f"\nWhere a step's time goes: torch.profiler, self time per operator in ms per step (median of {steps} "
          f"steps of each model, in turns), the {PROFILE_ROWS} most expensive operators:\n")
    print(f"| operator | {' | '.join(names)} |")
    print(f"|---|{'---:|' * len(names)}")
    for op, times in [*table.items()][:PROFILE_ROWS]:
        print(f"| `{op}` | {' | '.join(f'{t:,.1f}' for t in times)} |")
    totals = [sum(times[i] for times in table.values()) for i in range(len(names))]
    print(f"| all operators | {' | '.join(f'{t:,.1f}' for t in totals)} |")


def bench_memory(args: argparse.Namespace) -> None:
    """One training step (forward, backward, clip, AdamW) of the model at each vocabulary, its output layer
    chunked (nanopalm/fused.py) and with all the logits at once (as before it): the peak of its tensors."""
    device = pick_device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: the memory benchmark measures on cpu or cuda")
    print(f"{args.preset} shape: {describe(args.model)}; block {args.model.block_size}, batch {args.batch_size}, "
          f"float32 on {machine_name(device)}; one full training step (forward, backward, clip, AdamW) after "
          "one warm-up step\n")
    print("| vocabulary | output layer | parameters | weights + AdamW state + batch (MiB) | step peak (MiB) "
          "| total (MiB) | full logits / chunked |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for vocab in args.vocab_sizes:
        config = dataclasses.replace(args.model, vocab_size=vocab)
        totals = {}
        for layer in ("full", "chunked"):
            bench = make_train_bench(layer, config, args.batch_size, device, torch.float32, False, layer)
            bench.warm_up(1)  # the optimizer state exists from the first step on
            step = bench.step_peak_bytes()
            totals[layer] = bench.resident_bytes() + step
            ratio = f"{totals['full'] / totals[layer]:.1f}x" if layer == "chunked" else ""
            print(f"| {vocab:,} | {layer} | {bench.model.num_params():,} | {bench.resident_bytes() / 2**20:,.0f} | "
                  f"{step / 2**20:,.0f} | {totals[layer] / 2**20:,.0f} | {ratio} |", flush=True)
            del bench
    print("\nStep peak: the most bytes of tensors one step holds at once beyond those held between steps "
          "(nanopalm.bench.peak_bytes: the CUDA allocator's peak, or torch.profiler's CPU allocation events).")


def describe(config: PaLMConfig) -> str:
    block = "parallel" if config.parallel_block else "serial"
    return (f"{config.n_layer} layers, d_model {config.d_model}, {config.n_head} heads of {config.head_dim}, "
            f"{config.n_kv_head} K/V head(s), {block} {config.mlp}, {config.pos_emb} positions")


def bench_training(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise UserError(f"--clock cpu times CPU work: it cannot time {device.type}; leave --clock out")
    clock = CLOCKS[args.clock]
    if args.threads > 0:  # on a shared CPU, fewer threads than cores avoids waiting on descheduled ones
        torch.set_num_threads(args.threads)
    # The CPU targets are fp32: auto keeps fp32 off CUDA (train.py's auto would take bf16 on this CPU).
    cpu_auto = args.dtype == "auto" and device.type != "cuda"
    dtype = torch.float32 if cpu_auto else pick_precision(args.dtype, device).dtype
    config = args.model
    batch_size = args.batch_size or args.preset_batch_size or 8
    models = [(args.preset, config)]
    if args.compare:
        models.append(("GPT-2-style", equal_size_gpt2(config)))
    benches = [make_train_bench(name, cfg, batch_size, device, dtype, flag == "true")
               for flag in args.compile for name, cfg in models]
    compiled = [flag for flag in args.compile for _ in models]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    warmup_s = [b.warm_up(args.warmup) for b in benches]

    # MFU's denominator: the flag, the GPU's datasheet (bf16/fp16 only), or a matmul measured between repeats.
    table_peak = gpu_peak_flops(device) if dtype != torch.float32 else None
    peaks: list[float] = []
    measure = None
    if args.peak_flops > 0:
        peaks, peak_source = [args.peak_flops] * args.repeats, "--peak_flops"
    elif table_peak:
        peaks, peak_source = [table_peak] * args.repeats, f"{machine_name(device)} datasheet, dense bf16/fp16"
    else:
        peak_source = f"{str(dtype).removeprefix('torch.')} 2048^3 matmul measured between repeats"
        def measure() -> None:
            peaks.append(matmul_flops(device, dtype, clock=clock))
    seconds = interleave(benches, args.repeats, args.steps, measure, clock)
    peaks_bytes = [b.step_peak_bytes() for b in benches]
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print(f"{machine_name(device)}, torch {torch.__version__}, {device}, {dtype}, {torch.get_num_threads()} CPU "
          f"threads; load average {load_before:.1f} at the start, {load_after:.1f} at the end")
    print(f"batch {batch_size} x {config.block_size} tokens; full steps (forward, backward, clip, AdamW); "
          f"{args.warmup} warm-up steps, then {args.repeats} repeats of {args.steps} steps, the models in turns; "
          f"medians; {'CPU time of this process' if args.clock == 'cpu' else 'wall-clock time'}\n")
    for name, cfg in models:
        model = next(b.model for b in benches if b.name == name)
        print(f"- {name}: {describe(cfg)}; {model.num_params():,} parameters, "
              f"{model.flops_per_token(cfg.block_size) / 1e6:,.1f} MFLOPs/token (6N + 12LHQT)")
    print("\n| model | compile | warm-up (s) | ms/step | tokens/s | peak memory (MiB) | model GFLOP/s | MFU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for i, (b, flag, step_bytes) in enumerate(zip(benches, compiled, peaks_bytes, strict=True)):
        step_s = statistics.median(row[i] for row in seconds)
        tokens_s = b.tokens_per_step / step_s
        flops = b.model.flops_per_token(b.model.config.block_size)
        util = statistics.median(mfu(flops, b.tokens_per_step / row[i], peak)
                                 for row, peak in zip(seconds, peaks, strict=True))
        memory = "n/a" if step_bytes is None else f"{(b.resident_bytes() + step_bytes) / 2**20:,.0f}"
        print(f"| {b.name} | {flag} | {warmup_s[i]:.1f} | {1000 * step_s:,.1f} | {tokens_s:,.0f} | "
              f"{memory} | {flops * tokens_s / 1e9:,.1f} | {100 * util:.1f}% |")
    print(f"\nMFU against {statistics.median(peaks) / 1e9:,.1f} GFLOP/s ({peak_source}; "
          f"range {min(peaks) / 1e9:,.1f}-{max(peaks) / 1e9:,.1f}).")
    print("Peak memory: weights, optimizer state and batch, plus the most one more (untimed) step holds at once "
          "(nanopalm.bench.peak_bytes).")
    if args.compare:
        for i in range(0, len(benches), 2):  # (PaLM, GPT-2) pairs, one per compile setting
            ratios = [row[i + 1] / row[i] for row in seconds]
            print(f"PaLM / GPT-2-style tokens/s, compile {compiled[i]}: {statistics.median(ratios):.3f}x "
                  f"(median of {len(ratios)} repeats, range {min(ratios):.3f}x-{max(ratios):.3f}x)")
    if args.profile:
        print_profile(benches, compiled, args.profile)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    print(f"$ {shlex.join(['python', 'bench.py', *argv])}\n", flush=True)  # results say how they were made
    if args.what == "generation":
        bench_generation(args)
    elif args.what == "memory":
        bench_memory(args)
    else:
        bench_training(args)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
