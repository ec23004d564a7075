"""Rank 0's measured and estimated peak memory of DDP and FSDP2 steps, one JSON line a setup: run by
tests/test_memory.py under `torchrun --nproc_per_node=2` (gloo)."""

import dataclasses
import json

import torch

from nanopalm import distributed as D
from nanopalm.device import Precision
from nanopalm.memory import Setup, estimate, measure
from nanopalm.model import PaLMConfig
from nanopalm.optim import OptimConfig, build_optimizer

CONFIG = PaLMConfig(vocab_size=512, block_size=128, n_layer=4, n_head=4, head_dim=32, d_model=128)
SETUPS = [  # (FSDP2, dtype, checkpointing, micro-batches a step, batch)
    (False, torch.float32, "none", 1, 8), (False, torch.bfloat16, "selective", 1, 8),
    (True, torch.float32, "none", 1, 8), (True, torch.float32, "full", 1, 8), (True, torch.float32, "none", 2, 4),
    (True, torch.bfloat16, "selective", 1, 8),
]


def peak_of(info: D.DistInfo, device: torch.device, fsdp: bool, dtype: torch.dtype, mode: str, micro_batches: int,
            batch: int) -> dict:
    ranks = dataclasses.replace(info, sharded=fsdp)
    precision = Precision(dtype, sharded=fsdp)
    model, wrapped = D.build_model(CONFIG, ranks, device, precision, 0, mode)
    optimizer = build_optimizer(model, OptimConfig(), device.type)
    tokens = torch.randint(CONFIG.vocab_size, (batch, CONFIG.block_size + 1),
                           generator=torch.Generator().manual_seed(info.rank))

    def forward_backward() -> None:
        with precision.autocast(device):
            loss = wrapped(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()

    def update() -> None:
        D.clip_grad_norm(model, 1.0, ranks)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    parts = [forward_backward] * micro_batches + [update]
    for part in parts:  # the optimizer's state comes with its first step
        part()
    setup = Setup(CONFIG, info.world_size, fsdp, "adamw", dtype, mode, micro_batches > 1, "cpu")
    return {"fsdp": fsdp, "dtype": str(dtype), "checkpointing": mode, "micro_batches": micro_batches,
            "measured": measure(parts, model, optimizer)["Total"], "estimated": estimate(setup, batch).total}


def main() -> None:
    torch.set_num_threads(1)
    info, device = D.init_distributed(torch.device("cpu"))
    for setup in SETUPS:
        row = peak_of(info, device, *setup)
        if info.is_main:
            print(json.dumps(row), flush=True)
    D.shutdown_distributed()


if __name__ == "__main__":
    main()
