"""Shared fixtures: a small character-level Shakespeare dataset and tiny training configs."""

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanopalm.config import DEFAULT_PRESET, build_config, load_preset
from nanopalm.data import SplitStats, load_meta, read_token_file, write_meta, write_token_file
from nanopalm.device import Precision
from nanopalm.distributed import DistInfo, build_model
from nanopalm.evaluate import document_bytes
from nanopalm.model import PaLMConfig
from nanopalm.optim import OptimConfig, build_optimizer
from nanopalm.shakespeare import prepare
from nanopalm.tokenizer import load_tokenizer
from nanopalm.trainer import train

# One thread, here and in the processes tests start: tiny models gain nothing from a second one, and two
# OpenMP threads spinning on two busy cores turn a 5 ms training step into a second.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """A command-line script of the repository ("bench.py", "scripts/baselines.py", "data/shakespeare/prepare.py"),
    imported by its path (the scripts are not part of the package), so that a test runs its `main` in process."""
    name = "script_" + relative_path.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # registered: dataclasses look it up
    spec.loader.exec_module(module)
    return module


def training_step(config: PaLMConfig, batch: int, dtype: torch.dtype = torch.float32, checkpointing: str = "none",
                  optimizer: str = "adamw", micro_batches: int = 1) -> tuple[list, torch.nn.Module, object]:
    """A CPU training step as the trainer takes it (distributed.build_model, optim.build_optimizer, autocast,
    clipping), on a seeded batch of random tokens: (its parts, the model, the optimizer). The parts are
    `micro_batches` forward-backwards, then the update; one step has been taken (the optimizer's state)."""
    cpu, precision = torch.device("cpu"), Precision(dtype)
    model, _ = build_model(config, DistInfo(), cpu, precision, 0, checkpointing, False)
    opt = build_optimizer(model, OptimConfig(optimizer=optimizer), "cpu")
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(config.vocab_size, (batch, config.block_size + 1), generator=generator)

    def forward_backward() -> None:
        with precision.autocast(cpu):
            loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()  # outside autocast, as the trainer calls it

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    parts = [forward_backward] * micro_batches + [update]
    for part in parts:
        part()
    return parts, model, opt


@pytest.fixture(scope="session")
def char_dataset(tmp_path_factory) -> Path:
    """The built-in corpus with the char tokenizer (vocabulary 77), prepared once per test session."""
    return prepare(tmp_path_factory.mktemp("shakespeare_char"), tokenizer="char")


TINY_RUN = dict(
    vocab_size=80, block_size=32, n_layer=2, n_head=2, head_dim=16, d_model=32, batch_size=8,
    gradient_accumulation_steps=1, max_iters=40, max_minutes=0, eval_interval=20, eval_iters=4, log_interval=1,
    optimizer="adamw", learning_rate=3e-3, lr_schedule="cosine", warmup_iters=5, lr_decay_iters=200, min_lr=3e-4,
    palm_constant_steps=10000, weight_decay_mode="decoupled", cooldown=0.0, grad_clip=1.0,
    device="cpu", dtype="float32", compile="false", sample_tokens=0, full_val_tokens=0,
)
# Tests run tiny runs both in-process (build_config: dataclass defaults) and through `python train.py`
# (the default preset first): overriding every key of that preset makes the two the same run.
assert set(load_preset(DEFAULT_PRESET)) - {"dataset", "out_dir"} <= set(TINY_RUN), "add the key to TINY_RUN"


@pytest.fixture
def tiny_run(char_dataset, tmp_path):
    """tiny_run(name, **overrides) -> RunConfig of a tiny model on the char dataset, in tmp_path/name."""

    def make(name: str = "run", **overrides):
        values = {**TINY_RUN, "dataset": str(char_dataset), "out_dir": str(tmp_path / name), **overrides}
        return build_config(values)

    return make


# The run that two ranks (tests/test_distributed.py) and sharded checkpoints (tests/test_sharded.py) must
# reproduce: 12 steps of 2 micro-batches of 8, checkpoints at 0, 6 and 12; dropout on, so that the masks must
# depend neither on the number of ranks nor on activation checkpointing's recomputation.
REFERENCE_RUN = {**TINY_RUN, "max_iters": 12, "eval_interval": 6, "gradient_accumulation_steps": 2, "dropout": 0.1}


@pytest.fixture(scope="session")
def reference_values(char_dataset) -> dict:
    return {**REFERENCE_RUN, "dataset": str(char_dataset)}


@pytest.fixture(scope="session")
def one_process(reference_values, tmp_path_factory) -> Path:
    """REFERENCE_RUN trained in this process, in the single-file format: its run directory."""
    out = tmp_path_factory.mktemp("one_process")
    train(build_config({**reference_values, "out_dir": str(out)}))
    return out


@pytest.fixture(scope="session")
def small_val_dataset(char_dataset, tmp_path_factory) -> Path:
    """char_dataset with a val split of its first 3,000 tokens, small enough to score whole in a test."""
    directory = tmp_path_factory.mktemp("small_val")
    for name in ("train.bin", "tokenizer.json"):
        (directory / name).symlink_to(char_dataset / name)
    tokenizer, meta = load_tokenizer(char_dataset), load_meta(char_dataset)
    val = np.array(read_token_file(char_dataset / "val.bin")[0][:3000])
    write_token_file(directory / "val.bin", val, tokenizer.vocab_size, tokenizer.name)
    val_stats = SplitStats(int((val == tokenizer.eot_id).sum()), len(val), document_bytes(val, tokenizer))
    train_stats = SplitStats(meta["train_documents"], meta["train_tokens"], 0)  # train bytes: not in meta.json
    write_meta(directory, tokenizer, meta["source"], train_stats, val_stats)
    return directory


EVAL_RUN = dict(TINY_RUN, block_size=128, max_iters=40, eval_interval=40)  # a line of verse fits in a window


@pytest.fixture(scope="session")
def eval_run(small_val_dataset, tmp_path_factory) -> Path:
    """A run directory: EVAL_RUN trained on small_val_dataset (what eval.py and the harness tests read)."""
    out = tmp_path_factory.mktemp("eval_run") / "run"
    train(build_config({**EVAL_RUN, "dataset": str(small_val_dataset), "out_dir": str(out)}))
    return out
