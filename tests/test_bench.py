"""Benchmark helpers: the equal-size GPT-2 configuration, MFU by Appendix B, the training CLI. No timings."""


import pytest
import torch
from conftest import load_script

from nanopalm.config import model_config, model_presets, parse_args
from nanopalm.errors import UserError
from nanopalm.metrics import mfu
from nanopalm.model import PaLM, PaLMConfig
from nanopalm.tools import benchmarks
from nanopalm.tools.bench import matmul_flops_per_token, median_interval
from nanopalm.variants import equal_size_gpt2, param_count

MODEL_PRESETS = model_presets()

GPT2_SWITCHES = dict(parallel_block=False, mlp="gelu", pos_emb="learned", logit_scale=False, z_loss=0.0, bias=True,
                     init="gpt2")


def relative_size(a: PaLMConfig, b: PaLMConfig) -> float:
    return param_count(a) / param_count(b) - 1


@pytest.mark.parametrize("preset", [*MODEL_PRESETS, "shakespeare"])
def test_equal_size_gpt2_is_gpt2_within_2_percent(preset):
    palm = parse_args([preset]).model if preset == "shakespeare" else model_config(preset)
    gpt = equal_size_gpt2(palm)
    assert abs(relative_size(gpt, palm)) <= 0.02
    assert {k: getattr(gpt, k) for k in GPT2_SWITCHES} == GPT2_SWITCHES
    assert gpt.n_kv_head == gpt.n_head == palm.n_head and 3.5 * gpt.d_model <= gpt.d_ff <= 4.5 * gpt.d_model
    assert (gpt.n_layer, gpt.head_dim) == (palm.n_layer, palm.head_dim)  # resized by its width alone
    assert (gpt.vocab_size, gpt.block_size) == (palm.vocab_size, palm.block_size)
    with torch.device("meta"):  # the count without the memory (palm_8b's GPT-2 would take 31 GB)
        assert param_count(gpt) == PaLM(gpt).num_params()


def test_mfu_reproduces_palm_540b_appendix_b():
    """238.3k tokens/s on 6144 TPU v4 chips of 275 TFLOP/s: 46.2% MFU, 45.7% without attention."""
    config = PaLMConfig(vocab_size=256000, block_size=2048, n_layer=118, n_head=48, head_dim=256, d_model=18432)
    with torch.device("meta"):
        model = PaLM(config)
    assert model.num_params() == pytest.approx(540.35e9, rel=1e-4)
    peak = 6144 * 275e12
    assert mfu(model.flops_per_token(2048), 238.3e3, peak) == pytest.approx(0.462, abs=5e-4)
    assert mfu(6 * model.num_params(), 238.3e3, peak) == pytest.approx(0.457, abs=5e-4)


def test_bench_reads_presets_and_model_overrides_with_the_one_flag_parser():
    bench = load_bench_script()
    args = bench.parse_args(["--preset", "palm_20m", "--block_size=64", "--n_layer=2"])
    assert (args.model.block_size, args.model.n_layer, args.model.d_model, args.preset_batch_size) == (64, 2, 384, None)
    args = bench.parse_args([])  # palm_6m, a model shape: the batch is bench's own
    assert args.model == parse_args(["palm_6m"]).model and args.preset_batch_size is None
    args = bench.parse_args(["--preset", "shakespeare"])
    assert args.model == parse_args([]).model and args.preset_batch_size == parse_args([]).train.batch_size
    with pytest.raises(UserError, match="not a model key"):
        bench.parse_args(["--preset", "tiny", "--learning_rate=1"])
    with pytest.raises(UserError, match="--n_layer needs a value: write --n_layer=VALUE"):
        bench.parse_args(["--preset", "tiny", "--n_layer"])


def load_bench_script():
    return load_script("bench.py")


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_training_benchmark_cli_prints_its_tables(capsys, clock):
    load_bench_script().main(["--preset", "tiny", "--compare", "--repeats", "2", "--steps", "1", "--warmup", "0",
                              "--peak_flops", "1e9", "--device", "cpu", "--block_size=32",
                              "--activation_checkpointing", "none", "full", "--clock", clock, "--profile", "1"])
    out = capsys.readouterr().out
    assert out.startswith("$ python bench.py --preset tiny --compare")
    assert "| tiny | false | none |" in out and "| GPT-2-style | false | full |" in out
    assert "MFU against 1.0 GFLOP/s (--peak_flops" in out
    assert "PaLM / GPT-2-style tokens/s, compile false, checkpointing full:" in out
    assert "(median of 2 repeats; 50% interval" in out
    assert "tiny, compile false, checkpointing full against none: peak memory 0." in out  # less memory
    assert ("CPU time of this process" in out) == (clock == "cpu")
    profile = out[out.index("Where a step's time goes"):]
    assert "| operator | tiny | GPT-2-style | tiny | GPT-2-style |" in profile and "| `aten::mm` |" in profile
    assert "| all operators |" in profile


def test_memory_planner_cli_prints_every_mode_and_what_fits(capsys):
    load_bench_script().main(["memory", "--preset=tiny", "--world_size=2", "--gpu_memory=0.01", "--n_layer=4"])
    out = capsys.readouterr().out
    rows = [line.split(" | ")[1:] for line in out.splitlines() if line.startswith("| full |")]
    assert [(r[0], r[1]) for r in rows] == [("DDP", m) for m in ("none", "full", "selective")] + [
        ("FSDP2", m) for m in ("none", "full", "selective")]
    fits = {(r[0], r[1]): int(r[2]) for r in rows}
    assert fits[("FSDP2", "full")] > fits[("FSDP2", "selective")] > fits[("FSDP2", "none")] > fits[("DDP", "none")]
    assert "(4 layers, d_model 64" in out and "2 GPU(s) of 0.01 GiB, 10% of it kept free" in out


def test_memory_planner_puts_lora_beside_the_full_finetune(capsys):
    """--lora_rank: the same table for the LoRA run and for the full finetune, LoRA with more room for activations
    (no gradients or optimizer state for the base)."""
    load_bench_script().main(["memory", "--preset=tiny", "--world_size=1", "--gpu_memory=0.01", "--n_layer=4",
                              "--lora_rank=4"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith(("| LoRA", "| full"))]
    fits = {(r[0][2:], r[2]): int(r[3]) for r in rows}
    assert sorted(fits) == sorted((t, m) for t in ("LoRA r4", "full") for m in ("none", "full", "selective"))
    assert all(fits[("LoRA r4", m)] >= fits[("full", m)] for m in ("none", "full", "selective"))
    assert fits[("LoRA r4", "none")] > fits[("full", "none")] and fits[("LoRA r4", "full")] > fits[("full", "full")]


def test_cpu_clock_refuses_a_gpu(monkeypatch):
    bench = load_bench_script()
    monkeypatch.setattr(benchmarks, "pick_device", lambda name: torch.device("cuda"))
    with pytest.raises(UserError, match="--clock cpu times CPU work: it cannot time cuda"):
        bench.main(["--preset", "tiny", "--clock", "cpu", "--device", "cuda"])


def test_logits_benchmark_cli_compares_chunked_and_full_logits(capsys):
    load_bench_script().main(["logits", "--vocab_sizes", "4096", "--block_size", "512", "--n_layer=1"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 4,096 |")]
    assert [row[2].strip() for row in rows] == ["full", "chunked"]
    full, chunked = (float(row[5].replace(",", "")) for row in rows)
    assert full > 2 * chunked  # 512 x 4096 fp32 logits are 8 MiB: the full path holds several copies
    assert float(rows[1][6].strip().rstrip("x")) == pytest.approx(full / chunked, rel=0.1)


def test_median_interval_is_the_order_statistic_interval():
    # 15 values: P(Binomial(15, 1/2) <= 3) = 576 / 2^15, so the 4th and 12th values bracket the median at
    # 1 - 2 * 576 / 2^15; dropping one more from each end would cover only 88%.
    assert median_interval([float(v) for v in range(15, 0, -1)]) == (4.0, 12.0, 1 - 2 * 576 / 2**15)
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0, 1 - 2 / 2**5)  # too few for 95%: the range
    with pytest.raises(ValueError, match="at least one value"):
        median_interval([])


def test_median_interval_covers_the_true_median_as_often_as_it_says():
    """Skewed noise like a shared machine's (lognormal, median exactly 1): over 4,000 samples of 15 and of
    60 values, the interval holds 1 as often as its stated coverage, to sampling error (+-0.01)."""
    generator = torch.Generator().manual_seed(0)
    for n in (15, 60):
        samples = torch.randn(4000, n, generator=generator).mul(0.3).exp().tolist()
        intervals = [median_interval(sample) for sample in samples]
        covered = sum(low <= 1.0 <= high for low, high, _ in intervals) / len(intervals)
        assert covered == pytest.approx(intervals[0][2], abs=0.01)


def test_matmul_flops_count_each_multiplied_weight_once():
    """palm_6m (bench's default model): 4 blocks of (256 x 2432 fused input, 256 x 256 attention out, 1024 x 256
    MLP out) and the tied 8192 x 256 output layer; its GPT-2-style twin (d_model 278, 4 heads of 64, d_ff 1078):
    4 x (278 x 768, 256 x 278, 278 x 1078, 1078 x 278) and 8192 x 278. PaLM multiplies 1.5% more weights though
    6N makes them equal: GPT-2-style's N holds learned positions and biases, which no matmul multiplies."""
    palm = parse_args(["palm_6m"]).model
    models = [PaLM(palm), PaLM(equal_size_gpt2(palm))]
    palm_weights = 4 * (256 * 2432 + 256 * 256 + 1024 * 256) + 8192 * 256
    gpt2_weights = 4 * (278 * 768 + 256 * 278 + 2 * 278 * 1078) + 8192 * 278
    assert [matmul_flops_per_token(m) for m in models] == [6 * palm_weights, 6 * gpt2_weights]
    assert models[0].flops_per_token(256) == pytest.approx(models[1].flops_per_token(256), rel=1e-3)
