"""The PaLM model, in one file you can read top to bottom.

PaLM (Chowdhery et al. 2022, Section 2) is a decoder-only transformer with a handful of changes to GPT:
  - a *parallel* block: y = x + Attention(LN(x)) + MLP(LN(x)), one LayerNorm, one fused input matmul;
  - multi-query attention: many query heads, ONE key/value head (a KV cache n_head times smaller);
  - rotary position embeddings (RoPE) instead of learned positions;
  - SwiGLU in the MLP, no biases anywhere, tied input/output embeddings with logits scaled by 1/sqrt(d);
  - an auxiliary z-loss, 1e-4 * log^2(Z), that keeps the softmax normaliser near 1.
Every one of those choices is a switch in PaLMConfig. Set all of them to GPT-2's choices and the same code
builds the GPT-2 architecture, which is what the benchmarks and ablations compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopalm.errors import UserError
from nanopalm.sampling import check_sampling_args, sample_next_token


@dataclass
class PaLMConfig:
    vocab_size: int = field(default=50304, metadata={"help": "vocabulary size (GPT-2's 50257 padded to 64)"})
    block_size: int = field(default=512, metadata={"help": "context length in tokens"})
    n_layer: int = field(default=4, metadata={"help": "number of transformer blocks"})
    n_head: int = field(default=6, metadata={"help": "number of query heads"})
    n_kv_head: int = field(default=1, metadata={"help": "key/value heads: 1 = multi-query (PaLM), n_head = MHA"})
    head_dim: int = field(default=0, metadata={"help": "size of one head; 0 = d_model // n_head (PaLM: 256)"})
    d_model: int = field(default=768, metadata={"help": "width of the residual stream"})
    d_ff: int = field(default=0, metadata={"help": "MLP hidden size; 0 = 4 * d_model (PaLM)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout (PaLM: 0 in pre-training, 0.1 finetuning)"})
    parallel_block: bool = field(default=True, metadata={"help": "PaLM parallel block; False = serial pre-LN"})
    mlp: str = field(default="swiglu", metadata={"help": "MLP type: swiglu (PaLM) | gelu (GPT-2)"})
    pos_emb: str = field(default="rope", metadata={"help": "positions: rope (PaLM) | learned (GPT-2)"})
    rope_base: float = field(default=10000.0, metadata={"help": "RoPE base frequency"})
    logit_scale: bool = field(default=True, metadata={"help": "scale logits by 1/sqrt(d_model) (PaLM)"})
    z_loss: float = field(default=1e-4, metadata={"help": "z-loss coefficient on log^2(Z); 0 = off"})
    bias: bool = field(default=False, metadata={"help": "biases in linear layers and LayerNorm (GPT-2)"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share input and output embeddings"})
    init: str = field(default="palm", metadata={"help": "init: palm (fan-in, E~N(0,1)) | gpt2 (N(0,0.02))"})

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "d_model"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.head_dim < 0 or self.d_ff < 0:
            raise UserError("head_dim and d_ff must be positive (or 0 for their defaults)")
        if self.head_dim == 0:
            if self.d_model % self.n_head:
                raise UserError(
                    f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                    "change one of them or set head_dim explicitly"
                )
            self.head_dim = self.d_model // self.n_head
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise UserError(f"RoPE rotates pairs of dimensions: head_dim={self.head_dim} must be even")
        choices = {"mlp": ("swiglu", "gelu"), "pos_emb": ("rope", "learned"), "init": ("palm", "gpt2")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout} must be in [0, 1)")
        if self.z_loss < 0:
            raise UserError(f"z_loss={self.z_loss} must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


# Model shapes. "seed_213m" is the original nanoPALM's model; the others are PaLM-shaped
# (d_ff = 4 d_model, multi-query, head size 128 or 256 as in Table 1 of the paper).
MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, head_dim=16, d_model=64, d_ff=256, vocab_size=256, block_size=64),
    "palm_20m": dict(n_layer=8, n_head=6, head_dim=64, d_model=384, vocab_size=8192, block_size=256),
    "seed_213m": dict(n_layer=4, n_head=6, head_dim=128, d_model=768, d_ff=24 * 768, vocab_size=50304,
                      block_size=512),
    "palm_125m": dict(n_layer=10, n_head=6, head_dim=128, d_model=768, vocab_size=50304, block_size=2048),
    "palm_350m": dict(n_layer=20, n_head=8, head_dim=128, d_model=1024, vocab_size=50304, block_size=2048),
    "palm_1b": dict(n_layer=16, n_head=8, head_dim=256, d_model=2048, vocab_size=50304, block_size=2048),
}


class LayerNorm(nn.Module):
    """LayerNorm whose bias is optional: PaLM has none (Section 2, "No biases")."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def rope_tables(head_dim: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim) for the "rotate half" layout.

    Dimension i and dimension i + head_dim/2 form one rotation pair and share one angle, which is what
    makes the rotation norm-preserving and q.k a function of the position difference alone (the seed's
    tables mismatched the pairing, so neither held).
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, head_dim) by the angles of its positions (cos/sin: (T, head_dim))."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Preallocated keys and values for fast generation: (batch, n_kv_head, block_size, head_dim) a layer.

    With multi-query attention n_kv_head is 1, so the cache is n_head times smaller than a GPT's.
    """

    def __init__(self, config: PaLMConfig, batch_size: int, device, dtype: torch.dtype) -> None:
        shape = (config.n_layer, batch_size, config.n_kv_head, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reset(self) -> None:
        """Forget every position (the buffers stay allocated, and are overwritten from position 0)."""
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v at the current positions; return all keys and values up to them."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Block(nn.Module):
    """One transformer block: PaLM's parallel form by default, the GPT-2 serial form with the switch off."""

    def __init__(self, config: PaLMConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.q_dim, self.kv_dim = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        self.mlp_in_dim = 2 * c.d_ff if c.mlp == "swiglu" else c.d_ff  # SwiGLU has two input matrices
        self.ln_1 = LayerNorm(c.d_model, c.bias)
        # Parallel block: q, k, v and the MLP input come from one matmul on one LayerNorm (Section 2).
        fused_mlp = self.mlp_in_dim if c.parallel_block else 0
        self.in_proj = nn.Linear(c.d_model, self.q_dim + 2 * self.kv_dim + fused_mlp, bias=c.bias)
        self.attn_out = nn.Linear(self.q_dim, c.d_model, bias=c.bias)
        if not c.parallel_block:
            self.ln_2 = LayerNorm(c.d_model, c.bias)
            self.mlp_in = nn.Linear(c.d_model, self.mlp_in_dim, bias=c.bias)
        self.mlp_out = nn.Linear(c.d_ff, c.d_model, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def attention(self, q, k, v, rope, cache: KVCache | None, layer: int) -> torch.Tensor:
        c = self.config
        B, T, _ = q.shape
        q = q.view(B, T, c.n_head, c.head_dim).transpose(1, 2)
        k = k.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
            if past and T > 1:  # new tokens after cached ones: causal mask aligned to the bottom right
                mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(past)
        # enable_gqa lets SDPA share one K/V head among all query heads without per-head copies of K, V.
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            dropout_p=c.dropout if self.training else 0.0,
            enable_gqa=c.n_kv_head != c.n_head,
        )
        return y.transpose(1, 2).reshape(B, T, self.q_dim)

    def mlp_hidden(self, u: torch.Tensor) -> torch.Tensor:
        if self.config.mlp == "swiglu":  # Swish(xW) * (xV), Shazeer 2020
            gate, up = u.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(u, approximate="tanh")

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        split = [self.q_dim, self.kv_dim, self.kv_dim]
        if self.config.parallel_block:
            q, k, v, u = self.in_proj(self.ln_1(x)).split(split + [self.mlp_in_dim], dim=-1)
            a = self.attn_out(self.attention(q, k, v, rope, cache, layer))
            m = self.mlp_out(self.mlp_hidden(u))
            return x + self.dropout(a + m)
        q, k, v = self.in_proj(self.ln_1(x)).split(split, dim=-1)
        x = x + self.dropout(self.attn_out(self.attention(q, k, v, rope, cache, layer)))
        return x + self.dropout(self.mlp_out(self.mlp_hidden(self.mlp_in(self.ln_2(x)))))


def lm_losses(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, plain cross-entropy). Targets of -1 are ignored.

    The z-loss (Section 5) adds z_loss * log(Z)^2, Z the softmax normaliser, which pushes log Z to 0
    and keeps the logits from drifting; it is reported separately from the cross-entropy.
    """
    # Softmax statistics in at least fp32, even when the logits come out of bf16 autocast.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).view(-1, logits.size(-1))
    targets = targets.reshape(-1)
    if z_loss == 0:
        ce = F.cross_entropy(logits, targets, ignore_index=-1)
        return ce, ce
    # One fused log_softmax serves both terms: log p(target) is the cross-entropy, and
    # log Z = logit(target) - log p(target) (log_softmax = logits - log Z at every index).
    mask = (targets != -1).float()
    count = mask.sum()
    index = targets.clamp_min(0)[:, None]
    target_log_probs = F.log_softmax(logits, dim=-1).gather(-1, index).squeeze(-1)
    log_z = logits.gather(-1, index).squeeze(-1) - target_log_probs
    ce = -(target_log_probs * mask).sum() / count
    return ce + z_loss * (log_z.square() * mask).sum() / count, ce


class PaLM(nn.Module):
    def __init__(self, config: PaLMConfig) -> None:
        super().__init__()
        c = self.config = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.block_size, c.d_model) if c.pos_emb == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = LayerNorm(c.d_model, c.bias)
        # The output layer has no bias, as in GPT-2, whatever `bias` says (it governs the blocks' layers).
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.pos_emb == "rope":
            # Not persistent: derived from the config, so never stored in checkpoints. Built on the
            # module's device when it is moved, never at import time (the seed's CUDA-only defect).
            cos, sin = rope_tables(c.head_dim, c.block_size, c.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PaLM (Section 5): kernels N(0, 1/sqrt(fan_in)), embeddings N(0, 1); GPT-2: N(0, 0.02)."""
        c = self.config
        for block in self.blocks:
            for name, module in block.named_children():
                if isinstance(module, nn.Linear):
                    if c.init == "palm":
                        nn.init.normal_(module.weight, std=module.in_features ** -0.5)
                    else:  # GPT-2 scales the residual projections by 1/sqrt(2 n_layer)
                        scale = (2 * c.n_layer) ** -0.5 if name in ("attn_out", "mlp_out") else 1.0
                        nn.init.normal_(module.weight, std=0.02 * scale)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        nn.init.normal_(self.wte.weight, std=1.0 if c.init == "palm" else 0.02)
        if self.wpe is not None:
            nn.init.normal_(self.wpe.weight, std=0.02)
        if self.lm_head is not None:
            std = c.d_model ** -0.5 if c.init == "palm" else 0.02
            nn.init.normal_(self.lm_head.weight, std=std)

    def num_params(self) -> int:
        """Parameter count, the tied embedding counted once (as in PaLM Appendix B)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token by PaLM Appendix B: 6N + 12 L H Q T."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, vocab), loss or None).

        With a cache, idx holds the tokens after the `cache.length` already cached ones; the cache
        advances by T. last_only computes the logits of the last position only, (B, 1, vocab): all that
        generation needs, and T times less work in the output layer.
        """
        c = self.config
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > c.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={c.block_size}")
        x = self.wte(idx)  # PaLM: no LayerNorm or scaling on the embeddings
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        x = self.ln_f(x)
        if c.logit_scale:  # shared embeddings are N(0,1): keep the logits O(1) (Section 5). Scaling
            x = x * c.d_model ** -0.5  # the d_model-wide input is vocab/d_model times cheaper than the logits
        logits = F.linear(x, self.wte.weight) if self.lm_head is None else self.lm_head(x)
        if targets is None:
            return logits, None
        return logits, lm_losses(logits, targets, c.z_loss)[0]

    def new_cache(self, batch_size: int) -> KVCache:
        p = self.wte.weight
        return KVCache(self.config, batch_size, p.device, p.dtype)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eot_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Append up to max_new_tokens sampled tokens to idx (B, T); returns (B, T + generated).

        temperature 0 is greedy. A sequence that emits eot_id is finished (padded with eot_id after);
        generation stops when all are. on_token(next_tokens) is called after every step (streaming).

        Context rule: the model sees a window of at most block_size tokens, positions counted from the
        window's start (RoPE only sees differences, so this loses nothing). A longer prompt is cropped
        to its last block_size tokens. When the window overflows, it jumps forward to keep the last
        block_size // 2 tokens, and the KV cache is rebuilt from them. Both paths, cached and not,
        follow the same rule, so they compute the same function.
        """
        if max_new_tokens <= 0:
            raise UserError(f"max_new_tokens={max_new_tokens} must be positive")
        if idx.shape[1] == 0:
            raise UserError("the prompt is empty: give at least one token to continue from")
        check_sampling_args(temperature, top_k, top_p)
        block_size = self.config.block_size
        start = max(0, idx.shape[1] - block_size)  # the window is idx[:, start:]
        cache = self.new_cache(idx.shape[0]) if use_cache else None
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if idx.shape[1] - start > block_size:
                start = idx.shape[1] - max(1, block_size // 2)
                if cache is not None:
                    cache.reset()  # positions restart at the new window's start: re-encode it
            # With a cache only the tokens it has not seen go in: the whole window once, then one a step.
            seen = cache.length if cache is not None else 0
            logits, _ = self(idx[:, start + seen:], cache=cache, last_only=True)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
            if eot_id is not None:
                next_token = torch.where(finished, eot_id, next_token)
                finished |= next_token == eot_id
            idx = torch.cat([idx, next_token[:, None]], dim=1)
            if on_token is not None:
                on_token(next_token)
            if eot_id is not None and finished.all():  # (no GPU sync per token when there is no eot)
                break
        return idx


def gpt2_config(**overrides) -> PaLMConfig:
    """The GPT-2 architecture from the same code: every PaLM switch set to GPT-2's choice."""
    base = dict(parallel_block=False, mlp="gelu", pos_emb="learned", logit_scale=False, z_loss=0.0,
                bias=True, tie_embeddings=True, init="gpt2")
    base.update(overrides)
    if "n_kv_head" not in base:
        base["n_kv_head"] = base.get("n_head", PaLMConfig.n_head)
    return PaLMConfig(**base)


def config_from_preset(name: str, **overrides) -> PaLMConfig:
    if name not in MODEL_PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return PaLMConfig(**{**MODEL_PRESETS[name], **overrides})


def param_count_formula(c: PaLMConfig) -> int:
    """Closed-form parameter count, used by tests and to size models without building them."""
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


__all__ = ["PaLMConfig", "PaLM", "KVCache", "MODEL_PRESETS", "lm_losses", "gpt2_config", "config_from_preset",
           "param_count_formula", "rope_tables", "apply_rope"]
