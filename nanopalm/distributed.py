"""Many GPUs and nodes through PyTorch's own engine: torchrun launches, DDP or FSDP2 shards.

Under `torchrun` the environment carries RANK, LOCAL_RANK and WORLD_SIZE; without it we are one process.
NCCL on CUDA, gloo on the CPU, so the same code paths are testable on a laptop. docs/DISTRIBUTED.md has
the commands.

Checkpoints are the same whatever ran them: the full (gathered) model state in safetensors and the
optimizer state in torch's own `optimizer.state_dict()` layout, written by rank 0. So a run saved by N
ranks, with DDP or FSDP2, resumes on M ranks or on one process.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from nanopalm import checkpoint as ckpt
from nanopalm.errors import UserError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

# FSDP2 and torch.distributed.checkpoint take a second to import: only the FSDP2 paths import them.


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


# ---- elastic restarts ----------------------------------------------------------------------------
def job_id() -> str | None:
    """torchrun's rendezvous id (--rdzv_id; a fresh uuid with --standalone): the same across restarts."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def restart_checkpoint(out_dir: Path) -> tuple[Path, dict] | None:
    """The checkpoint to continue from when torchrun restarted this job (--max_restarts): out_dir's newest
    checkpoint if this same job wrote it, which a first start never finds. Not TORCHELASTIC_RESTART_COUNT:
    on a node whose own workers were healthy (another node failed or joined) it stays 0. A checkpoint of an
    earlier job is never picked up silently: that needs --resume."""
    if job_id() is None:
        return None
    try:
        found = ckpt.find_checkpoint(out_dir)
    except UserError:  # no checkpoint yet
        return None
    return found if found[1].get("job_id") == job_id() else None


# ---- wrapping ------------------------------------------------------------------------------------
def fsdp_casts_params(dtype: torch.dtype) -> bool:
    """Under FSDP2 bf16 is FSDP's business: parameters are all-gathered in bf16 (half the traffic) and
    the forward runs in bf16 without autocast; gradients are reduced, and weights and optimizer state
    kept, in fp32."""
    return dtype == torch.bfloat16


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device, dtype: torch.dtype, fsdp: bool,
               compile: bool) -> nn.Module:
    """The module the training loop calls, compiled when asked.

    One process: the model. Several: DistributedDataParallel around it, or with `fsdp` the model itself
    sharded in place by FSDP2 (one all-gather unit per Block, and the root: embedding, which is also the
    tied output layer, and final LayerNorm). Build the optimizer after this: under FSDP2 it must hold the
    sharded (DTensor) parameters.
    """
    if not (fsdp and info.enabled):
        model = torch.compile(model) if compile else model
        if not info.enabled:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if dtype == torch.float16:
        raise UserError("--fsdp=True trains in bfloat16 or float32, not float16 (its loss scaling would have to "
                        "be sharded too): use --dtype=float32, or DDP (--fsdp=False)")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype if fsdp_casts_params(dtype) else None,
                                  reduce_dtype=torch.float32)
    for block in model.blocks:
        if compile:  # per block and in place (names unchanged); FSDP's hooks run outside the compiled code
            block.compile()
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True under FSDP2: a forward then needs every rank (all-gathers), even one for sampling."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported yet: nothing has been sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def autocast_dtype(model: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The autocast dtype for forwards through `model`: float32 (none) where FSDP2 already casts."""
    return torch.float32 if is_sharded(model) and fsdp_casts_params(dtype) else dtype


# ---- the step ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # gradients accumulate unsharded, unreduced
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def no_grad_sync(model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction (DDP all-reduce, FSDP2 reduce-scatter) on every micro-step but the last."""
    if last_micro_step:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if is_sharded(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to max_norm; returns the norm before clipping, over the whole model on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    # FSDP2: the norm of the sharded (DTensor) gradients is a replicated DTensor of the global norm.
    return norm.full_tensor() if is_sharded(model) else norm


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ---- state for checkpoints -----------------------------------------------------------------------
# Call these on every rank: under FSDP2 they gather or scatter.
def _full_state(saving: bool) -> StateDictOptions:
    """Full (unsharded) state dicts. Saving, they are gathered to rank 0, tensor by tensor onto its CPU (the
    other ranks get {}); loading, every rank passes the whole state (read from the files) and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=saving)


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state, as checkpoints store it; under FSDP2 on rank 0 only."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_state(saving=True))


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load a full model state (as read from a checkpoint on every rank)."""
    if not is_sharded(model):
        ckpt.load_weights_into(model, state, source)
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


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state in `optimizer.state_dict()` layout; under FSDP2 on rank 0 only."""
    # Before the first step there is nothing to gather, and DCP would first take a zero step to create
    # the state: AdamW would then count one step too many in its bias correction.
    if not is_sharded(model) or not optimizer.state:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_state(saving=True))  # keyed by parameter name
    names = _param_names(model, optimizer)
    return _renumber(full, {name: i for i, name in enumerate(names)}) if full else {}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (`optimizer.state_dict()` layout, from any number of ranks)."""
    if not is_sharded(model) or not state["state"]:  # an empty one (step 0) has no shards to scatter
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    by_name = _renumber(state, dict(enumerate(_param_names(model, optimizer))))
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_state(saving=False))
