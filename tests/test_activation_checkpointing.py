"""Activation checkpointing (distributed.checkpoint_activations): full and selective give the gradients of
no checkpointing, bitwise, in fp32 on the CPU with dropout on (the recomputation draws the same masks), for
PaLM's block and GPT-2's, while keeping less memory; checkpoints keep the plain parameter names; and with
torch.compile (slow). Under DDP and FSDP2: tests/test_distributed.py trains with it."""

import pytest
import torch
from conftest import training_step

from nanopalm import checkpoint as ckpt
from nanopalm import distributed as D
from nanopalm.device import Precision
from nanopalm.memory import measure
from nanopalm.model import PaLMConfig
from nanopalm.trainer import train

PALM = PaLMConfig(vocab_size=128, block_size=32, n_layer=3, n_head=4, head_dim=16, d_model=64, dropout=0.1)
GPT2 = PaLMConfig(vocab_size=128, block_size=32, n_layer=3, n_head=4, head_dim=16, d_model=64, dropout=0.1,
                  n_kv_head=4, parallel_block=False, mlp="gelu", pos_emb="learned", bias=True, tie_embeddings=False)
MODES = ("none", "full", "selective")


def gradients(config: PaLMConfig, mode: str, compile_blocks: bool = False) -> tuple[torch.Tensor, dict]:
    """(loss, name -> gradient) of one forward and backward, the model and dropout seeded alike."""
    model, _ = D.build_model(config, D.DistInfo(), torch.device("cpu"), Precision(torch.float32), 0, mode,
                             compile_blocks)
    tokens = torch.randint(config.vocab_size, (4, config.block_size + 1), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the dropout masks
    loss = model(tokens[:, :-1], tokens[:, 1:]).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("config", [PALM, GPT2], ids=["palm", "gpt2"])
def test_checkpointed_gradients_are_those_of_the_plain_model(config):
    loss, expected = gradients(config, "none")
    assert all(g is not None and g.abs().sum() > 0 for g in expected.values())
    for mode in ("full", "selective"):
        got_loss, got = gradients(config, mode)
        assert got.keys() == expected.keys()  # the state_dict names of the model, without the wrapper's
        assert torch.equal(got_loss, loss)
        assert all(torch.equal(got[name], g) for name, g in expected.items()), mode  # bitwise


def test_checkpointing_keeps_less_memory():
    """The peak of a step as measured: full keeps only each block's input, selective its matmul and attention
    outputs as well (tests/test_memory.py checks the amounts against the planner)."""
    config = PaLMConfig(**{**PALM.to_dict(), "dropout": 0.0, "n_layer": 4, "block_size": 64})
    peaks = {}
    for mode in MODES:
        peaks[mode] = measure(*training_step(config, 8, checkpointing=mode))["Total"]
    assert peaks["full"] < 0.8 * peaks["selective"] < 0.8 * peaks["none"]


def test_a_run_with_checkpointing_trains_as_one_without(tiny_run):
    """The whole trainer, AdamW steps included: the same val loss and weights, bitwise, with dropout on."""
    runs = {mode: tiny_run(mode, dropout=0.1, max_iters=6, eval_interval=6, activation_checkpointing=mode)
            for mode in MODES}
    val_loss = {mode: train(cfg)["val_loss"] for mode, cfg in runs.items()}
    weights = {mode: ckpt.read_weights(ckpt.find_checkpoint(cfg.train.out_dir)) for mode, cfg in runs.items()}
    for mode in ("full", "selective"):
        assert val_loss[mode] == val_loss["none"]
        assert all(torch.equal(w, weights["none"][name]) for name, w in weights[mode].items())


@pytest.mark.slow
def test_torch_compile_of_checkpointed_blocks_matches_eager():
    """Checkpointing, then torch.compile per block (torchtitan's order): the compiler traces the recomputation.
    No dropout: compiled dropout draws its masks differently from eager."""
    config = PaLMConfig(**{**PALM.to_dict(), "dropout": 0.0})
    loss, expected = gradients(config, "none")
    for mode in ("full", "selective"):
        got_loss, got = gradients(config, mode, compile_blocks=True)
        torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
        for name, g in expected.items():
            torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=f"{mode} {name}")
