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

import torch
from torch import nn

from nanopalm.errors import UserError

OPTIMIZERS = ("adamw", "adafactor")
LR_SCHEDULES = ("cosine", "palm", "constant")
WEIGHT_DECAY_MODES = ("decoupled", "lr_squared", "none")
RAMP_FORMAT = (
    "expected 'STEP:MULT,...' with increasing STEPs >= 0 and integer MULTs >= 1, e.g. '50000:2,115000:4'"
)


@dataclass
class OptimConfig:
    optimizer: str = field(default="adamw", metadata={"help": "adamw | adafactor (PaLM's, unfactored)"})
    learning_rate: float = field(default=6e-4, metadata={"help": "peak learning rate (paper: 1e-2)"})
    min_lr: float = field(default=6e-5, metadata={"help": "final learning rate of the cosine schedule"})
    lr_schedule: str = field(
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
    weight_decay_mode: str = field(
        default="decoupled",
        metadata={"help": "decoupled | lr_squared (PaLM: param *= 1 - lr^2) | none; matrices only"},
    )
    beta1: float = field(default=0.9, metadata={"help": "momentum (AdamW and Adafactor)"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW second-moment decay"})
    beta2_decay: float = field(
        default=0.8, metadata={"help": "Adafactor second-moment decay: beta2 = 1 - k^-beta2_decay"}
    )
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0 = off)"})
    batch_ramp: str = field(
        default="",
        metadata={"help": "grad-accumulation multiplier from STEP on: 'STEP:MULT,...' ('' = off)"},
    )

    def validate(self) -> None:
        """Raise UserError on the first bad value, saying how to fix it."""
        choices = (
            ("optimizer", OPTIMIZERS),
            ("lr_schedule", LR_SCHEDULES),
            ("weight_decay_mode", WEIGHT_DECAY_MODES),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise UserError(f"unknown {name} {getattr(self, name)!r}: use one of {', '.join(allowed)}")
        if not self.learning_rate > 0:
            raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise UserError(f"min_lr must be in [0, learning_rate={self.learning_rate}], got {self.min_lr}")
        if self.warmup_iters < 0:
            raise UserError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.lr_schedule == "cosine" and self.lr_decay_iters <= self.warmup_iters:
            raise UserError(
                f"lr_decay_iters ({self.lr_decay_iters}) must be > warmup_iters ({self.warmup_iters})"
            )
        if self.palm_constant_steps < 1:
            raise UserError(f"palm_constant_steps must be >= 1, got {self.palm_constant_steps}")
        if self.weight_decay < 0:
            raise UserError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.beta2_decay > 0:
            raise UserError(f"beta2_decay must be > 0, got {self.beta2_decay}")
        if self.grad_clip < 0:
            raise UserError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _parse_ramp(self.batch_ramp)


# ----------------------------------------------------------------------------- Adafactor


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.square().mean().sqrt()


class PaLMAdafactor(torch.optim.Optimizer):
    """Adafactor as PaLM ran it (PaLM Section 5; T5X `t5x/adafactor.py`, `apply_param_gradient`).

    Unfactored second moment (so it is Adam with "parameter scaling"), momentum, update clipping.
    Per parameter, with k its 1-based step count, all on the pre-update param p:
        beta2 = 1 - k^-beta2_decay
        v = beta2 * v + (1 - beta2) * (g^2 + eps1)
        u = g / sqrt(v);  u /= max(1, RMS(u) / clip_threshold)
        u *= lr * max(eps2, RMS(p))            # parameter scaling, applied to every param as in T5X
        m = beta1 * m + (1 - beta1) * u        # momentum AFTER scaling and clipping (T5X order)
        p = (1 - lr * weight_decay) * p - m    # decay the pre-update param, then subtract
    `weight_decay` follows torch.optim.AdamW's convention (multiplied by lr); PaLM's lr^2 decay is
    weight_decay = lr, which `set_lr` keeps up to date every step.
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
    ):
        defaults = dict(
            lr=lr,
            beta1=beta1,
            beta2_decay=beta2_decay,
            eps1=eps1,
            eps2=eps2,
            clip_threshold=clip_threshold,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta1 = group["lr"], group["beta1"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PaLMAdafactor does not support sparse gradients")
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                beta2 = 1.0 - state["step"] ** -group["beta2_decay"]
                v, m = state["v"], state["m"]
                # eps1 is added to g^2 (not to sqrt(v)), so v > 0 even where g == 0.
                v.mul_(beta2).add_(g.square().add_(group["eps1"]), alpha=1.0 - beta2)
                u = g / v.sqrt()
                # Update clipping caps the update's RMS: it guards against a stale v after a spike.
                u.div_((_rms(u) / group["clip_threshold"]).clamp_(min=1.0))
                # Parameter scaling: the step is relative to the size of the parameter (PaLM Sec. 5).
                u.mul_(_rms(p).clamp_(min=group["eps2"]) * lr)
                m.mul_(beta1).add_(u, alpha=1.0 - beta1)
                p.mul_(1.0 - lr * group["weight_decay"]).sub_(m)
        return loss


# ----------------------------------------------------------------------------- building


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW or PaLMAdafactor over two groups: matrices (decayed) and 1-D params (never decayed).

    Matrices include the (tied) embedding; LayerNorm weights and any biases are not decayed
    (the seed decayed exactly the wrong set, PALM.md defect 4). The lr and decay are set for step 0.
    """
    cfg.validate()
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight is listed once
    decay_wd = cfg.weight_decay if cfg.weight_decay_mode == "decoupled" else 0.0
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": decay_wd, "decay": True},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "decay": False},
    ]
    lr = lr_at(0, cfg)
    if cfg.optimizer == "adamw":
        fused = device_type == "cuda"
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=fused, foreach=None if fused else True
        )
    else:
        optimizer = PaLMAdafactor(groups, lr=lr, beta1=cfg.beta1, beta2_decay=cfg.beta2_decay)
    set_lr(optimizer, lr, cfg)
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float, cfg: OptimConfig) -> None:
    """Set this step's lr; in lr_squared mode also the decay, so param *= 1 - lr * lr exactly once.

    Expects the param groups of `build_optimizer` (each has a `decay` flag).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group["decay"] and cfg.weight_decay_mode == "lr_squared":
            # Both optimizers decay by lr * weight_decay, so weight_decay = lr gives PaLM's lr^2.
            # The seed passed lr^2 here and so decayed by lr^3 (PALM.md defect 4).
            group["weight_decay"] = lr


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
