"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): finetune a model by learning,
for some of its weight matrices W, a low-rank change B A (A: r x d_in, B: d_out x r, r small) while W stays
frozen. The layer computes W x + (alpha / r) B A x; B starts at zero, so the adapted model starts as the base
model exactly, and only A and B (a fraction of a percent of PaLM-8B at r = 16) take gradients and optimizer
state. Merged (W + (alpha / r) B A), the adapters leave a plain model that computes the same logits.

Written in plain PyTorch rather than through peft: nanoPALM's model is not a transformers model, and its
fused input projection stacks q, k, v, gate and up in ONE matrix (PaLM Section 2). Each of those logical
matrices gets its own adapter here, exactly what peft gives Cohere's separate q_proj ... up_proj once the
model is exported (docs/HF.md), so an adapter means the same thing on either side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopalm.errors import UserError

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # transformers' names: q_proj ... o_proj, gate/up/down_proj


def parse_targets(text: str) -> tuple[str, ...]:
    """'q,v' -> ('q', 'v'); a ValueError naming the unknown names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise ValueError(f"lora_targets={text!r}: choose from {','.join(TARGETS)} (comma-separated)")
    return names


def is_adapter(name: str) -> bool:
    """Whether a parameter (or state-dict key) is a LoRA adapter's: they alone train in a LoRA run."""
    return ".adapter." in name


class LoRA(nn.Module):
    """The adapters of one linear layer whose output stacks the matrices `splits` ({name: rows}, in order; kept as
    `outputs`): each of them named in `targets` gets its own A_name (r x d_in) and B_name (rows x r); the others
    none."""

    def __init__(self, d_in: int, splits: dict[str, int], targets: tuple[str, ...], rank: int, alpha: float,
                 dropout: float) -> None:
        super().__init__()
        self.outputs, self.rank, self.scale = dict(splits), rank, alpha / rank
        self.names = [n for n in splits if n in targets]
        self.A = nn.ParameterDict({n: nn.Parameter(torch.empty(rank, d_in)) for n in self.names})
        self.B = nn.ParameterDict({n: nn.Parameter(torch.empty(splits[n], rank)) for n in self.names})
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., sum of splits): (alpha / r) B A x in each adapted matrix's rows, 0 elsewhere."""
        z = F.linear(self.drop(x), torch.cat([self.A[n] for n in self.names])) * self.scale  # every A in one matmul
        zs = dict(zip(self.names, z.split(self.rank, dim=-1), strict=True))
        return torch.cat([F.linear(zs[n], self.B[n]) if n in zs else z.new_zeros(*z.shape[:-1], rows)
                          for n, rows in self.outputs.items()], dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """(sum of splits, d_in): what merging adds to the layer's weight, (alpha / r) B A in the adapted rows."""
        a = self.A[self.names[0]]
        return torch.cat([self.scale * self.B[n] @ self.A[n] if n in self.A else a.new_zeros(rows, a.shape[1])
                          for n, rows in self.outputs.items()])


@torch.no_grad()
def merge_(model: nn.Module) -> None:
    """Fold every adapter into its layer's weight, in place (W += (alpha / r) B A), and remove the adapters."""
    for module in model.modules():
        if getattr(module, "adapter", None) is not None:
            module.weight += module.adapter.delta_weight().to(module.weight.dtype)
            module.adapter = None
    if getattr(model, "config", None) is not None and model.config.lora_rank:  # now a plain model of that shape
        model.config = dataclasses.replace(model.config, lora_rank=0)
        model.requires_grad_(True)


def fingerprint(meta: dict) -> str:
    """One SHA-256 over a checkpoint's file checksums: it changes when any of its files does."""
    return hashlib.sha256(json.dumps(meta.get("sha256"), sort_keys=True).encode()).hexdigest()


def lora_base_record(start) -> dict:
    """What a LoRA run records of the base it adapts (`start`: the run's checkpoint.StartPoint): the base
    checkpoint's directory and fingerprint."""
    if start.resume:
        return start.checkpoint.meta["lora_base"]
    if "lora_base" in start.checkpoint.meta:
        raise UserError(f"--init_from={start.checkpoint.run_dir} is a LoRA run: merge it into a plain run first "
                        f"(python -m nanopalm.convert merge {start.checkpoint.run_dir} OUT) and start from that")
    return {"checkpoint": str(start.checkpoint.path.resolve()), "fingerprint": fingerprint(start.checkpoint.meta)}


def lora_base(checkpoint, verify: Callable):
    """The base checkpoint a LoRA checkpoint's adapters belong to, as `verify(path)` returns it (its files
    checked against their checksums), and checked to be the one the adapters were trained on; None for any
    other checkpoint (nanopalm.checkpoint's Checkpoint)."""
    record = checkpoint.meta.get("lora_base")
    if record is None:
        return None
    path = Path(record["checkpoint"])
    if not path.is_dir():
        raise UserError(f"the base checkpoint of LoRA run {checkpoint.run_dir}, {path}, is gone: restore it there "
                        "(its adapters mean nothing without it)")
    base = verify(path)
    if fingerprint(base.meta) != record["fingerprint"]:
        raise UserError(f"the base checkpoint {path} changed since LoRA run {checkpoint.run_dir} was trained on it: "
                        "restore the original, or train new adapters on this base")
    return base


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
