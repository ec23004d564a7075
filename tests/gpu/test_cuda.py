"""What only a CUDA GPU can check: bf16 autocast, torch.compile, the attention kernel SDPA picks by default,
fused AdamW, a short training run, generation in bf16 with the KV cache. Skipped without CUDA;
`scripts/gpu_check.sh` runs them. They need nothing beyond the project's own imports (torch, numpy,
safetensors, sentencepiece, matplotlib, pytest): the training data is synthetic, made here."""

import json
import os
from pathlib import Path

import pytest
import torch
from synthetic import write_synthetic_dataset
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanopalm.config import build_config
from nanopalm.device import Precision, pick_precision
from nanopalm.distributed import compile_blocks
from nanopalm.metrics import gpu_peak_flops
from nanopalm.model import PaLM, PaLMConfig
from nanopalm.optim import OptimConfig, build_optimizer
from nanopalm.sampling import generate
from nanopalm.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
RESULTS = os.environ.get("NANOPALM_GPU_RESULTS")  # gpu_check.sh collects what the tests found here


def record(name: str, value) -> None:
    if RESULTS:
        path = Path(RESULTS) / "gpu_facts.json"
        facts = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**facts, name: value}, indent=2))


def small_model(**overrides) -> PaLM:
    """MQA, head size 64 (flash and cuDNN attention take head sizes up to 256 in multiples of 8)."""
    base = dict(vocab_size=256, block_size=128, n_layer=2, n_head=4, head_dim=64, d_model=128,
                tie_embeddings=False)
    torch.manual_seed(0)
    return PaLM(PaLMConfig(**{**base, **overrides})).to(CUDA)


def batch(model: PaLM, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(model.config.vocab_size, (size, model.config.block_size + 1), generator=gen).to(CUDA)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


def test_mfu_knows_this_gpu():
    assert gpu_peak_flops(CUDA), f"add {torch.cuda.get_device_name()!r} to GPU_PEAK_FLOPS in nanopalm/metrics.py"


def test_bf16_autocast_matches_fp32():
    model = small_model()
    x, y = batch(model)
    precision = pick_precision("auto", CUDA)
    loss32 = model(x, y).loss
    with precision.autocast(CUDA):
        assert model(x).logits.dtype == precision.dtype
        out = model(x, y)
    assert out.loss.dtype == torch.float32  # the loss statistics stay fp32
    assert out.loss.item() == pytest.approx(loss32.item(), rel=2e-2)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def attention_kernels(fn) -> list[str]:
    """The names of the attention kernels `fn` ran on the GPU, from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    return sorted(n for n in names if any(k in n.lower() for k in ("flash", "fmha", "cudnn", "attention", "efficient")))


def test_the_default_attention_kernel_matches_math_with_multi_query_and_the_causal_mask():
    """Training gets whatever SDPA picks by default (cuDNN attention on an H100/H200 in recent PyTorch, flash
    elsewhere): the kernel that runs is recorded, and its output and gradients must match the math kernel."""
    model = small_model()
    x, y = batch(model)

    def run(backends: list[SDPBackend] | None):
        model.zero_grad(set_to_none=True)
        with Precision(torch.bfloat16).autocast(CUDA):
            context = sdpa_kernel(backends) if backends else torch.enable_grad()
            with context:
                logits = model(x).logits
                loss = model(x, y).loss
                loss.backward()
        return logits.float(), [p.grad.clone() for p in model.parameters()]

    kernels = attention_kernels(lambda: run(None))
    record("default_attention_kernels_bf16", kernels)
    assert kernels, "no attention kernel seen by the profiler"
    logits, grads = run(None)
    math_logits, math_grads = run([SDPBackend.MATH])
    torch.testing.assert_close(logits, math_logits, atol=3e-2, rtol=3e-2)
    for g, m in zip(grads, math_grads, strict=True):
        torch.testing.assert_close(g.float(), m.float(), atol=5e-2, rtol=5e-2)


def test_fp32_attention_kernel_is_recorded():
    """fp32 multi-query attention cannot take flash or cuDNN (bf16/fp16 only): which kernel it gets is recorded
    for docs/DISTRIBUTED.md; generation and sample.py run under bf16 autocast on CUDA for this reason."""
    model = small_model().eval()
    x, _ = batch(model)
    with torch.no_grad():
        kernels = attention_kernels(lambda: model(x))
    record("fp32_attention_kernels", kernels)
    assert not any("flash" in k.lower() or "cudnn" in k.lower() for k in kernels), kernels  # (math: none named)


def test_compiled_blocks_match_eager():
    model = small_model()
    x, y = batch(model)
    eager = model(x, y).loss
    compile_blocks(model)
    compiled = model(x, y).loss
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    compiled.backward()
    assert all(p.grad.isfinite().all() for p in model.parameters())
    assert not any("_orig_mod" in name for name in model.state_dict())


@pytest.mark.parametrize("cfg", [
    OptimConfig(),  # AdamW: fused=True on CUDA
    OptimConfig(optimizer="adafactor", learning_rate=1e-2, lr_schedule="palm", weight_decay_mode="lr_squared"),
], ids=["fused-adamw", "adafactor"])
def test_the_optimizer_step_on_the_gpu_matches_the_cpu_step(cfg):
    gpu_model, cpu_model = small_model(), small_model().cpu()
    x, y = batch(gpu_model)
    for model, device in ((gpu_model, CUDA), (cpu_model, torch.device("cpu"))):
        opt = build_optimizer(model, cfg, device.type)
        assert opt.defaults.get("fused", False) is (device.type == "cuda" and cfg.optimizer == "adamw")
        for _ in range(3):
            model(x.to(device), y.to(device)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p_gpu, p_cpu in zip(gpu_model.parameters(), cpu_model.parameters(), strict=True):
        torch.testing.assert_close(p_gpu.cpu(), p_cpu, atol=1e-4, rtol=1e-3)


def test_short_training_run_on_the_gpu_learns(synthetic_dataset, tmp_path):
    """The real loop: bf16 autocast, compiled blocks, fused AdamW; the loss must fall."""
    values = dict(dataset=str(synthetic_dataset), out_dir=str(tmp_path / "run"), vocab_size=32, block_size=64,
                  n_layer=2, n_head=2, head_dim=32, d_model=64, batch_size=16, max_iters=60, eval_interval=30,
                  eval_iters=4, log_interval=1, learning_rate=3e-3, warmup_iters=5, lr_decay_iters=200,
                  device="cuda", dtype="auto", compile=True, sample_tokens=0)
    result = train(build_config(values))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < vals[0] - 1.0, vals
    assert result["val_loss"] == vals[-1]
    assert "mfu" in rows[1]


@pytest.mark.parametrize("n_kv_head", [1, 4])
def test_kv_cache_generates_the_same_tokens_on_the_gpu(n_kv_head):
    model = small_model(n_kv_head=n_kv_head, block_size=64).eval()
    prompt = batch(model, size=2)[0][:, :20]
    cached = generate(model, prompt, 60, temperature=0.0, use_cache=True)  # past block_size: a window jump
    recomputed = generate(model, prompt, 60, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_bf16_generation_keeps_a_bf16_cache_that_gives_the_full_forward_logits():
    """sample.py on CUDA: fp32 weights under bf16 autocast, so attention can take a bf16 kernel."""
    model = small_model().eval()
    idx = batch(model, size=2)[0][:, :24]
    with torch.no_grad(), Precision(torch.bfloat16).autocast(CUDA, for_generation=True):
        full = model(idx).logits.float()
        model.setup_cache(2, torch.bfloat16)
        assert model.blocks[0].attn.cache.k.dtype == torch.bfloat16
        first = model(idx[:, :16]).logits.float()
        rest = model(idx[:, 16:], pos=16).logits.float()
        model.clear_cache()
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=5e-2, rtol=5e-2)


def test_batches_in_flight_are_not_overwritten_by_the_next_ones(tmp_path):
    """The seed reused one pinned buffer for every non-blocking copy, so a batch could be overwritten by the next
    before its copy finished. Many large batches queued without a sync each arrive as the CPU loader draws them."""
    from nanopalm.data import BatchLoader

    data = write_synthetic_dataset(tmp_path / "data")
    cuda = BatchLoader(data, "train", 256, 512, 0, "cuda")
    batches = [cuda.get_batch(0, i) for i in range(16)]  # copies in flight, nothing synchronised
    torch.cuda.synchronize()
    cpu = BatchLoader(data, "train", 256, 512, 0, "cpu")
    for i, (x, y) in enumerate(batches):
        expected = cpu.get_batch(0, i)
        assert torch.equal(x.cpu(), expected[0]) and torch.equal(y.cpu(), expected[1]), i
