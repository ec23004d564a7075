"""Benchmarks, printed as Markdown tables for docs/BENCHMARKS.md.

    python bench.py generation                          # palm_20m, 256 and 1024 tokens of context
    python bench.py generation --contexts 512 --device=cuda --new_tokens=64
"""

from __future__ import annotations

import argparse

import torch

from nanopalm.bench import generation_speed
from nanopalm.device import pick_device
from nanopalm.errors import run_cli
from nanopalm.model import KVCache, PaLM, config_from_preset


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("generation", help="tokens/s with and without the KV cache")
    g.add_argument("--preset", default="palm_20m", help="model shape from nanopalm.model.MODEL_PRESETS")
    g.add_argument("--block_size", type=int, default=2048, help="context window of the benchmarked model")
    g.add_argument("--contexts", type=int, nargs="+", default=[256, 1024], help="prompt lengths to time")
    g.add_argument("--new_tokens", type=int, default=16, help="tokens generated per timing")
    g.add_argument("--repeats", type=int, default=3, help="timings per number; the median is reported")
    g.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    return p.parse_args(argv)


def bench_generation(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    if args.threads > 0:  # on a shared CPU, fewer threads than cores avoids waiting on descheduled ones
        torch.set_num_threads(args.threads)
    config = config_from_preset(args.preset, block_size=args.block_size)
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
        shape = config_from_preset(args.preset, block_size=args.block_size, n_kv_head=kv_heads)
        print(f"| {name}, {kv_heads} K/V head(s) | {KVCache(shape, 1, 'meta', torch.float32).nbytes():,} |")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.what == "generation":
        bench_generation(args)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
