"""The PaLM model, in one file you can read top to bottom. Every piece of its math is here in plain PyTorch;
fused.py holds faster drop-ins for two of them (the output layer's loss, and the elementwise work after a
block's input matmul), switched by PaLMConfig.fused and tested equal to the plain lines here.

PaLM (Chowdhery et al. 2022, Section 2) is a decoder-only transformer with a handful of changes to GPT:
  - a *parallel* block: y = x + Attention(LN(x)) + MLP(LN(x)), one LayerNorm, one fused input matmul;
  - multi-query attention: many query heads, ONE key/value head (a KV cache n_head times smaller);
  - rotary position embeddings (RoPE) instead of learned positions;
  - SwiGLU in the MLP, no biases anywhere, tied input/output embeddings with logits scaled by 1/sqrt(d);
  - an auxiliary z-loss, 1e-4 * log^2(Z), that keeps the softmax normaliser near 1.
Every one of those choices is a switch in PaLMConfig. Set all of them to GPT-2's choices and the same code
builds the GPT-2 architecture (serial pre-LN blocks), which the benchmarks and ablations compare against.

Shapes in comments: B batch, T tokens, C d_model, H query heads, K key/value heads, D head size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopalm.fused import linear_cross_entropy, split_projection  # the drop-ins (PaLMConfig.fused)
from nanopalm.lora import LoRA, is_adapter, parse_targets  # finetuning adapters (PaLMConfig.lora_rank)


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
    mlp: Literal["swiglu", "gelu"] = field(default="swiglu", metadata={"help": "MLP: swiglu (PaLM) | gelu (GPT-2)"})
    pos_emb: Literal["rope", "learned"] = field(default="rope", metadata={"help": "rope (PaLM) | learned (GPT-2)"})
    rope_base: float = field(default=10000.0, metadata={"help": "RoPE base frequency"})
    logit_scale: bool = field(default=True, metadata={"help": "scale logits by 1/sqrt(d_model) (PaLM)"})
    z_loss: float = field(default=1e-4, metadata={"help": "z-loss coefficient on log^2(Z); 0 = off"})
    bias: bool = field(default=False, metadata={"help": "biases in linear layers and LayerNorm (GPT-2)"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share input and output embeddings"})
    init: Literal["palm", "gpt2"] = field(default="palm", metadata={"help": "palm (fan-in, E~N(0,1)) | gpt2"})
    fused: bool = field(default=True, metadata={"help": "fused.py's drop-ins: the same math in less memory and time "
                                                        "(docs/BENCHMARKS.md); False = model.py's plain lines"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA adapters of this rank, base weights frozen; 0 = off"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale: adapters add (alpha / rank) B A x"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    lora_targets: str = field(default="q,k,v,o,gate,up,down", metadata={"help": "matrices given adapters: "
                                                                                "q,k,v,o,gate,up,down"})

    def __post_init__(self) -> None:
        """Fill in the derived sizes and refuse shapes that cannot work (ValueError, saying how to fix it)."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "d_model"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.head_dim < 0 or self.d_ff < 0:
            raise ValueError("head_dim and d_ff must be positive (or 0 for their defaults)")
        if self.head_dim == 0:
            if self.d_model % self.n_head:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                                 "change one of them or set head_dim explicitly")
            self.head_dim = self.d_model // self.n_head
        self.d_ff = self.d_ff or 4 * self.d_model
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of dimensions: head_dim={self.head_dim} must be even")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.z_loss < 0:
            raise ValueError(f"z_loss={self.z_loss} must be >= 0")
        if self.lora_rank < 0 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_rank must be >= 0 (0 = off), lora_alpha > 0 and lora_dropout in [0, 1)")
        parse_targets(self.lora_targets)  # a ValueError naming what it takes

    def to_dict(self) -> dict:
        return asdict(self)

    def kv_cache_bytes(self, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of a full KV cache: K and V, every layer, n_kv_head heads (1 with multi-query)."""
        per_layer = batch_size * self.n_kv_head * self.block_size * self.head_dim * dtype.itemsize
        return 2 * self.n_layer * per_layer


class LayerNorm(nn.Module):
    """LayerNorm whose bias is optional: PaLM has none (Section 2, "No biases")."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class FusedLinear(nn.Linear):
    """Several projections of one input stacked into ONE matmul (PaLM Section 2: the parallel block's q, k, v
    and MLP inputs), or one projection alone. `splits` names the logical matrices stacked in the weight's rows,
    in order: the blocks cut the output by it, PaLM's Adafactor scales each logical matrix by its own RMS, not
    the stack's, and LoRA gives each its own adapter (nanopalm/lora.py; `adapter` is None without LoRA)."""

    def __init__(self, d_in: int, splits: dict[str, int], bias: bool) -> None:
        super().__init__(d_in, sum(splits.values()), bias=bias)
        self.splits = splits
        self.adapter: LoRA | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.adapter is None else y + self.adapter(x)  # W x + (alpha / r) B A x

    def cut(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This matmul's output h cut into its projections, in `splits` order."""
        return h.split(list(self.splits.values()), dim=-1)


def rope_tables(head_dim: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim / 2): position p's angle p * base^(-2i / head_dim) for pair i.

    Dimension i and dimension i + head_dim/2 form one rotation pair ("rotate half" layout) and share one
    angle, which is what makes the rotation norm-preserving and q.k a function of the position
    difference alone (the original nanoPALM's tables mismatched the pairing, so neither held).
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (Su et al. 2021; PaLM Section 2) on x (B, heads, T, D): each pair (a, b) = (x_i, x_{i + D/2})
    turns by its position's angle, (a, b) -> (a cos - b sin, b cos + a sin); cos, sin (T, D/2)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def to_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, n * D) -> (B, n, T, D)."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


class KVCache(nn.Module):
    """One layer's keys and values, preallocated for generation: (B, K, block_size, D) each.

    With multi-query attention K is 1, so the cache is n_head times smaller than a GPT's.
    """

    def __init__(self, batch_size: int, config: PaLMConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (batch_size, config.n_kv_head, config.block_size, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at positions pos..pos+T-1; return every key and value up to there."""
        end = pos + k.shape[2]
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Causal attention of H query heads over K shared key/value heads (K = 1: multi-query)."""

    def __init__(self, c: PaLMConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = c.n_head, c.n_kv_head, c.head_dim, c.dropout
        self.out = FusedLinear(c.n_head * c.head_dim, {"o": c.d_model}, bias=c.bias)
        self.cache: KVCache | None = None  # set by PaLM.setup_cache for generation

    def heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope) -> tuple[torch.Tensor, ...]:
        """The projections (B, T, H * D), (B, T, K * D) twice as heads, q and k rotated by RoPE when given."""
        q, k, v = (to_heads(t, self.head_dim) for t in (q, k, v))
        if rope is not None:  # positions enter through q and k alone (RoPE, Section 2)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor:
        """q (B, H, T, D), k and v (B, K, T, D), as heads() makes them -> (B, T, C)."""
        B, _, T, _ = q.shape
        mask = None
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)  # (B, K, pos + T, D)
            if pos and T > 1:  # new tokens after cached ones: the causal mask aligned to the bottom right
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=q.device).tril(pos)
        # enable_gqa lets SDPA share one K/V head among all query heads without per-head copies of K, V.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU, Swish(x W) * (x V) then W2 (Shazeer 2020; PaLM Section 2), or GPT-2's GELU(x W) then W2.
    The input matrices live in the block's fused projection."""

    def __init__(self, c: PaLMConfig) -> None:
        super().__init__()
        self.swiglu = c.mlp == "swiglu"
        self.out = FusedLinear(c.d_ff, {"down": c.d_model}, bias=c.bias)

    def input_splits(self, c: PaLMConfig) -> dict[str, int]:
        """The input matrices this MLP needs, for the block's fused projection."""
        return {"gate": c.d_ff, "up": c.d_ff} if self.swiglu else {"up": c.d_ff}

    def activation(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = inputs
            return F.silu(gate) * up  # SwiGLU: Swish(x W) * (x V); silu is Swish with beta = 1
        (up,) = inputs
        return F.gelu(up, approximate="tanh")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, d_ff), activated
        return self.out(hidden)


class ParallelBlock(nn.Module):
    """PaLM's block (Section 2): y = x + Attention(LN(x)) + MLP(LN(x)).

    One LayerNorm feeds both branches, so q, k, v and the MLP input come out of ONE matmul.
    """

    def __init__(self, c: PaLMConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(c.d_model, c.bias)
        self.attn, self.mlp = Attention(c), MLP(c)
        qkv = {"q": c.n_head * c.head_dim, "k": c.n_kv_head * c.head_dim, "v": c.n_kv_head * c.head_dim}
        self.in_proj = FusedLinear(c.d_model, qkv | self.mlp.input_splits(c), bias=c.bias)
        self.drop = nn.Dropout(c.dropout)
        self.head_dim, self.fused = c.head_dim, c.fused

    def forward(self, x: torch.Tensor, rope, pos: int = 0) -> torch.Tensor:
        h = self.in_proj(self.norm(x))  # (B, T, q | k | v | gate | up): one matmul for both branches
        if self.fused:  # fused.py: the same pieces, fewer passes over h and a backward without concatenations
            q, k, v, hidden = split_projection(h, self.in_proj.splits, self.head_dim, rope)
        else:
            q, k, v, *mlp_in = self.in_proj.cut(h)
            q, k, v = self.attn.heads(q, k, v, rope)  # (B, H, T, D) and (B, 1, T, D): multi-query
            hidden = self.mlp.activation(*mlp_in)  # silu(gate) * up
        return x + self.drop(self.attn(q, k, v, pos) + self.mlp(hidden))  # the parallel sum


class SerialBlock(nn.Module):
    """GPT-2's pre-LN block: x = x + Attention(LN1(x)), then x = x + MLP(LN2(x))."""

    def __init__(self, c: PaLMConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(c.d_model, c.bias), LayerNorm(c.d_model, c.bias)
        self.attn, self.mlp = Attention(c), MLP(c)
        qkv = {"q": c.n_head * c.head_dim, "k": c.n_kv_head * c.head_dim, "v": c.n_kv_head * c.head_dim}
        self.in_proj = FusedLinear(c.d_model, qkv, bias=c.bias)
        self.mlp_in = FusedLinear(c.d_model, self.mlp.input_splits(c), bias=c.bias)
        self.drop = nn.Dropout(c.dropout)
        self.head_dim, self.fused = c.head_dim, c.fused

    def forward(self, x: torch.Tensor, rope, pos: int = 0) -> torch.Tensor:
        h = self.in_proj(self.norm1(x))
        if self.fused:
            q, k, v = split_projection(h, self.in_proj.splits, self.head_dim, rope)
        else:
            q, k, v = self.attn.heads(*self.in_proj.cut(h), rope)
        x = x + self.drop(self.attn(q, k, v, pos))
        h = self.mlp_in(self.norm2(x))
        if self.fused:
            (hidden,) = split_projection(h, self.mlp_in.splits, self.head_dim, None)
        else:
            hidden = self.mlp.activation(*self.mlp_in.cut(h))
        return x + self.drop(self.mlp(hidden))


def normal_(param: torch.Tensor, std: float) -> None:
    """param ~ N(0, std^2), in place. A parameter sharded by FSDP2 (a DTensor) is drawn whole on its device and
    each rank keeps its own rows: the values of an unsharded init from the same seed, on any number of ranks,
    for the memory of one whole parameter at a time (DTensor's own random ops draw each shard apart)."""
    if not hasattr(param, "placements"):
        nn.init.normal_(param, std=std)
        return
    from torch.distributed.tensor import distribute_tensor

    whole = torch.empty(param.shape, dtype=param.dtype, device=param.device).normal_(std=std)
    param.copy_(distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None))


def lm_losses(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, cross-entropy) of logits (N, vocab) against targets (N,), -1 = not counted (Section 5):
    the LM log-likelihood with no label smoothing, plus z_loss * log^2 Z, which pushes log Z toward 0."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # the softmax in fp32 at least (bf16)
    counted, index = targets != -1, targets.clamp_min(0)[:, None]
    target_log_prob = F.log_softmax(logits, dim=-1).gather(-1, index).squeeze(-1)  # log p(target)
    log_z = logits.gather(-1, index).squeeze(-1) - target_log_prob  # log p = logit - log Z
    ce = -target_log_prob[counted].mean()
    return ce + z_loss * log_z[counted].square().mean(), ce


class LMOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T, vocab), when no targets are given
    loss: torch.Tensor | None  # the training loss, cross-entropy + z-loss: what backward() is called on
    ce: torch.Tensor | None  # the cross-entropy alone, in nats per token: val loss, bits per byte


class PaLM(nn.Module):
    def __init__(self, config: PaLMConfig) -> None:
        super().__init__()
        c = self.config = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.block_size, c.d_model) if c.pos_emb == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        block = ParallelBlock if c.parallel_block else SerialBlock
        self.blocks = nn.ModuleList(block(c) for _ in range(c.n_layer))
        self.norm = LayerNorm(c.d_model, c.bias)
        # The output layer has no bias, as in GPT-2, whatever `bias` says (it governs the blocks' layers).
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.pos_emb == "rope":
            # Not persistent: derived from the config, never stored in checkpoints, and rebuilt by
            # init_weights on the real device after a meta-device construction (distributed.py).
            self.register_buffer("rope_cos", torch.empty(c.block_size, c.head_dim // 2), persistent=False)
            self.register_buffer("rope_sin", torch.empty(c.block_size, c.head_dim // 2), persistent=False)
        if c.lora_rank:  # LoRA: adapters on the chosen matrices of every block, everything else frozen
            targets = parse_targets(c.lora_targets)
            for layer in self.blocks.modules():
                if isinstance(layer, FusedLinear) and any(n in targets for n in layer.splits):
                    layer.adapter = LoRA(layer.in_features, layer.splits, targets, c.lora_rank, c.lora_alpha,
                                         c.lora_dropout)
            for name, param in self.named_parameters():
                param.requires_grad_(is_adapter(name))
        if not self.wte.weight.is_meta:  # a meta-device model (FSDP2's build, the memory planner) holds no values:
            self.init_weights()  # distributed.py initialises it once it has real storage

    @torch.no_grad()
    def init_weights(self) -> None:
        """PaLM (Section 5): kernels N(0, 1/sqrt(fan_in)), embeddings N(0, 1); GPT-2: N(0, 0.02), with the
        residual output projections scaled by 1/sqrt(2 n_layer). Also (re)builds the RoPE tables."""
        c = self.config
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head:
                if c.init == "palm":
                    normal_(module.weight, std=module.in_features ** -0.5)
                else:
                    residual = name.endswith((".attn.out", ".mlp.out"))
                    normal_(module.weight, std=0.02 * ((2 * c.n_layer) ** -0.5 if residual else 1.0))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, LoRA):  # Hu et al.: A Gaussian (here fan-in scaled), B zero: B A = 0 at start
                for name in module.names:
                    normal_(module.A[name], std=module.A[name].shape[1] ** -0.5)
                    nn.init.zeros_(module.B[name])
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        normal_(self.wte.weight, std=1.0 if c.init == "palm" else 0.02)
        if self.wpe is not None:
            normal_(self.wpe.weight, std=0.02)
        if self.lm_head is not None:  # untied: logits O(1) whether or not they are scaled by 1/sqrt(d), never
            std = (1.0 if c.logit_scale else c.d_model ** -0.5) if c.init == "palm" else 0.02  # scaled twice
            normal_(self.lm_head.weight, std=std)
        if c.pos_emb == "rope":
            cos, sin = rope_tables(c.head_dim, c.block_size, c.rope_base)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def num_params(self) -> int:
        """Parameter count, the tied embedding counted once (as in PaLM Appendix B)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token by PaLM Appendix B: 6N + 12 L H Q T."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def output_weight(self) -> torch.Tensor:
        """The (vocab, d_model) output matrix: the input embedding when tied (Section 2)."""
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, pos: int = 0,
                last_only: bool = False) -> LMOutput:
        """idx (B, T), the tokens of positions pos..pos+T-1 -> LMOutput.

        Without targets: the logits (B, T, vocab), or with last_only those of the last position alone
        (B, 1, vocab), all that generation needs. With targets (B, T; -1 = not counted): the losses,
        computed a chunk of tokens at a time without ever holding all the logits (nanopalm/fused.py).
        pos > 0 continues after tokens held in the KV cache (setup_cache)."""
        c = self.config
        B, T = idx.shape
        if pos + T > c.block_size:
            raise ValueError(f"sequence of {pos + T} tokens is longer than block_size={c.block_size}")
        x = self.wte(idx)  # (B, T, C); PaLM: no LayerNorm or scaling on the embeddings
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(pos, pos + T, device=idx.device))
        else:
            rope = (self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T])  # (T, D/2) each
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, pos)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if c.logit_scale:  # shared embeddings are N(0,1): keep the logits O(1) (Section 5). Scaling the
            x = x * c.d_model ** -0.5  # C-wide input is vocab/C times cheaper than scaling the logits
        if targets is None:
            return LMOutput(F.linear(x, self.output_weight()), None, None)
        x, targets = x.reshape(B * T, -1), targets.reshape(-1)
        if c.fused:  # fused.py: the same two losses a chunk of tokens at a time, never all the logits at once
            loss, ce = linear_cross_entropy(x, self.output_weight(), targets, c.z_loss)
            return LMOutput(None, loss, ce)
        loss, ce = lm_losses(F.linear(x, self.output_weight()), targets, c.z_loss)  # (B*T, vocab) logits
        return LMOutput(None, loss, ce.detach())

    def setup_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> None:
        """Give every attention layer a KV cache for `batch_size` sequences, in `dtype` (default: the
        weights'; generation under bf16 autocast keeps a bf16 cache, half the memory)."""
        weight = self.wte.weight
        for block in self.blocks:
            block.attn.cache = KVCache(batch_size, self.config, weight.device, dtype or weight.dtype)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.cache = None


__all__ = ["PaLMConfig", "PaLM", "LMOutput", "KVCache", "FusedLinear", "rope_tables", "apply_rope", "to_heads",
           "lm_losses"]
