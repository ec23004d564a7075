"""Many GPUs and nodes through PyTorch's own engine: torchrun launches, DDP or FSDP2 shards.

Under `torchrun` the environment carries RANK, LOCAL_RANK and WORLD_SIZE; without it we are one process.
NCCL on CUDA, gloo on the CPU, so the same code paths are testable on a laptop.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanopalm.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun set up (if any); each rank takes its own GPU."""
    if "RANK" not in os.environ:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_divisible(micro_steps: int, info: DistInfo) -> None:
    if micro_steps % info.world_size:
        raise UserError(f"gradient_accumulation_steps={micro_steps} must be a multiple of the number of ranks "
                        f"({info.world_size}): the global batch is split evenly across ranks")


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel when there are several ranks; the model itself otherwise."""
    if not info.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def no_grad_sync(model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on every micro-step but the last of an optimizer step."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last_micro_step:
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def model_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state, as checkpoints store it."""
    return model.state_dict()


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    return optimizer.state_dict()
