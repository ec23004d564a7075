"""Generation: the decoding loop with its KV cache, and turning logits into tokens (temperature, top-k,
top-p)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from nanopalm.errors import UserError
from nanopalm.model import PaLM

if TYPE_CHECKING:
    from nanopalm.tokenizer import Tokenizer


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


@torch.no_grad()
def generate(
    model: PaLM,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], bool | None] | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Append up to max_new_tokens sampled tokens to idx (B, T); returns (B, T + generated).

    temperature 0 is greedy. A sequence that emits eot_id is finished (padded with eot_id after);
    generation stops when all are. on_token(next_tokens) is called after every step (streaming); when it
    returns True, generation stops there (the caller's own stopping rule: the harness's stop strings).
    vocab_size: sample only ids below it, the tokenizer's vocabulary. A model's may be padded (GPT-2's 50257 to
    50304) and its padding ids decode to nothing.

    Context rule: the model sees a window of at most block_size tokens, positions counted from the
    window's start (RoPE only sees differences, so this loses nothing). A longer prompt is cropped to its
    last block_size tokens. When the window overflows, it jumps forward to keep the last block_size // 2
    tokens, and the KV cache is refilled from them. Both paths, cached and not, follow the same rule, so
    they compute the same function.
    """
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be positive")
    if idx.shape[1] == 0:
        raise UserError("the prompt is empty: give at least one token to continue from")
    check_sampling_args(temperature, top_k, top_p)
    block_size = model.config.block_size
    start = max(0, idx.shape[1] - block_size)  # the window is idx[:, start:]
    cached = 0  # tokens of the window already in the KV cache
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    if use_cache:  # under autocast K and V come out in its dtype: keep them so
        device = idx.device.type
        model.setup_cache(idx.shape[0], torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
    try:
        for _ in range(max_new_tokens):
            if idx.shape[1] - start > block_size:
                start, cached = idx.shape[1] - max(1, block_size // 2), 0  # positions restart: re-encode
            # With a cache only the tokens it has not seen go in: the whole window once, then one a step.
            logits = model(idx[:, start + cached:], pos=cached, last_only=True).logits
            cached = idx.shape[1] - start if use_cache else 0
            next_token = sample_next_token(logits[:, -1, :vocab_size], temperature, top_k, top_p, generator)
            if eot_id is not None:
                next_token = torch.where(finished, eot_id, next_token)
                finished |= next_token == eot_id
            idx = torch.cat([idx, next_token[:, None]], dim=1)
            if on_token is not None and on_token(next_token):
                break
            if eot_id is not None and finished.all():  # (no GPU sync per token when there is no eot)
                break
    finally:
        model.clear_cache()
    return idx


def generate_text(model: PaLM, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> str:
    """The prompt and its continuation as text, stopped at the end-of-text token: generate() for one prompt
    string, on the model's device (sample.py streams the same thing token by token)."""
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([tokenizer.encode(prompt) or [tokenizer.eot_id]], device=device)
    out = generate(model, idx, max_new_tokens, temperature, top_k, top_p, eot_id=tokenizer.eot_id,
                   generator=generator, vocab_size=tokenizer.vocab_size)
    ids = out[0].tolist()
    return tokenizer.decode(ids[:-1] if ids[-1] == tokenizer.eot_id else ids)  # the stop token is not text
