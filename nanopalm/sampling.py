"""Turning logits into tokens: temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import torch

from nanopalm.errors import UserError


def check_sampling_args(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise a UserError for settings that cannot sample: callers check before any work is done."""
    if not temperature >= 0:  # written this way so that NaN fails too
        raise UserError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k <= 0:
        raise UserError(f"top_k={top_k} must be a positive integer (or unset)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p={top_p} must be in (0, 1] (1 = off)")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top_k largest and outside the smallest set of tokens whose
    probability adds up to at least top_p (the most likely token is always kept). top_k keeps exactly
    k tokens, ties broken by torch.topk; top-p is applied to what top-k kept."""
    check_sampling_args(top_k=top_k, top_p=top_p)
    if top_k is not None and top_k < logits.size(-1):
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B,). temperature 0 means greedy (top_k and top_p do not matter)."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    # In fp32 at least: a bf16 softmax rounds small probabilities away.
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
