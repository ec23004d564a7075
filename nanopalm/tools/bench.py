"""Benchmarks. Generation: tokens per second with and without the KV cache. Training: ms/step, tokens/s,
peak memory and MFU, and PaLM against the GPT-2 architecture of the same size. Memory: the peak of one
training step with the chunked output layer against all the logits at once."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch.profiler import ProfilerActivity, profile

from nanopalm.device import Precision
from nanopalm.distributed import DistInfo, build_model
from nanopalm.errors import UserError
from nanopalm.memory import Estimate, Setup, estimate, measure, peak_bytes_of
from nanopalm.model import PaLM, PaLMConfig, lm_losses
from nanopalm.optim import OptimConfig, build_optimizer
from nanopalm.sampling import generate


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def generation_speed(
    model: PaLM, context_len: int, new_tokens: int, use_cache: bool, device: torch.device, repeats: int = 3
) -> float:
    """Tokens/s of greedy generation once context_len tokens are in the context (median of repeats).

    Timed from the first generated token to the last, so it is the steady per-token rate: the time to
    the first token (one forward pass over the prompt) is the same with and without the cache and is
    left out. The context grows from context_len to context_len + new_tokens - 1 while timed.
    """
    if new_tokens < 2:
        raise UserError(f"new_tokens={new_tokens}: timing the gaps between tokens needs at least 2")
    if context_len + new_tokens > model.config.block_size:
        raise UserError(f"context {context_len} + {new_tokens} new tokens exceed block_size="
                        f"{model.config.block_size}: give the model a longer block_size")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (1, context_len), generator=gen).to(device)
    return statistics.median(decode_rate(model, prompt, new_tokens, use_cache, device) for _ in range(repeats))


def decode_rate(model: PaLM, prompt: torch.Tensor, new_tokens: int, use_cache: bool, device: torch.device) -> float:
    """One timing: tokens/s between the first and the last generated token."""
    stamps: list[float] = []

    def on_token(_: torch.Tensor) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache, on_token=on_token)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


# ---------------------------------------------------------------------------------------------- training


# What a step's time is read from: the wall clock, or (CPU only) this process's CPU time, which on a
# shared machine leaves out the time spent waiting for a core (with one thread; more threads add up).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 3,
                 clock: Callable[[], float] = time.perf_counter) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on `device`, median of `repeats` (after one warm-up).

    On a CPU this is the "peak" that MFU is measured against: the best the BLAS does on this machine,
    with the threads and the load it has right now.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(repeats + 1):
        synchronize(device)
        start = clock()
        a @ b
        synchronize(device)
        if i:  # the first one is the warm-up
            times.append(clock() - start)
    return 2 * n**3 / statistics.median(times)


def matmul_flops_per_token(model: PaLM) -> int:
    """Training FLOPs per token of the dense matmuls alone, 6 per weight (forward, and backward for the input
    and the weight): every linear layer and the output layer. Unlike Appendix B's 6N it leaves out the
    parameters no matmul multiplies (learned positions, biases, LayerNorm gains), and attention's 12LHQT."""
    weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    weights[id(model.output_weight())] = model.output_weight().numel()  # the embedding, when tied
    return 6 * sum(weights.values())


@dataclasses.dataclass
class TrainBench:
    """One model being timed: full optimizer steps (forward, backward, clip, AdamW) on a fixed batch."""

    name: str
    model: PaLM  # built as train.py builds it: activation checkpointing, blocks compiled with --compile true
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    dtype: torch.dtype
    activation_checkpointing: str = "none"
    peak_bytes: int = 0
    output_layer: Literal["chunked", "full"] = "chunked"  # full: all the logits, model.lm_losses (memory benchmark)

    def forward_backward(self) -> None:
        with Precision(self.dtype).autocast(self.x.device):
            if self.output_layer == "chunked":
                loss = self.model(self.x, self.y).loss
            else:
                # (no name for the logits: a local would hold all of them through the backward)
                loss = lm_losses(self.model(self.x).logits.flatten(0, 1), self.y.flatten(), self.model.config.z_loss)[0]
        loss.backward()

    def update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.forward_backward()
        self.update()

    def warm_up(self, steps: int) -> float:
        """Untimed steps (allocator, BLAS and compile warm-up); returns the seconds they took."""
        synchronize(self.x.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.x.device)
        return time.perf_counter() - start

    def timed_step(self, clock: Callable[[], float] = time.perf_counter) -> float:
        """One step; returns its seconds."""
        synchronize(self.x.device)
        start = clock()
        self.step()
        synchronize(self.x.device)
        return clock() - start

    def measure_peak(self, parts: list[Callable[[], None]] | None = None) -> int:
        """The peak bytes of one (untimed) step of this model, run as `parts` (default: one forward-backward,
        then the update), after a step has made the optimizer's state. CUDA: its resident tensors plus the
        most the step allocated on top of everything else there. The CPU, which keeps no allocator
        statistics: PyTorch's MemTracker counts the tensors (nanopalm/memory.py); with --compile true it sees
        the step run eagerly (a dispatch mode turns compiled code off)."""
        device, parts = self.x.device, parts or [self.forward_backward, self.update]
        if device.type == "cuda":
            self.peak_bytes = self.resident_bytes() + peak_bytes_of(lambda: [part() for part in parts], device)
        else:
            self.peak_bytes = measure(parts, self.model, self.optimizer)["Total"]
        return self.peak_bytes

    def resident_bytes(self) -> int:
        """Bytes held between steps: weights, optimizer state and the batch (grads are freed each step)."""
        tensors = [*self.model.parameters(), self.x, self.y]  # (x and y share storage: a few bytes twice)
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def tokens_per_step(self) -> int:
        return self.x.numel()


def optimizer_step_seconds(model: PaLM, optimizer: torch.optim.Optimizer, steps: int) -> float:
    """Median seconds of `optimizer.step()` alone, on fixed random gradients (after one untimed step)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator).to(device)
    times = []
    for i in range(steps + 1):
        synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        synchronize(device)
        if i:  # the first step creates the state
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_train_bench(name: str, config: PaLMConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                     compile_model: bool, activation_checkpointing: str = "none", optimizer_name: str = "adamw",
                     output_layer: Literal["chunked", "full"] = "chunked") -> TrainBench:
    """A model built as train.py builds it (distributed.build_model), with the project's AdamW (fused on
    CUDA) or Adafactor, and a fixed batch of random tokens, seeded, so that two benches of the same
    vocabulary train on the very same tokens."""
    model, _ = build_model(config, DistInfo(), device, Precision(dtype), 0, activation_checkpointing, compile_model)
    optimizer = build_optimizer(model, OptimConfig(optimizer=optimizer_name), device.type)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(config.vocab_size, (batch_size, config.block_size + 1), generator=gen).to(device)
    return TrainBench(name, model, optimizer, tokens[:, :-1], tokens[:, 1:], dtype, activation_checkpointing,
                      output_layer=output_layer)


def estimate_and_measure(config: PaLMConfig, batch_size: int, device: torch.device, dtype: torch.dtype, mode: str,
                         optimizer_name: str = "adamw", micro_batches: int = 1) -> tuple[Estimate, int]:
    """The memory planner's estimate of a one-process step (micro_batches forward-backwards of batch_size
    sequences, then the update) and the step's measured peak, in bytes (TrainBench.measure_peak)."""
    bench = make_train_bench("memory", config, batch_size, device, dtype, False, mode, optimizer_name)
    parts = [bench.forward_backward] * micro_batches + [bench.update]
    for part in parts:  # the optimizer's state comes with its first step
        part()
    setup = Setup(config, 1, False, optimizer_name, dtype, mode, micro_batches > 1, device.type)
    return estimate(setup, batch_size), bench.measure_peak(parts)


def interleave(benches: list[TrainBench], repeats: int, steps: int, between: Callable[[], None] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Time the benches in turns, one step each, so that a change in the machine's load hits all alike.

    Returns seconds per step, [repeat][bench], each the median of the bench's `steps` steps in that
    repeat. The order reverses every turn (A B, B A, ...) so that neither bench always runs right after
    the other; `between` runs once a repeat (for a measurement that should share the same conditions,
    like the CPU peak).
    """
    table = []
    turns = 0
    for _ in range(repeats):
        times: list[list[float]] = [[] for _ in benches]
        for _ in range(steps):
            order = range(len(benches)) if turns % 2 == 0 else reversed(range(len(benches)))
            turns += 1
            for i in order:
                times[i].append(benches[i].timed_step(clock))
        table.append([statistics.median(t) for t in times])
        if between is not None:
            between()
    return table


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free interval for the median of what `values` sample: (low, high, its coverage).

    Sorted, values[d] and values[n - 1 - d] bracket the true median unless at least n - d of the n draws fall
    on one side of it, which for independent draws happens with probability 2 P(Binomial(n, 1/2) <= d)
    whatever their distribution (the order-statistic interval for a median). The largest d whose coverage is
    at least `confidence`; with too few values for that, the whole range and the coverage it has. For
    per-round ratios of a benchmark on a shared machine, whose noise is neither normal nor symmetric (a slow
    drift of the load makes rounds less independent; pairing the models within each round offsets most of it).
    """
    xs, n = sorted(values), len(values)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    d, tail = 0, 1 / 2**n  # tail: P(Binomial(n, 1/2) <= d)
    while d + 1 < n - 1 - d and 1 - 2 * (tail + math.comb(n, d + 1) / 2**n) >= confidence:
        d += 1
        tail += math.comb(n, d) / 2**n
    return xs[d], xs[n - 1 - d], 1 - 2 * tail


def describe_ratios(ratios: list[float], digits: int) -> str:
    """The median of per-round ratios, the interval that holds the true median with the coverage printed
    (median_interval: 95% or more from 6 rounds on), and the range."""
    low, high, coverage = median_interval(ratios)
    ratio = f".{digits}f"
    return (f"{statistics.median(ratios):{ratio}}x (median of {len(ratios)} repeats; {100 * coverage:.0f}% interval "
            f"{low:{ratio}}x-{high:{ratio}}x; range {min(ratios):{ratio}}x-{max(ratios):{ratio}}x)")


def op_profile(benches: list[TrainBench], steps: int) -> dict[str, list[float]]:
    """torch.profiler over `steps` steps of each bench, in turns: {operator: [median self time in ms per
    step, one per bench]}, most expensive first: where a step's time goes (on CUDA, the kernels' time)."""
    cuda = benches[0].x.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    per_step: list[dict[str, list[float]]] = [{} for _ in benches]
    for turn in range(steps):
        for i in range(len(benches)) if turn % 2 == 0 else reversed(range(len(benches))):
            with profile(activities=activities) as prof:
                benches[i].step()
                synchronize(benches[i].x.device)
            for event in prof.key_averages():
                self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
                per_step[i].setdefault(event.key, []).append(self_us / 1000)
    ops = set().union(*per_step)
    table = {op: [statistics.median(times.get(op, []) + [0.0] * (steps - len(times.get(op, [])))) for times in per_step]
             for op in ops}
    return dict(sorted(table.items(), key=lambda item: -max(item[1])))


def load_module(path: str | Path, name: str):
    """The Python file at `path` imported as the module `name` (and registered under it, as dataclasses
    need): a script of the repository, which is not part of the package, or another commit's version of a
    package file for a before/after timing (`git show COMMIT:nanopalm/fused.py > /tmp/old_fused.py`)."""
    path = Path(path)
    if path.suffix != ".py" or not path.is_file():
        raise UserError(f"{path}: no such Python file; give the path of a .py file (git show COMMIT:FILE > PATH "
                        "writes an older version of one)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # no half-built module left for a later import to find
        raise
    return module


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "CPU"
    cpuinfo = Path("/proc/cpuinfo")  # Linux: platform.processor() only says "x86_64"
    if cpuinfo.is_file():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        name = models[0] if models else name
    return f"{name} ({os.cpu_count()} cores)"
