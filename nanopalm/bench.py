"""Benchmarks. Generation: tokens per second with and without the KV cache."""

from __future__ import annotations

import statistics
import time

import torch

from nanopalm.errors import UserError
from nanopalm.model import PaLM


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

    model.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache, on_token=on_token)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])
