"""Many GPUs and nodes through PyTorch's own engine: torchrun launches, DDP or FSDP2 shards.

Under `torchrun` the environment carries RANK, LOCAL_RANK and WORLD_SIZE; without it we are one process.
NCCL on CUDA, gloo on the CPU, so the same code paths are testable on a laptop. docs/DISTRIBUTED.md has
the commands.

Checkpoints are the same whatever ran them: the full (gathered) model state and the optimizer state in
torch's own `optimizer.state_dict()` layout. So a run saved by N ranks, with DDP or FSDP2, resumes on M
ranks or on one process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanopalm.device import Precision
from nanopalm.errors import UserError

# FSDP2 and torch.distributed.checkpoint take a second to import: only the FSDP2 paths import them.


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    sharded: bool = False  # the model is sharded with FSDP2 (--fsdp=True with more than one rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device, fsdp: bool = False) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun set up (if any); each rank takes its own GPU."""
    if "RANK" not in os.environ:
        return DistInfo(), device
    world = int(os.environ["WORLD_SIZE"])
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), world, fsdp and world > 1)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # device_id binds the NCCL communicator to this rank's GPU at once (no guess at the first collective).
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if info.is_main and restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        print("warning: restarts under torchrun's shared rendezvous store can fail on stale addresses; launch with "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/DISTRIBUTED.md)", flush=True)
    return info, device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_divisible(micro_steps: int, info: DistInfo) -> None:
    if micro_steps % info.world_size:
        raise UserError(f"gradient_accumulation_steps={micro_steps} must be a multiple of the number of ranks "
                        f"({info.world_size}): the global batch is split evenly across ranks")


def job_id() -> str | None:
    """torchrun's rendezvous id (--rdzv_id; a fresh uuid with --standalone): the same across restarts."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


# ---- compiling and wrapping ----------------------------------------------------------------------
def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block in place, as torchtitan does: parameter names are unchanged
    (no `_orig_mod.` in checkpoints), and FSDP2's and DDP's hooks stay outside the compiled code."""
    for block in model.blocks:
        block.compile()


def parallelize(model: nn.Module, info: DistInfo, device: torch.device, precision: Precision) -> nn.Module:
    """The module the training loop calls. One process: the model. Several: DistributedDataParallel around
    it, or (info.sharded) the model itself sharded in place by FSDP2: one all-gather unit per block, and
    the root (the embedding, which is also the tied output layer, and the final LayerNorm). Build the
    optimizer after this: under FSDP2 it must hold the sharded (DTensor) parameters."""
    if not info.enabled:
        return model
    if not info.sharded:
        # The RoPE tables are constant buffers: nothing to broadcast before every forward.
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=precision.fsdp_param_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.blocks):
        # The last block's weights are needed again at once by the backward: keep them gathered (torchtitan).
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(model.blocks) - 1)
    fully_shard(model, mp_policy=policy)
    return model


# ---- the step ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)  # gradients accumulate unsharded, unreduced
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def no_grad_sync(model: nn.Module, info: DistInfo, last_micro_step: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction (DDP all-reduce, FSDP2 reduce-scatter) on every micro-step but the last."""
    if last_micro_step or not info.enabled:
        return contextlib.nullcontext()
    return _fsdp_no_sync(model) if info.sharded else model.no_sync()


def clip_grad_norm(model: nn.Module, max_norm: float, info: DistInfo) -> torch.Tensor:
    """Clip to max_norm; returns the norm before clipping, over the whole model on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    # FSDP2: the norm of the sharded (DTensor) gradients is a replicated DTensor of the global norm.
    return norm.full_tensor() if info.sharded else norm


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum over ranks (a copy); the values themselves in one process."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ---- full state dicts for checkpoints ------------------------------------------------------------
# Call these on every rank: under FSDP2 they gather or scatter. Saving, the full state is gathered to
# rank 0, tensor by tensor onto its CPU (the other ranks get {}); loading, every rank passes the whole
# state (read from the files) and keeps its shard.
def _full_state(saving: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=saving)


def gather_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state; under FSDP2 on rank 0 only."""
    if not info.sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_state(saving=True))


def scatter_model_state(model: nn.Module, state: dict[str, torch.Tensor], info: DistInfo) -> None:
    """Load a full model state (read from a checkpoint on every rank) into the model."""
    if not info.sharded:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_state(saving=False))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in torch's optimizer numbering (0, 1, ... through the param groups)."""
    names = {param: name for name, param in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def _renumber(state: dict, key: dict) -> dict:
    return {"state": {key[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [key[k] for k in g["params"]]} for g in state["param_groups"]]}


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    """The full optimizer state in `optimizer.state_dict()` layout; under FSDP2 on rank 0 only."""
    # Before the first step there is nothing to gather, and DCP would first take a zero step to create
    # the state: AdamW would then count one step too many in its bias correction.
    if not info.sharded or not optimizer.state:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_state(saving=True))  # keyed by parameter name
    names = _param_names(model, optimizer)
    return _renumber(full, {name: i for i, name in enumerate(names)}) if full else {}


def scatter_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, info: DistInfo) -> None:
    """Load a full optimizer state (`optimizer.state_dict()` layout, from any number of ranks)."""
    if not info.sharded or not state["state"]:  # an empty one (step 0) has no shards to scatter
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    by_name = _renumber(state, dict(enumerate(_param_names(model, optimizer))))
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_state(saving=False))
