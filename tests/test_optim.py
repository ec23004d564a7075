"""Optimizer, schedules and batch ramp: checked against numbers derived by hand, not against the code."""

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from nanopalm.config import build_config
from nanopalm.errors import UserError
from nanopalm.model import FusedLinear, PaLM, PaLMConfig
from nanopalm.optim import (
    OptimConfig,
    PaLMAdafactor,
    apply_schedule,
    build_optimizer,
    lr_at,
    matrix_layouts,
    micro_steps_at,
)


def set_lr(optimizer, step: int, lr: float, cfg: OptimConfig) -> None:
    """apply_schedule at `step`, with a given lr instead of the schedule's (a constant schedule at lr)."""
    constant = dataclasses.replace(cfg, lr_schedule="constant", learning_rate=lr, warmup_iters=0, min_lr=0.0)
    apply_schedule(optimizer, step, constant)


class Tiny(nn.Module):
    """Every kind of parameter the optimizer has to sort: tied embedding, kernel, norm scale, bias."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6, bias=False)
        self.ln = nn.LayerNorm(6, bias=False)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.wte.weight  # tied, as in PaLM
        self.bias = nn.Parameter(torch.full((6,), 0.5))

    def forward(self, idx):
        return self.head(self.ln(self.proj(self.wte(idx))) + self.bias)


# ----------------------------------------------------------------------------- Adafactor


def adafactor_reference(p0, grads, lrs, wd_mask, beta1=0.9, decay=0.8, eps1=1e-30, eps2=1e-3):
    """The PALM.md / T5X Adafactor equations, re-derived in float64 numpy. Returns params and clip log."""
    p, v, m = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    clipped, floored = [], []
    for k, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        beta2 = 1.0 - k**-decay
        v = beta2 * v + (1.0 - beta2) * (g * g + eps1)
        u = g / np.sqrt(v)
        denom = max(1.0, np.sqrt(np.mean(u * u)))
        clipped.append(denom > 1.0)
        u = u / denom
        scale = max(eps2, np.sqrt(np.mean(p * p)))
        floored.append(scale == eps2)
        m = beta1 * m + (1.0 - beta1) * (lr * scale * u)
        p = (1.0 - (lr * lr if wd_mask else 0.0)) * p - m
    return p, clipped, floored


def test_adafactor_matches_hand_derived_reference():
    rng = np.random.default_rng(0)
    lrs = [0.2, 0.05, 0.3, 0.1, 0.25, 0.15]
    cases = {  # name: (initial value, decayed?)
        "matrix": (rng.normal(size=(5, 7)), True),
        "vector": (1.0 + 0.1 * rng.normal(size=7), False),
        "tiny_matrix": (1e-4 * rng.normal(size=(3, 4)), True),  # RMS < eps2: exercises the floor
    }
    # growing gradients, so a stale v makes RMS(u) > 1 and update clipping has to act
    grads = {
        n: [(1 + 3 * i) * rng.normal(size=v0.shape) for i in range(len(lrs))] for n, (v0, _) in cases.items()
    }
    params = {n: nn.Parameter(torch.tensor(v, dtype=torch.float64)) for n, (v, _) in cases.items()}
    opt = PaLMAdafactor(
        [
            {"params": [params[n] for n, (_, d) in cases.items() if d], "weight_decay": 0.0, "decay": True},
            {"params": [params["vector"]], "weight_decay": 0.0, "decay": False},
        ]
    )
    cfg = OptimConfig(optimizer="adafactor", weight_decay_mode="lr_squared")
    for i, lr in enumerate(lrs):
        set_lr(opt, i, lr, cfg)
        for n, p in params.items():
            p.grad = torch.tensor(grads[n][i])
        opt.step()
    for n, (v0, decayed) in cases.items():
        want, clipped, floored = adafactor_reference(v0, grads[n], lrs, decayed)
        np.testing.assert_allclose(params[n].detach().numpy(), want, rtol=1e-12, atol=1e-15, err_msg=n)
        assert any(clipped), n  # otherwise the test would not see a broken clip
        assert all(floored) == (n == "tiny_matrix"), n
    assert opt.param_groups[0]["step"] == len(lrs)


def test_adafactor_first_step_closed_form():
    # k = 1: beta2 = 0, v = g^2 + eps1, u = sign(g); m = 0.1 * lr * RMS(p) * sign(g).
    p = nn.Parameter(torch.tensor([[3.0, -4.0], [0.0, 0.0]], dtype=torch.float64))  # RMS = 2.5
    opt = PaLMAdafactor([p], lr=0.1)
    p.grad = torch.tensor([[2.0, -0.5], [1e-3, -7.0]], dtype=torch.float64)
    opt.step()
    want = np.array([[3.0, -4.0], [0.0, 0.0]]) - 0.1 * 0.1 * 2.5 * np.array([[1, -1], [1, -1]])
    np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12)


# ----------------------------------------------------------------------------- weight decay


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize(
    "mode, factor",
    [
        ("lr_squared", lambda lr: 1 - lr * lr),
        ("decoupled", lambda lr: 1 - lr * 0.1),
        ("none", lambda lr: 1.0),
    ],
)
def test_weight_decay_modes_with_zero_gradient(optimizer, mode, factor):
    torch.manual_seed(0)
    model = Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OptimConfig(optimizer=optimizer, weight_decay_mode=mode, weight_decay=0.1, learning_rate=0.3)
    opt = build_optimizer(model, cfg, "cpu")
    lrs = [0.3, 0.1, 0.25, 0.05]
    for i, lr in enumerate(lrs):
        set_lr(opt, i, lr, cfg)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    shrink = math.prod(factor(lr) for lr in lrs)  # lr_squared: 0.91*0.99*0.9375*0.9975 ~ 0.8425
    for n, p in model.named_parameters():
        want = before[n] * (shrink if p.dim() >= 2 else 1.0)
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=n)


def test_param_groups_split_matrices_from_vectors():
    model = Tiny()
    opt = build_optimizer(model, OptimConfig(), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    split = {g["decay"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert split == {True: ["proj.weight", "wte.weight"], False: ["bias", "ln.weight"]}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)


def test_build_sets_step_zero_lr_and_lr_squared_decay():
    cfg = OptimConfig(
        optimizer="adafactor", learning_rate=1e-2, lr_schedule="palm", weight_decay_mode="lr_squared"
    )
    opt = build_optimizer(Tiny(), cfg, "cpu")
    assert isinstance(opt, PaLMAdafactor)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(1e-2, 1e-2), (1e-2, 0.0)]


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_state_dict_resume_is_bitwise_exact(optimizer):
    cfg = OptimConfig(optimizer=optimizer, learning_rate=1e-2, warmup_iters=2, weight_decay_mode="lr_squared")
    idx = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))

    def train(model, opt, steps):
        for step in steps:
            apply_schedule(opt, step, cfg)
            model.zero_grad(set_to_none=True)
            model((idx + step) % 11).square().mean().backward()
            opt.step()

    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, cfg, "cpu")
    train(model, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, range(3, 6))

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = Tiny()
    resumed.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(resumed, cfg, "cpu")
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, range(3, 6))
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


# ----------------------------------------------------------------------------- schedules


def test_palm_schedule_exact_values_and_continuity():
    cfg = OptimConfig(lr_schedule="palm", learning_rate=1e-2, palm_constant_steps=10000)
    assert lr_at(0, cfg) == lr_at(9999, cfg) == lr_at(10000, cfg) == 1e-2
    for k in (10001, 40000, 250000):
        assert lr_at(k, cfg) == pytest.approx(1 / math.sqrt(k), rel=1e-12)  # the paper's 1/sqrt(k)
    assert lr_at(40000, cfg) == pytest.approx(5e-3, rel=1e-12)
    assert abs(lr_at(10001, cfg) - lr_at(10000, cfg)) < 1e-6
    small = OptimConfig(lr_schedule="palm", learning_rate=6e-4, palm_constant_steps=100)
    assert lr_at(400, small) == pytest.approx(3e-4, rel=1e-12)


def test_cosine_schedule_exact_values_and_continuity():
    cfg = OptimConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # halfway: mean of lr and min_lr
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert 0 < lr_at(109, cfg) - 1e-4 < 3e-7  # continuous into min_lr at lr_decay_iters
    assert lr_at(110, cfg) == lr_at(10**6, cfg) == 1e-4


def test_constant_schedule():
    warm = OptimConfig(lr_schedule="constant", learning_rate=2e-4, warmup_iters=4)
    assert [lr_at(s, warm) for s in (0, 2, 3, 1000)] == pytest.approx([5e-5, 1.5e-4, 2e-4, 2e-4])
    cfg = OptimConfig(lr_schedule="constant", learning_rate=2e-4, warmup_iters=0)
    assert lr_at(0, cfg) == lr_at(10**6, cfg) == 2e-4


# ----------------------------------------------------------------------------- batch ramp and config


def test_batch_ramp_follows_palm_section5():
    ramp = "50000:2,115000:4"  # 512 -> 1024 -> 2048 sequences with micro-batches of 512 / base
    got = [micro_steps_at(s, 4, ramp) for s in (0, 49999, 50000, 114999, 115000, 255000)]
    assert got == [4, 4, 8, 8, 16, 16]
    assert micro_steps_at(10**6, 3, "") == 3
    assert micro_steps_at(7, 3, " 5 : 2 ") == 6


BAD_RAMPS = ["50000", "a:2", "50000:0", "100:2,50:4", "100:2,100:4", "50000:2,", "-5:2", "1:1.5"]


@pytest.mark.parametrize("ramp", BAD_RAMPS)
def test_bad_batch_ramp_is_user_error(ramp):
    with pytest.raises(UserError, match="expected 'STEP:MULT"):
        micro_steps_at(0, 1, ramp)
    with pytest.raises(UserError, match="batch_ramp"):
        OptimConfig(batch_ramp=ramp)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"learning_rate": -1e-3, "min_lr": 0.0}, "^learning_rate must be > 0"),
        ({"optimizer": "sgd"}, "^optimizer='sgd' is not one of adamw, adafactor"),
        ({"lr_schedule": "linear"}, "^lr_schedule='linear' is not one of cosine, palm, constant"),
        ({"weight_decay_mode": "l2"}, "^weight_decay_mode='l2' is not one of decoupled, lr_squared, none"),
        ({"min_lr": 1.0}, "^min_lr"),
        ({"warmup_iters": 100, "lr_decay_iters": 100}, "lr_decay_iters"),
        ({"beta2": 1.0}, "beta2"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"palm_constant_steps": 0}, "palm_constant_steps"),
    ],
)
def test_validate_rejects_bad_values(kw, match):
    with pytest.raises(UserError, match=match):
        build_config(kw)


def test_the_default_and_the_paper_recipes_give_their_schedules():
    """The default: linear warmup to 6e-4 over 100 steps, cosine to min_lr at lr_decay_iters. PaLM (Section 5):
    1e-2 for the first 10,000 steps, then 1/sqrt(k), so 0.005 at k = 40,000."""
    default = OptimConfig()
    assert lr_at(0, default) == pytest.approx(6e-4 / 100) and lr_at(100, default) == pytest.approx(6e-4)
    assert lr_at(default.lr_decay_iters, default) == pytest.approx(6e-5)
    paper = OptimConfig(optimizer="adafactor", learning_rate=1e-2, lr_schedule="palm", weight_decay_mode="lr_squared",
                        grad_clip=1.0)
    assert [lr_at(k, paper) for k in (0, 9_999, 10_000)] == [1e-2] * 3
    assert lr_at(40_000, paper) == pytest.approx(40_000 ** -0.5)


def test_adafactor_steps_a_fused_projection_as_its_separate_matrices():
    """T5X keeps Adafactor's statistics per matrix: q, k, v, gate and up fused in one weight take the very
    steps they would take as five parameters (parameter scaling and update clipping per matrix)."""
    torch.manual_seed(0)
    splits = {"q": 8, "k": 4, "v": 4, "gate": 16, "up": 16}
    fused = FusedLinear(6, splits, bias=False)
    with torch.no_grad():  # matrices of very different sizes, so shared statistics would show
        for i, rows in enumerate(fused.weight.split(list(splits.values()))):
            rows.mul_(10.0 ** (i - 2))
    separate = [nn.Parameter(rows.clone()) for rows in fused.weight.detach().split(list(splits.values()))]
    opt_fused = PaLMAdafactor([fused.weight], lr=0.05, layouts=matrix_layouts(fused))
    opt_separate = PaLMAdafactor(separate, lr=0.05)
    assert opt_fused.layouts[fused.weight].splits == (8, 4, 4, 16, 16)
    for step in range(4):
        grads = [(1 + step) * torch.randn_like(p) * 10.0 ** -i for i, p in enumerate(separate)]
        fused.weight.grad = torch.cat(grads)
        for p, g in zip(separate, grads, strict=True):
            p.grad = g.clone()
        opt_fused.step()
        opt_separate.step()
        assert torch.equal(fused.weight.detach(), torch.cat([p.detach() for p in separate])), step

    # Statistics over the whole fused tensor (what PaLMAdafactor did before) take another first step.
    start = fused.weight.detach().clone()
    per_matrix, whole = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    opt_per_matrix = PaLMAdafactor([per_matrix], lr=0.05, layouts={per_matrix: opt_fused.layouts[fused.weight]})
    opt_whole = PaLMAdafactor([whole], lr=0.05)
    per_matrix.grad, whole.grad = fused.weight.grad.clone(), fused.weight.grad.clone()
    opt_per_matrix.step()
    opt_whole.step()
    k_rows = slice(8, 12)  # k: the smallest matrix, whose step the MLP rows would set if shared
    assert not torch.allclose(whole[k_rows] - start[k_rows], per_matrix[k_rows] - start[k_rows], rtol=0.5)


def adafactor_loop_step(params, states, lr, k, beta1=0.9, decay=0.8, eps1=1e-30, eps2=1e-3, wd=0.0):
    """The update as one loop of tensor operations per parameter (how PaLMAdafactor was written before it
    went multi-tensor), whole-tensor statistics."""
    beta2 = 1.0 - k**-decay
    for p, state in zip(params, states, strict=True):
        g, v, m = p.grad, state["v"], state["m"]
        v.mul_(beta2).add_(g.square().add_(eps1), alpha=1.0 - beta2)
        u = g / v.sqrt()
        u.div_(u.square().mean().sqrt().clamp(min=1.0))
        u.mul_(p.square().mean().sqrt().clamp(min=eps2) * lr)
        m.mul_(beta1).add_(u, alpha=1.0 - beta1)
        p.data.mul_(1.0 - lr * wd).sub_(m)


def test_multi_tensor_adafactor_equals_the_per_parameter_loop_in_fp32():
    torch.manual_seed(0)
    model, reference = Tiny(), Tiny()
    reference.load_state_dict(model.state_dict())
    opt = PaLMAdafactor(list(model.parameters()), lr=0.05)
    states = [{"v": torch.zeros_like(p), "m": torch.zeros_like(p)} for p in reference.parameters()]
    idx = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))
    for k in range(1, 6):
        for net in (model, reference):
            net.zero_grad(set_to_none=True)
            net((idx + k) % 11).square().mean().backward()
        opt.step()
        adafactor_loop_step(list(reference.parameters()), states, 0.05, k)
        for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-8, msg=f"{name} at step {k}")


def test_build_optimizer_gives_adafactor_each_palm_matrix_its_own_statistics():
    """The wiring, not the optimizer alone: what build_optimizer returns for a PaLM knows the fused projection's
    five matrices (and every other matrix as one), so its statistics are per matrix as T5X keeps them."""
    model = PaLM(PaLMConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, head_dim=8, d_model=32))
    opt = build_optimizer(model, OptimConfig(optimizer="adafactor"), "cpu")
    block = model.blocks[0]
    assert opt.layouts[block.in_proj.weight].splits == (32, 8, 8, 128, 128)  # q, k (one head), v, gate, up
    assert opt.layouts[block.attn.out.weight].splits == (32,)
    assert opt.layouts[model.wte.weight].splits == (64,)
    trained = {p for group in opt.param_groups for p in group["params"]}
    assert trained == set(model.parameters()) and set(opt.layouts) >= trained
