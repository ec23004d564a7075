"""Optimizers, learning-rate schedules and the batch-size ramp.

Two recipes live here side by side (see docs/OPTIM.md):
- seed / small-scale: AdamW, cosine schedule, decoupled weight decay on the matrices.
- paper (PaLM Section 5): unfactored Adafactor with parameter scaling, lr 1e-2 then 1/sqrt(k),
  "dynamic" weight decay lr^2, beta2 = 1 - k^-0.8, batch-size ramp.
Schedules and the ramp are pure functions of the step, so any step can be replayed exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from nanopalm.distributed import local_shard
from nanopalm.errors import UserError

RAMP_FORMAT = (
    "expected 'STEP:MULT,...' with increasing STEPs >= 0 and integer MULTs >= 1, e.g. '50000:2,115000:4'"
)


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adafactor"] = field(
        default="adamw", metadata={"help": "adamw | adafactor (PaLM's, unfactored)"})
    learning_rate: float = field(default=6e-4, metadata={"help": "peak learning rate (paper: 1e-2)"})
    min_lr: float | None = field(
        default=None, metadata={"help": "final learning rate of the cosine schedule (None: learning_rate / 10)"})
    lr_schedule: Literal["cosine", "palm", "constant"] = field(
        default="cosine",
        metadata={"help": "cosine (warmup + cosine) | palm (constant, then 1/sqrt(k); no warmup) | constant"},
    )
    warmup_iters: int = field(default=100, metadata={"help": "linear warmup steps (cosine and constant)"})
    lr_decay_iters: int = field(default=5000, metadata={"help": "step at which the cosine reaches min_lr"})
    palm_constant_steps: int = field(
        default=10000, metadata={"help": "palm schedule: steps at constant lr before lr * sqrt(N / k)"}
    )
    weight_decay: float = field(
        default=0.1, metadata={"help": "decoupled decay coefficient (param *= 1 - lr * wd), mode 'decoupled'"}
    )
    weight_decay_mode: Literal["decoupled", "lr_squared", "none"] = field(
        default="decoupled",
        metadata={"help": "decoupled | lr_squared (PaLM: param *= 1 - lr^2) | none; matrices only"},
    )
    beta1: float = field(default=0.9, metadata={"help": "momentum (AdamW and Adafactor)"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW second-moment decay"})
    beta2_decay: float = field(
        default=0.8, metadata={"help": "Adafactor second-moment decay: beta2 = 1 - k^-beta2_decay"}
    )
    cooldown: float = field(
        default=0.0, metadata={"help": "the last fraction of the run (of max_iters, or of max_minutes when time "
                                       "ends it first) over which the lr falls linearly to 0; 0 = none"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0 = off)"})
    batch_ramp: str = field(
        default="",
        metadata={"help": "grad-accumulation multiplier from STEP on: 'STEP:MULT,...' ('' = off)"},
    )

    def __post_init__(self) -> None:
        """ValueError on the first bad value, saying how to fix it (choices are checked by config.py)."""
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.min_lr is None:  # follows learning_rate, so `--learning_rate=3e-5` alone is a valid finetune
            self.min_lr = self.learning_rate / 10
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(f"min_lr must be in [0, learning_rate={self.learning_rate}], got {self.min_lr}")
        if self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.lr_schedule == "cosine" and self.lr_decay_iters <= self.warmup_iters:
            raise ValueError(f"lr_decay_iters ({self.lr_decay_iters}) must be > warmup_iters ({self.warmup_iters})")
        if not 0 <= self.cooldown < 1:
            raise ValueError(f"cooldown must be in [0, 1) (a fraction of the run), got {self.cooldown}")
        if self.palm_constant_steps < 1:
            raise ValueError(f"palm_constant_steps must be >= 1, got {self.palm_constant_steps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.beta2_decay > 0:
            raise ValueError(f"beta2_decay must be > 0, got {self.beta2_decay}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _parse_ramp(self.batch_ramp)


# ----------------------------------------------------------------------------- Adafactor


@dataclass(frozen=True)
class MatrixLayout:
    """How one parameter's rows divide into logical matrices, and which of its rows this rank holds.

    A fused projection stacks q, k, v (and the MLP's gate and up) in one weight's rows; Adafactor's
    statistics belong to each of them (T5X keeps fused matrices apart for exactly this). Under FSDP2 a
    rank holds rows row_start..row_start+local_rows-1, and the statistics are summed over `group`.
    """

    splits: tuple[int, ...]  # rows of each logical matrix, in order; one entry: the whole tensor
    row_start: int = 0
    local_rows: int | None = None  # None: all rows
    group: object = None  # the torch.distributed process group sharing the rows, None if not sharded

    def row_segments(self, device: torch.device) -> torch.Tensor:
        """For each local row, the index of its logical matrix."""
        rows = sum(self.splits) if self.local_rows is None else self.local_rows
        bounds = torch.tensor(self.splits, device=device).cumsum(0)
        return torch.bucketize(torch.arange(self.row_start, self.row_start + rows, device=device), bounds, right=True)


def _row_sum_squares(x: torch.Tensor) -> torch.Tensor:
    """sum of x^2 over each row (each element of a vector), in fp32 at least."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return x.square() if x.dim() == 1 else torch.linalg.vector_norm(x.flatten(1), dim=1).square()


class PaLMAdafactor(torch.optim.Optimizer):
    """Adafactor as PaLM ran it (PaLM Section 5; T5X `t5x/adafactor.py`, `apply_param_gradient`).

    Unfactored second moment (so it is Adam with "parameter scaling"), momentum, update clipping. For each
    logical matrix p (docs/OPTIM.md), with k the global 1-based step, all on the pre-update p:
        beta2 = 1 - k^-beta2_decay
        v = beta2 * v + (1 - beta2) * (g^2 + eps1)
        u = g / sqrt(v);  u /= max(1, RMS(u) / clip_threshold)
        u *= lr * max(eps2, RMS(p))            # parameter scaling, applied to every param as in T5X
        m = beta1 * m + (1 - beta1) * u        # momentum AFTER scaling and clipping (T5X order)
        p = (1 - lr * weight_decay) * p - m    # decay the pre-update param, then subtract
    `weight_decay` follows torch.optim.AdamW's convention (multiplied by lr); PaLM's lr^2 decay is
    weight_decay = lr, which `apply_schedule` keeps up to date every step, together with lr and k.

    k is one count for every parameter, as in T5X: the group's "step", which `step()` advances and the
    trainer sets to its own step first, so a step that the fp16 grad scaler skips still counts.
    Elementwise work runs as multi-tensor (torch._foreach_*) operations over all parameters at once; the
    RMS statistics come from one reduction per tensor and, under FSDP2, one all-reduce a step in all.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2_decay: float = 0.8,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
        layouts: dict[torch.Tensor, MatrixLayout] | None = None,
    ):
        defaults = dict(lr=lr, beta1=beta1, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2,
                        clip_threshold=clip_threshold, weight_decay=weight_decay, step=0)
        super().__init__(params, defaults)
        self.layouts = layouts or {}
        self._segments: dict[torch.Tensor, torch.Tensor] = {}  # param -> its local rows' matrix index

    def _layout(self, p: torch.Tensor) -> MatrixLayout:
        return self.layouts.get(p) or MatrixLayout((p.shape[0] if p.dim() else 1,))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("PaLMAdafactor does not support sparse gradients")
            group["step"] += 1
            self._update(group, params)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, beta1, k = group["lr"], group["beta1"], group["step"]
        beta2 = 1.0 - k ** -group["beta2_decay"]
        for p in params:
            if not self.state[p]:
                self.state[p]["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.state[p]["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # Under FSDP2 these are DTensors: work on the local shards (in place, so the DTensors see it).
        local = [local_shard(t) for t in params]
        grads = [local_shard(p.grad) for p in params]
        vs = [local_shard(self.state[p]["v"]) for p in params]
        ms = [local_shard(self.state[p]["m"]) for p in params]
        # v = beta2 v + (1 - beta2)(g^2 + eps1): eps1 keeps v > 0 where g == 0.
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
        torch._foreach_add_(vs, (1.0 - beta2) * group["eps1"])
        updates = torch._foreach_rsqrt(vs)  # u = g / sqrt(v), as g * rsqrt(v): no division pass
        torch._foreach_mul_(updates, grads)
        # RMS of each logical matrix, of the update and of the parameter (docs/OPTIM.md).
        rms_u, rms_p = self._matrix_rms(params, updates, local)
        # Update clipping caps the update's RMS (a guard against a stale v after a spike); parameter
        # scaling makes the step relative to the size of the matrix (PaLM Section 5).
        scales = [lr * rp.clamp(min=group["eps2"]) / (ru / group["clip_threshold"]).clamp(min=1.0)
                  for ru, rp in zip(rms_u, rms_p, strict=True)]
        for p, u, scale in zip(params, updates, scales, strict=True):
            per_row = scale[self._segments[p]]
            u.mul_(per_row.view(-1, *([1] * (u.dim() - 1))).to(u.dtype))
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, updates, alpha=1.0 - beta1)
        torch._foreach_mul_(local, 1.0 - lr * group["weight_decay"])
        torch._foreach_sub_(local, ms)

    def _matrix_rms(self, params: list[torch.Tensor], updates: list[torch.Tensor],
                    local: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per parameter, the RMS of each of its logical matrices, of the update and of the parameter."""
        sums, groups = [], []
        for p, u, x in zip(params, updates, local, strict=True):
            layout = self._layout(p)
            if p not in self._segments:
                self._segments[p] = layout.row_segments(x.device)
            segments, n = self._segments[p], len(layout.splits)
            both = torch.zeros(2, n, device=x.device, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)
            both[0].index_add_(0, segments, _row_sum_squares(u).to(both.dtype))
            both[1].index_add_(0, segments, _row_sum_squares(x).to(both.dtype))
            sums.append(both)
            groups.append(layout.group)
        _all_reduce_sums(sums, groups)
        rms_u, rms_p = [], []
        for p, both in zip(params, sums, strict=True):
            layout = self._layout(p)
            numel = torch.tensor(layout.splits, device=both.device, dtype=both.dtype) * math.prod(p.shape[1:])
            rms = (both / numel).sqrt()
            rms_u.append(rms[0])
            rms_p.append(rms[1])
        return rms_u, rms_p


def _all_reduce_sums(sums: list[torch.Tensor], groups: list) -> None:
    """Sum the sharded parameters' statistics over their ranks: one all-reduce for all of them."""
    sharded = [i for i, g in enumerate(groups) if g is not None]
    if not sharded:
        return
    import torch.distributed as dist

    flat = torch.cat([sums[i].flatten() for i in sharded])
    dist.all_reduce(flat, group=groups[sharded[0]])
    for i, part in zip(sharded, flat.split([sums[i].numel() for i in sharded]), strict=True):
        sums[i].copy_(part.view_as(sums[i]))


# ----------------------------------------------------------------------------- building


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW or PaLMAdafactor over two groups: matrices (decayed) and 1-D params (never decayed).

    Matrices include the (tied) embedding; LayerNorm weights and any biases are not decayed (the
    original nanoPALM decayed exactly the wrong set). The lr, decay and step are set for step 0.
    Build it after sharding the model (FSDP2 replaces the parameters with DTensors).
    """
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight is listed once
    decay_wd = cfg.weight_decay if cfg.weight_decay_mode == "decoupled" else 0.0
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": decay_wd, "decay": True},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "decay": False},
    ]
    if cfg.optimizer == "adamw":
        fused = device_type == "cuda"
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused, foreach=None if fused else True
        )
    else:
        optimizer = PaLMAdafactor(groups, beta1=cfg.beta1, beta2_decay=cfg.beta2_decay, layouts=matrix_layouts(model))
    apply_schedule(optimizer, 0, cfg)
    return optimizer


def matrix_layouts(model: nn.Module) -> dict[torch.Tensor, MatrixLayout]:
    """Each parameter's logical matrices (a FusedLinear's `splits`) and, for an FSDP2 DTensor, its rows here."""
    splits = {m.weight: tuple(m.splits.values()) for m in model.modules() if hasattr(m, "splits")}
    layouts = {}
    for p in model.parameters():
        rows = p.shape[0] if p.dim() else 1
        layout = MatrixLayout(splits.get(p, (rows,)))
        if hasattr(p, "device_mesh"):  # FSDP2 shards dim 0 as torch.chunk does: equal chunks, the last short
            mesh = p.device_mesh
            chunk = -(-rows // mesh.size())
            start = min(mesh.get_local_rank() * chunk, rows)
            layout = MatrixLayout(layout.splits, start, min(chunk, rows - start), mesh.get_group())
        layouts[p] = layout
    return layouts


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, cfg: OptimConfig, scale: float = 1.0) -> float:
    """Set everything that follows the step before `optimizer.step()`: the lr (the schedule's times `scale`,
    the cooldown's factor: nanopalm/budget.py), the lr^2 decay in lr_squared mode (so param *= 1 - lr * lr
    exactly once), and Adafactor's global step count. Returns the lr. Expects the param groups of
    `build_optimizer` (each has a `decay` flag)."""
    lr = lr_at(step, cfg) * scale
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group["decay"] and cfg.weight_decay_mode == "lr_squared":
            # Both optimizers decay by lr * weight_decay, so weight_decay = lr gives PaLM's lr^2. The
            # original nanoPALM passed lr^2 here and so decayed by lr^3.
            group["weight_decay"] = lr
        if isinstance(optimizer, PaLMAdafactor):
            group["step"] = step  # steps done; step() counts this one (T5X: one global count)
    return lr


# ----------------------------------------------------------------------------- schedules


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate at 0-based `step`; a pure function, so resuming and replaying are exact."""
    lr = cfg.learning_rate
    if cfg.lr_schedule == "palm":
        # PaLM Section 5: lr for the first N steps, then lr * sqrt(N / k): continuous at k = N, and
        # with lr = 1e-2, N = 10^4 it is exactly the paper's 1/sqrt(k). No warmup in the paper.
        return lr * math.sqrt(cfg.palm_constant_steps / max(step, cfg.palm_constant_steps))
    if step < cfg.warmup_iters:
        return lr * (step + 1) / cfg.warmup_iters  # never 0, reaches lr on the last warmup step
    if cfg.lr_schedule == "constant":
        return lr
    if step >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - cfg.min_lr)


# ----------------------------------------------------------------------------- batch ramp


@functools.lru_cache(maxsize=16)
def _parse_ramp(ramp: str) -> tuple[tuple[int, int], ...]:
    if not ramp.strip():
        return ()
    out: list[tuple[int, int]] = []
    for item in ramp.split(","):
        try:
            step_s, mult_s = item.split(":")
            step, mult = int(step_s), int(mult_s)
        except ValueError:
            raise UserError(f"bad batch_ramp {ramp!r}: {RAMP_FORMAT}") from None
        if step < 0 or mult < 1 or (out and step <= out[-1][0]):
            raise UserError(f"bad batch_ramp {ramp!r}: {RAMP_FORMAT}")
        out.append((step, mult))
    return tuple(out)


def micro_steps_at(step: int, base_micro_steps: int, ramp: str) -> int:
    """Gradient-accumulation micro-steps at `step`: base times the last ramp multiplier reached.

    PaLM Section 5 ramps the batch 512 -> 1024 -> 2048 sequences at steps 50k and 115k, which is
    ramp "50000:2,115000:4" with a fixed micro-batch size.
    """
    mult = 1
    for start, m in _parse_ramp(ramp):
        if step >= start:
            mult = m
    return base_micro_steps * mult
