"""What only a CUDA GPU can check: bf16 autocast, torch.compile, the flash-attention kernel, fused AdamW, a short
training run and the KV cache on the GPU. Skipped without CUDA; `scripts/gpu_check.sh` runs them."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanopalm.device import autocast, pick_dtype
from nanopalm.metrics import gpu_peak_flops
from nanopalm.model import PaLM, PaLMConfig
from nanopalm.optim import OptimConfig, build_optimizer
from nanopalm.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def small_model(**overrides) -> PaLM:
    """MQA, head size 64 (flash attention takes head sizes up to 256 in multiples of 8)."""
    base = dict(vocab_size=256, block_size=128, n_layer=2, n_head=4, head_dim=64, d_model=128,
                tie_embeddings=False)
    torch.manual_seed(0)
    return PaLM(PaLMConfig(**{**base, **overrides})).to(CUDA)


def batch(model: PaLM, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(model.config.vocab_size, (size, model.config.block_size + 1), generator=gen).to(CUDA)
    return tokens[:, :-1], tokens[:, 1:]


def test_mfu_knows_this_gpu():
    assert gpu_peak_flops(CUDA), f"add {torch.cuda.get_device_name()!r} to GPU_PEAK_FLOPS in nanopalm/metrics.py"


def test_bf16_autocast_matches_fp32():
    model = small_model()
    x, y = batch(model)
    dtype = pick_dtype("auto", CUDA)
    _, loss32 = model(x, y)
    with autocast(CUDA, dtype):
        logits, loss16 = model(x, y)
    assert logits.dtype == dtype and loss16.dtype == torch.float32  # loss statistics stay fp32
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    loss16.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_flash_attention_runs_the_model_and_matches_math():
    """Training's attention (causal, multi-query via enable_gqa) must take the flash kernel, not a fallback."""
    model = small_model()
    x, y = batch(model)
    with autocast(CUDA, torch.bfloat16):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot take these inputs
            flash_logits, loss = model(x, y)
            loss.backward()
        with sdpa_kernel(SDPBackend.MATH):
            math_logits, _ = model(x, y)
    torch.testing.assert_close(flash_logits.float(), math_logits.float(), atol=3e-2, rtol=3e-2)


def test_compiled_model_matches_eager():
    model = small_model()
    x, y = batch(model)
    compiled = torch.compile(model)
    eager_logits, eager_loss = model(x, y)
    logits, loss = compiled(x, y)
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)
    loss.backward()
    assert all(p.grad.isfinite().all() for p in model.parameters())


def test_fused_adamw_matches_the_cpu_step():
    gpu_model = small_model()
    cpu_model = small_model().cpu()
    gpu_opt = build_optimizer(gpu_model, OptimConfig(), "cuda")
    cpu_opt = build_optimizer(cpu_model, OptimConfig(), "cpu")
    assert gpu_opt.defaults["fused"] is True
    x, y = batch(gpu_model)
    for model, opt, device in ((gpu_model, gpu_opt, CUDA), (cpu_model, cpu_opt, torch.device("cpu"))):
        for _ in range(3):
            _, loss = model(x.to(device), y.to(device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p_gpu, p_cpu in zip(gpu_model.parameters(), cpu_model.parameters(), strict=True):
        torch.testing.assert_close(p_gpu.cpu(), p_cpu, atol=1e-4, rtol=1e-3)


def test_short_training_run_on_the_gpu_learns(tiny_run, tmp_path):
    """The real loop: bf16 autocast, torch.compile, fused AdamW; the loss must fall."""
    result = train(tiny_run(device="cuda", dtype="auto", compile="true", max_iters=60, eval_interval=30))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < vals[0] - 1.0, vals
    assert result["val_loss"] == vals[-1]
    assert "mfu" in rows[1]


@pytest.mark.parametrize("n_kv_head", [1, 4])
def test_kv_cache_generates_the_same_tokens_on_the_gpu(n_kv_head):
    model = small_model(n_kv_head=n_kv_head, block_size=64).eval()
    prompt = batch(model, size=2)[0][:, :20]
    cached = model.generate(prompt, 60, temperature=0.0, use_cache=True)  # past block_size: a window jump
    recomputed = model.generate(prompt, 60, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)
