"""Architectures built from the same code: GPT-2's choices, and models resized to a parameter budget.

Every PaLM choice is a switch of PaLMConfig. GPT2_CHOICES sets each to GPT-2's (Radford et al. 2019);
`equal_size` resizes a model to a parameter count by its width, and `equal_size_gpt2` is the one GPT-2-style
model of PaLM's size that the benchmarks and the ablation study both compare PaLM against.
"""

from __future__ import annotations

import dataclasses

from nanopalm.errors import UserError
from nanopalm.model import PaLMConfig

GPT2_CHOICES = dict(parallel_block=False, mlp="gelu", pos_emb="learned", logit_scale=False, z_loss=0.0,
                    bias=True, tie_embeddings=True, init="gpt2")


def gpt2_config(**overrides) -> PaLMConfig:
    """The GPT-2 architecture: every PaLM switch set to GPT-2's choice, one K/V head per query head."""
    base = {**GPT2_CHOICES, **overrides}
    base.setdefault("n_kv_head", base.get("n_head", PaLMConfig.n_head))
    return PaLMConfig(**base)


def param_count(c: PaLMConfig) -> int:
    """Closed-form parameter count (the tied embedding once), to size models without building them."""
    ln = c.d_model * (2 if c.bias else 1)

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + (n_out if c.bias else 0)

    mlp_in = (2 if c.mlp == "swiglu" else 1) * c.d_ff
    qkv = (c.n_head + 2 * c.n_kv_head) * c.head_dim
    block = ln + linear(c.d_model, qkv) + linear(c.n_head * c.head_dim, c.d_model)
    block += linear(c.d_model, mlp_in) + linear(c.d_ff, c.d_model)
    if not c.parallel_block:
        block += ln
    total = c.n_layer * block + c.vocab_size * c.d_model + ln
    if c.pos_emb == "learned":
        total += c.block_size * c.d_model
    if not c.tie_embeddings:
        total += c.d_model * c.vocab_size
    return total


def equal_size(model: PaLMConfig, target: int, tolerance: float = 0.02) -> PaLMConfig:
    """`model` resized to `target` parameters by its width alone, so that a comparison changes nothing else:
    d_model (a multiple of 2; depth, heads and head size kept) with d_ff = 4 d_model, then d_ff alone
    fine-tuned within 4 d_model +- 12.5% where a step of d_model is too coarse (small models). UserError if no
    width lands within `tolerance`."""
    def sized(width: int) -> PaLMConfig:
        plain = dataclasses.replace(model, d_model=width, d_ff=4 * width)
        per_unit = param_count(dataclasses.replace(plain, d_ff=4 * width + 1)) - param_count(plain)
        d_ff = round(4 * width + (target - param_count(plain)) / per_unit)
        return dataclasses.replace(plain, d_ff=min(max(d_ff, round(3.5 * width)), round(4.5 * width)))

    candidates = [sized(w) for w in range(2, 4 * model.d_model + 1, 2)]
    best = min(candidates, key=lambda c: (abs(param_count(c) - target), abs(c.d_ff - 4 * c.d_model)))
    if abs(param_count(best) / target - 1) > tolerance:
        raise UserError(f"no width gives {model} a parameter count within {tolerance:.0%} of {target:,}")
    return best


def equal_size_gpt2(palm: PaLMConfig) -> PaLMConfig:
    """The GPT-2-style model PaLM is compared with, in the benchmarks and the ablation study alike: GPT-2's
    choices (GPT2_CHOICES, one K/V head per query head) on PaLM's depth, heads, head size, vocabulary and
    block size, resized by `equal_size` to PaLM's parameter count."""
    shape = {k: getattr(palm, k) for k in ("vocab_size", "block_size", "dropout", "n_layer", "n_head", "head_dim",
                                           "d_model", "d_ff")}
    return equal_size(gpt2_config(**shape), param_count(palm))
