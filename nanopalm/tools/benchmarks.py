"""The benchmarks behind root bench.py's subcommands (training, generation, memory, optimizer, logits), each
printing Markdown tables for docs/BENCHMARKS.md from the parsed arguments; nanopalm/tools/bench.py holds their
machinery (timed steps, interleaving, peaks, statistics)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import torch

from nanopalm.device import inference_precision, pick_device, pick_precision
from nanopalm.errors import UserError
from nanopalm.memory import GIB, Setup, estimate, largest_batch
from nanopalm.metrics import gpu_peak_flops, mfu
from nanopalm.model import PaLM, PaLMConfig
from nanopalm.optim import OptimConfig, build_optimizer
from nanopalm.tools.bench import (
    CLOCKS,
    describe_ratios,
    estimate_and_measure,
    generation_speed,
    interleave,
    machine_name,
    make_train_bench,
    matmul_flops,
    matmul_flops_per_token,
    op_profile,
    optimizer_step_seconds,
)
from nanopalm.variants import equal_size_gpt2, param_count


def bench_generation(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    if args.threads > 0:  # on a shared CPU, fewer threads than cores avoids waiting on descheduled ones
        torch.set_num_threads(args.threads)
    config = args.model
    precision = inference_precision(args.dtype, device)
    torch.manual_seed(0)
    model = PaLM(config).to(device).eval()
    print(f"{args.preset}: {model.num_params():,} parameters, {config.n_head} query heads, "
          f"{config.n_kv_head} K/V head(s), block_size {config.block_size}, {str(precision.dtype)[6:]} on {device} "
          f"({torch.get_num_threads()} CPU threads); greedy, {args.new_tokens} new tokens, "
          f"median of {args.repeats}\n")
    print("| context | with KV cache (tok/s) | without (tok/s) | speed-up |")
    print("|---:|---:|---:|---:|")
    for context in args.contexts:
        with precision.autocast(device, for_generation=True):
            cached = generation_speed(model, context, args.new_tokens, True, device, args.repeats)
            uncached = generation_speed(model, context, args.new_tokens, False, device, args.repeats)
        print(f"| {context} | {cached:,.1f} | {uncached:,.1f} | {cached / uncached:,.1f}x |", flush=True)
    # The cache's size: the same model with one K/V head (PaLM's multi-query) and with one per query head.
    print("\n| attention | KV cache bytes per sequence (float32, full block) |")
    print("|---|---:|")
    for name, kv_heads in (("multi-query (PaLM)", 1), ("multi-head", config.n_head)):
        cache_bytes = dataclasses.replace(config, n_kv_head=kv_heads).kv_cache_bytes()
        print(f"| {name}, {kv_heads} K/V head(s) | {cache_bytes:,} |")


def bench_optimizer(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = PaLM(args.model).to(device)
    print(f"{args.preset}: {model.num_params():,} parameters ({len(list(model.parameters()))} tensors), fp32 on "
          f"{device} ({torch.get_num_threads()} CPU threads); optimizer.step() alone, median of {args.steps}\n")
    print("| optimizer | ms per step |")
    print("|---|---:|")
    for name in ("adamw", "adafactor"):
        optimizer = build_optimizer(model, OptimConfig(optimizer=name), device.type)
        seconds = optimizer_step_seconds(model, optimizer, args.steps)
        print(f"| {name}{' (fused)' if optimizer.defaults.get('fused') else ''} | {1000 * seconds:,.1f} |", flush=True)
        del optimizer


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


def bench_logits(args: argparse.Namespace) -> None:
    """One training step (forward, backward, clip, AdamW) of the model at each vocabulary, its output layer
    chunked (nanopalm/fused.py) and with all the logits at once (as before it): the peak of its tensors."""
    device = pick_device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: the memory benchmark measures on cpu or cuda")
    print(f"{args.preset} shape: {describe(args.model)}; block {args.model.block_size}, batch {args.batch_size}, "
          f"float32 on {machine_name(device)}; one full training step (forward, backward, clip, AdamW) after "
          "one warm-up step\n")
    print("| vocabulary | output layer | parameters | weights + AdamW state + batch (MiB) | step peak (MiB) "
          "| full logits / chunked |")
    print("|---:|---|---:|---:|---:|---:|")
    for vocab in args.vocab_sizes:
        config = dataclasses.replace(args.model, vocab_size=vocab)
        peaks = {}
        for layer in ("full", "chunked"):
            bench = make_train_bench(layer, config, args.batch_size, device, torch.float32, False, output_layer=layer)
            bench.warm_up(1)  # the optimizer state exists from the first step on
            peaks[layer] = bench.measure_peak()
            ratio = f"{peaks['full'] / peaks[layer]:.1f}x" if layer == "chunked" else ""
            print(f"| {vocab:,} | {layer} | {bench.model.num_params():,} | {bench.resident_bytes() / 2**20:,.0f} | "
                  f"{peaks[layer] / 2**20:,.0f} | {ratio} |", flush=True)
            del bench
    print("\nStep peak: the most bytes of tensors a training step holds at once, weights and optimizer state "
          "included (TrainBench.measure_peak: the CUDA allocator's peak, or PyTorch's MemTracker on the CPU).")


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
    variants = [(flag, mode) for flag in args.compile for mode in args.activation_checkpointing]
    benches = [make_train_bench(name, cfg, batch_size, device, dtype, flag == "true", mode)
               for flag, mode in variants for name, cfg in models]
    compiled = [flag for flag, _ in variants for _ in models]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    warmup_s = [b.warm_up(args.warmup) for b in benches]
    for b in benches:
        b.measure_peak()

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
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print(f"{machine_name(device)}, torch {torch.__version__}, {device}, {dtype}, {torch.get_num_threads()} CPU "
          f"threads; load average {load_before:.1f} at the start, {load_after:.1f} at the end")
    print(f"batch {batch_size} x {config.block_size} tokens; full steps (forward, backward, clip, AdamW); "
          f"{args.warmup} warm-up steps, then {args.repeats} repeats of {args.steps} steps, the models in turns; "
          f"medians; {'CPU time of this process' if args.clock == 'cpu' else 'wall-clock time'}\n")
    for name, cfg in models:
        model = next(b.model for b in benches if b.name == name)
        print(f"- {name}: {describe(cfg)}; {model.num_params():,} parameters, "
              f"{model.flops_per_token(cfg.block_size) / 1e6:,.2f} MFLOPs/token (6N + 12LHQT), of which "
              f"{matmul_flops_per_token(model) / 1e6:,.2f} in dense matmuls")
    print("\n| model | compile | checkpointing | warm-up (s) | ms/step | tokens/s | peak memory (MiB) | model GFLOP/s "
          "| MFU |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for i, (b, flag) in enumerate(zip(benches, compiled, strict=True)):
        step_s = statistics.median(row[i] for row in seconds)
        tokens_s = b.tokens_per_step / step_s
        flops = b.model.flops_per_token(b.model.config.block_size)
        util = statistics.median(mfu(flops, b.tokens_per_step / row[i], peak)
                                 for row, peak in zip(seconds, peaks, strict=True))
        print(f"| {b.name} | {flag} | {b.activation_checkpointing} | {warmup_s[i]:.1f} | {1000 * step_s:,.1f} | "
              f"{tokens_s:,.0f} | "
              f"{b.peak_bytes / 2**20:,.0f} | {flops * tokens_s / 1e9:,.1f} | {100 * util:.1f}% |")
    print(f"\nMFU against {statistics.median(peaks) / 1e9:,.1f} GFLOP/s ({peak_source}; "
          f"range {min(peaks) / 1e9:,.1f}-{max(peaks) / 1e9:,.1f}).")
    if device.type != "cuda":
        print("Peak memory off CUDA: the tensors of one step as PyTorch's MemTracker counts them (compiled models "
              "run that step eagerly).")
    if args.compare:
        for i in range(0, len(benches), 2):  # (PaLM, GPT-2) pairs, one per compile and checkpointing setting
            ratios = [row[i + 1] / row[i] for row in seconds]
            print(f"PaLM / GPT-2-style tokens/s, compile {compiled[i]}, checkpointing "
                  f"{benches[i].activation_checkpointing}: {describe_ratios(ratios, 3)}")
    for i, b in enumerate(benches):  # each checkpointing mode against none, same model and compile setting
        j = next((j for j, a in enumerate(benches) if a.activation_checkpointing == "none" and a.name == b.name
                  and compiled[j] == compiled[i]), None)
        if j is not None and j != i:
            ratios = [row[i] / row[j] for row in seconds]
            print(f"{b.name}, compile {compiled[i]}, checkpointing {b.activation_checkpointing} against none: peak "
                  f"memory {b.peak_bytes / benches[j].peak_bytes:.2f}x, step time {describe_ratios(ratios, 2)}")
    if args.profile:
        print_profile(benches, compiled, args.profile)


def bench_memory(args: argparse.Namespace) -> None:
    """The planner: per GPU, what a step holds at its peak, with the largest micro-batch that fits."""
    config, world = args.model, args.world_size
    dtype = getattr(torch, args.dtype)
    accumulate = args.gradient_accumulation_steps > world
    usable = args.gpu_memory * (1 - args.reserve) * GIB
    print(f"{args.preset}: {param_count(config):,} parameters ({describe(config)}), vocabulary {config.vocab_size:,}, "
          f"{config.block_size} tokens a sequence; {args.dtype} on CUDA, {args.optimizer}; {world} GPU(s) of "
          f"{args.gpu_memory:g} GiB, {100 * args.reserve:g}% of it kept free ({usable / GIB:.1f} GiB planned); "
          f"{args.gradient_accumulation_steps} micro-batches a step"
          + (" (gradients live through the forward)" if accumulate else "") + "\n")
    print("GiB per GPU at the peak of a step, with the largest micro-batch that fits (or with 1 sequence when "
          "none does)" + (f"; LoRA rank {config.lora_rank} ({config.lora_targets}) beside the full finetune" if
                         config.lora_rank else "") + ":\n")
    print("| training | parallelism | checkpointing | micro-batch | parameters | gradients | optimizer | activations | "
          "temporary | peak | peak falls on |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    trainings = {f"LoRA r{config.lora_rank}": config, "full": dataclasses.replace(config, lora_rank=0)} \
        if config.lora_rank else {"full": config}
    for training, model in trainings.items():
        for fsdp in ((False, True) if world > 1 else (False,)):
            name = "FSDP2" if fsdp else "DDP" if world > 1 else "one GPU"
            for mode in ("none", "full", "selective"):
                setup = Setup(model, world, fsdp, args.optimizer, dtype, mode, accumulate)
                batch = largest_batch(setup, usable)
                e = estimate(setup, batch or 1)
                cells = (e.parameters, e.gradients, e.optimizer, e.activations, e.temporary, e.total)
                print(f"| {training} | {name} | {mode} | {batch or 'none fits'} | "
                      + " | ".join(f"{v / GIB:.1f}" for v in cells) + f" | {e.phase} |")
    if args.measure:
        measure_memory(args, dtype)


def measure_memory(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """The estimate against the peak of a real step, one process, each checkpointing mode, an AdamW step."""
    device = pick_device(args.device)
    micro_batches = 2  # the gradients live through the second forward, as with accumulation
    print(f"\nOne process on {machine_name(device)}, {args.dtype}, {args.optimizer}, {micro_batches} micro-batches "
          f"of {args.measure} sequences a step; MiB:\n")
    print("| checkpointing | estimated | measured | estimated / measured | peak falls on (estimate) |")
    print("|---|---:|---:|---:|---|")
    for mode in ("none", "full", "selective"):
        e, measured = estimate_and_measure(args.model, args.measure, device, dtype, mode, args.optimizer, micro_batches)
        print(f"| {mode} | {e.total / 2**20:,.1f} | {measured / 2**20:,.1f} | {e.total / measured:.3f} | {e.phase} |",
              flush=True)
