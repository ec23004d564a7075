"""The memory planner (nanopalm/memory.py) against the peak memory of real training steps on the CPU, as
PyTorch's MemTracker measures it: within 5% for every activation-checkpointing mode, fp32 and bf16 autocast,
AdamW and Adafactor, one micro-batch a step or several, PaLM's block and GPT-2's; under torchrun for DDP and
FSDP2 too. docs/BENCHMARKS.md ("Memory planner") keeps the measurements."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, training_step

from nanopalm.memory import Setup, estimate, largest_batch, measure, peak_bytes_of
from nanopalm.model import PaLM, PaLMConfig
from nanopalm.trainer import Trainer

TOLERANCE = 0.05  # |estimate / measured - 1|; measured at most 0.014 here, 0.020 under torchrun (BENCHMARKS.md)
PALM = PaLMConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, head_dim=32, d_model=128)
GPT2 = PaLMConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, head_dim=32, d_model=128, n_kv_head=4,
                  parallel_block=False, mlp="gelu", pos_emb="learned", bias=True, tie_embeddings=False, init="gpt2")
CASES = {  # name: (model, batch, dtype, checkpointing, optimizer, micro-batches a step)
    "none": (PALM, 8, torch.float32, "none", "adamw", 1),
    "full": (PALM, 8, torch.float32, "full", "adamw", 1),
    "selective": (PALM, 8, torch.float32, "selective", "adamw", 1),
    "full, Adafactor, the step's peak": (PALM, 2, torch.float32, "full", "adafactor", 1),
    "two micro-batches": (PALM, 4, torch.float32, "none", "adamw", 2),
    "dropout: math attention": (PaLMConfig(**{**PALM.to_dict(), "dropout": 0.1}), 4, torch.float32, "selective",
                                "adamw", 1),
    "large vocabulary": (PaLMConfig(**{**PALM.to_dict(), "vocab_size": 4096, "d_model": 64, "n_head": 2}), 4,
                         torch.float32, "none", "adamw", 1),
    "bf16 autocast": (PALM, 8, torch.bfloat16, "none", "adamw", 1),
    "bf16 autocast, full": (PALM, 8, torch.bfloat16, "full", "adamw", 1),
    "GPT-2 block": (GPT2, 8, torch.float32, "none", "adamw", 1),
    "GPT-2 block, selective": (GPT2, 8, torch.float32, "selective", "adamw", 1),
}


def measured_and_estimated(config, batch, dtype, mode, optimizer, micro_batches) -> tuple[int, int]:
    parts, model, opt = training_step(config, batch, dtype, mode, optimizer, micro_batches)
    setup = Setup(config, 1, False, optimizer, dtype, mode, micro_batches > 1, "cpu")
    return measure(parts, model, opt)["Total"], estimate(setup, batch).total


@pytest.mark.parametrize("case", CASES)
def test_the_estimate_is_within_5_percent_of_the_measured_peak(case):
    measured, estimated = measured_and_estimated(*CASES[case])
    assert abs(estimated / measured - 1) < TOLERANCE, (estimated, measured)


def profiled_and_estimated(config, batch, dtype, mode, optimizer, micro_batches) -> tuple[int, int]:
    """As measured_and_estimated, but measured by the CPU allocator's profile (memory.peak_bytes_of) plus the
    tensors held before the step: MemTracker hooks every parameter's gradient, which torch refuses on LoRA's
    frozen base."""
    parts, model, opt = training_step(config, batch, dtype, mode, optimizer, micro_batches)
    held = [*model.parameters(), *model.buffers(), *(v for state in opt.state.values() for v in state.values()
                                                     if torch.is_tensor(v))]
    peak = peak_bytes_of(lambda: [part() for part in parts], torch.device("cpu"))
    setup = Setup(config, 1, False, optimizer, dtype, mode, micro_batches > 1, "cpu")
    return sum(t.numel() * t.element_size() for t in held) + peak, estimate(setup, batch).total


LORA = PaLMConfig(**{**PALM.to_dict(), "lora_rank": 8})
LORA_CASES = {
    "LoRA": (LORA, 8, torch.float32, "none", "adamw", 1),
    "LoRA, full": (LORA, 8, torch.float32, "full", "adamw", 1),
    "LoRA, adapter dropout": (PaLMConfig(**{**LORA.to_dict(), "lora_dropout": 0.1}), 8, torch.float32, "none",
                              "adamw", 1),
    "LoRA, bf16, two micro-batches": (LORA, 8, torch.bfloat16, "none", "adamw", 2),
}


@pytest.mark.parametrize("case", LORA_CASES)
def test_the_lora_estimate_is_within_5_percent_of_the_measured_peak(case):
    """LoRA's base holds no gradient and no optimizer state; the planner counts what the adapters add."""
    measured, estimated = profiled_and_estimated(*LORA_CASES[case])
    assert abs(estimated / measured - 1) < TOLERANCE, (estimated, measured)


def test_a_lora_run_has_gradients_and_optimizer_state_for_its_adapters_alone():
    """By hand: fp32 gradients (4 bytes) and AdamW's two moments (8 bytes) for each adapter parameter only:
    4 blocks x (q, k, v, gate, up, o, down), each A (8 x fan-in) and B (rows x 8); none for the base."""
    lora = estimate(Setup(LORA, optimizer="adamw", dtype=torch.float32, accumulate=True, device="cpu"), 8)
    fan_in = {"q": 128, "k": 128, "v": 128, "gate": 128, "up": 128, "o": 128, "down": 512}
    rows = {"q": 128, "k": 32, "v": 32, "gate": 512, "up": 512, "o": 128, "down": 128}
    adapters = 4 * sum(8 * (fan_in[m] + rows[m]) for m in fan_in)
    assert (lora.gradients, lora.optimizer) == (4 * adapters, 8 * adapters)
    full = estimate(Setup(PALM, optimizer="adamw", dtype=torch.float32, accumulate=True, device="cpu"), 8)
    assert full.optimizer == 8 * PaLM(PALM).num_params()


def test_the_allocator_profile_measures_what_memtracker_does():
    """The two measurements agree on a model MemTracker can follow, so the LoRA cases' one is as good."""
    profiled, _ = profiled_and_estimated(*CASES["none"])
    tracked, _ = measured_and_estimated(*CASES["none"])
    assert profiled == pytest.approx(tracked, rel=0.01)


def test_checkpointing_saves_what_the_estimate_says():
    """The modes' differences, not only their totals: full saves about a block's worth of activations per
    layer, selective the elementwise work's (the estimate within 5% of the measured savings)."""
    none, none_estimate = measured_and_estimated(*CASES["none"])
    for mode in ("full", "selective"):
        peak, estimated = measured_and_estimated(*CASES[mode])
        assert peak < none
        assert (none_estimate - estimated) / (none - peak) == pytest.approx(1, abs=TOLERANCE)


def test_the_largest_micro_batch_is_the_last_that_fits():
    setup = Setup(PALM, world_size=2, fsdp=True, activation_checkpointing="selective")
    memory = estimate(setup, 37).total + 1
    assert largest_batch(setup, memory) == 37 and estimate(setup, 38).total > memory
    assert largest_batch(setup, estimate(setup, 1).total - 1) == 0


def test_the_trainer_s_setup(tiny_run):
    trainer = Trainer(tiny_run(activation_checkpointing="full", optimizer="adafactor", gradient_accumulation_steps=2))
    setup = Setup.of_run(trainer.cfg, trainer.dist, trainer.precision, trainer.device)
    assert setup == Setup(trainer.cfg.model, 1, False, "adafactor", torch.float32, "full", True, "cpu")


@pytest.mark.slow
def test_ddp_and_fsdp2_estimates_are_within_5_percent_on_two_ranks():
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/helpers/memory_of_ranks.py"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 6
    for row in rows:
        assert abs(row["estimated"] / row["measured"] - 1) < TOLERANCE, row


@pytest.mark.parametrize("config", [PALM, GPT2], ids=["palm", "gpt2"])
def test_the_estimate_from_a_built_model_is_the_estimate_from_its_config(config):
    """The trainer hands the planner its built model (a meta-device build costs a second the first time in a
    process); the counts, and so every figure, are those of the config's meta-device build."""
    for mode in ("none", "full", "selective"):
        setup = Setup(config, activation_checkpointing=mode)
        assert estimate(setup, 8, PaLM(config)) == estimate(setup, 8)
