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
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanopalm.device import Precision
from nanopalm.errors import UserError, warn
from nanopalm.lora import is_adapter
from nanopalm.model import PaLM, PaLMConfig

# FSDP2 and torch.distributed.checkpoint take a second to import: only the FSDP2 paths import them.
_WRAPPED = "_checkpoint_wrapped_module."  # torch's checkpoint_wrapper puts it in named_parameters()


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
        warn("restarts under torchrun's shared rendezvous store can fail on stale addresses; launch with "
             "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/DISTRIBUTED.md)")
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



# ---- building, checkpointing, compiling and wrapping ----------------------------------------------
def build_model(config: PaLMConfig, info: DistInfo, device: torch.device, precision: Precision, seed: int,
                activation_checkpointing: str = "none", compile: bool = False) -> tuple[PaLM, nn.Module]:
    """(the model, the module the training loop calls), in torchtitan's order: built on the meta device (no
    memory at all), activation checkpointing, torch.compile per block, FSDP2 sharding; only then are the
    parameters, FSDP2's shards, materialised on `device` and initialised there, so that no rank ever holds the
    whole model. The init draws from `seed` as one process would (model.normal_): the same weights on any
    number of ranks. DDP wraps last: it needs the real parameters. Build the optimizer on the model afterwards:
    under FSDP2 it must hold the sharded (DTensor) parameters."""
    with torch.device("meta"):
        model = PaLM(config)
    checkpoint_activations(model, activation_checkpointing)
    if compile:
        compile_blocks(model)
    if info.sharded:
        shard(model, precision)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()  # also rebuilds the RoPE tables, which to_empty left uninitialised
    if not info.enabled or info.sharded:
        return model, model
    # The RoPE tables are constant buffers: nothing to broadcast before every forward. Gradients as views
    # of the all-reduce buckets: one copy of them, not two (4 bytes a parameter less).
    return model, nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
        gradient_as_bucket_view=True)


def _selective_policy() -> list:
    """The ops whose outputs selective checkpointing keeps: every matmul (with a bias: addmm) and the fused
    attention kernels. The backward then recomputes only the cheap elementwise work, LayerNorm, RoPE,
    SwiGLU, dropout, but no matmul (torch.utils.checkpoint's selective checkpoint policy)."""
    aten = torch.ops.aten
    return [aten.mm.default, aten.addmm.default, aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_cudnn_attention.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default]


def checkpoint_activations(model: PaLM, mode: str) -> None:
    """Activation checkpointing of every block: `full` keeps only each block's input and recomputes its
    forward in the backward; `selective` also keeps the matmul and attention outputs (_selective_policy);
    `none` keeps everything. Blocks are wrapped as torchtitan wraps them (torch's checkpoint_wrapper, whose
    state_dict keys stay the block's own); the RNG state is restored before the recomputation, so dropout
    draws the very masks of the forward and the gradients are those of `none`."""
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    context = functools.partial(create_selective_checkpoint_contexts, _selective_policy())
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True,
                                             **({"context_fn": context} if mode == "selective" else {}))


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block in place, as torchtitan does: parameter names are unchanged
    (no `_orig_mod.` in checkpoints), and FSDP2's and DDP's hooks stay outside the compiled code. After
    activation checkpointing, so that the compiler sees the recomputation."""
    for block in model.blocks:
        block.compile()


def shard(model: nn.Module, precision: Precision) -> None:
    """FSDP2 in place: one all-gather unit per block, and the root (the embedding, which is also the tied
    output layer, and the final LayerNorm)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=precision.fsdp_param_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.blocks):
        # The last block's weights are needed again at once by the backward: keep them gathered (torchtitan).
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(model.blocks) - 1)
    fully_shard(model, mp_policy=policy)


# ---- the step ------------------------------------------------------------------------------------
def no_grad_sync(model: nn.Module, info: DistInfo, last_micro_step: bool) -> contextlib.AbstractContextManager:
    """DDP: skip the all-reduce on every micro-step but the last (its gradients are whole on every rank
    anyway). FSDP2 reduce-scatters every micro-step, as torchtitan does: skipping it would accumulate
    whole, unsharded fp32 gradients on every rank (4 bytes a parameter), what sharding is there to avoid."""
    if last_micro_step or not info.enabled or info.sharded:
        return contextlib.nullcontext()
    return model.no_sync()


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


def all_gather(value: object, info: DistInfo) -> list:
    """Every rank's `value` (any picklable object), in rank order; [value] in one process."""
    if not info.enabled:
        return [value]
    values: list = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ---- full state dicts for checkpoints ------------------------------------------------------------
# Call these on every rank: under FSDP2 they gather or scatter. Saving, the full state is gathered to
# rank 0, tensor by tensor onto its CPU (the other ranks get {}); loading, every rank passes the whole
# state (read from the files) and keeps its shard.
def _full_state(saving: bool, trainable_only: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # strict=False on loading: check_weights_fit has checked the keys (a LoRA model loads base and adapters apart)
    return StateDictOptions(full_state_dict=True, cpu_offload=saving, ignore_frozen_params=trainable_only,
                            strict=saving)


def gather_model_state(model: nn.Module, info: DistInfo, adapters_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state, or a LoRA model's adapters alone (its only trainable weights); under
    FSDP2 on rank 0 only."""
    if not info.sharded:
        return {k: v for k, v in model.state_dict().items() if is_adapter(k) or not adapters_only}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_state(saving=True, trainable_only=adapters_only))


def scatter_model_state(model: nn.Module, state: dict[str, torch.Tensor], info: DistInfo) -> None:
    """Load a full model state (read from a checkpoint on every rank, its keys checked by
    checkpoint.check_weights_fit) into the model."""
    if not info.sharded:
        model.load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_state(saving=False))


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in torch's optimizer numbering (0, 1, ... through the param groups)."""
    # The state_dict names: without the prefix of activation checkpointing's wrapper (checkpoint_activations).
    names = {param: name.replace(_WRAPPED, "") for name, param in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def renumber_optimizer_state(state: dict, key: dict) -> dict:
    """An optimizer state dict with each parameter's key (its state, its group entries) mapped through `key`:
    torch's numbering (0, 1, ...) <-> parameter names (DCP's)."""
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
    names = param_names(model, optimizer)
    return renumber_optimizer_state(full, {name: i for i, name in enumerate(names)}) if full else {}


def scatter_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, info: DistInfo) -> None:
    """Load a full optimizer state (`optimizer.state_dict()` layout, from any number of ranks)."""
    if not info.sharded or not state["state"]:  # an empty one (step 0) has no shards to scatter
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    by_name = renumber_optimizer_state(state, dict(enumerate(param_names(model, optimizer))))
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_state(saving=False))
