"""Architectures built from the same code: GPT-2's choices, and models resized to a parameter budget.

Every PaLM choice is a switch of PaLMConfig. GPT2_CHOICES sets each to GPT-2's (Radford et al. 2019) and
`equal_size_gpt2` finds the GPT-2-style model of (nearly) the same parameter count, which the benchmarks
and the ablation study compare PaLM against.
"""

from __future__ import annotations

import dataclasses

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


def equal_size_gpt2(palm: PaLMConfig, tolerance: float = 0.02) -> PaLMConfig:
    """The GPT-2 architecture (serial block, GELU, learned positions, biases, MHA) with the parameter
    count of `palm`, the same vocabulary, block size and number of heads.

    Among the widths whose head size is a whole even number and depths up to 3x PaLM's, it takes the
    depth closest to PaLM's that lands within `tolerance` of its parameter count (so that both models
    run the same number of sequential blocks), and the closest count when none does.
    """
    target = param_count(palm)
    keep = {k: v for k, v in dataclasses.asdict(palm).items() if k in ("vocab_size", "block_size", "dropout")}

    def rank(c: PaLMConfig) -> tuple[bool, int, float]:
        miss = abs(param_count(c) / target - 1)
        return miss > tolerance, abs(c.n_layer - palm.n_layer) if miss <= tolerance else 0, miss

    step = 2 * palm.n_head
    candidates = (gpt2_config(**keep, n_layer=layers, n_head=palm.n_head, d_model=width)
                  for width in range(step, 3 * palm.d_model + 1, step)
                  for layers in range(1, 3 * palm.n_layer + 1))
    return min(candidates, key=rank)
