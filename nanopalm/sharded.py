"""Sharded checkpoints through torch.distributed.checkpoint (DCP): each rank writes only the shards it holds
of the model and of the optimizer state, all ranks at once, and any number of ranks, or one process, reads
them back, each rank reading just the pieces its own shards need (DCP reshards on load: 2 ranks -> 1, 2 -> 4).

This module is the sharded format: which state goes into the files and how it comes back (state_to_save,
write, load, read_whole, which checkpoint.py's Checkpointer and consolidation call; it imports nothing of
checkpoint.py). checkpoint.py does the rest as for the single-file format: the temporary directory renamed
into place, a SHA-256 per file in meta.json, keep_last and the best one. Only tensors go through DCP; the
optimizer's hyperparameters and the grad scaler's state travel in trainer.pt, written by rank 0 and read with
torch.load(weights_only=True).

Loading a file may never run code (docs/RELIABILITY.md), and DCP would: it reads its index (`.metadata`)
with pickle.load and non-tensor entries with torch.load(weights_only=False). So the index is read here by an
unpickler that knows only DCP's metadata classes, and a non-tensor entry is refused.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from nanopalm import distributed as D
from nanopalm.errors import UserError
from nanopalm.lora import is_adapter

INDEX_FILE = ".metadata"  # DCP's index of a sharded checkpoint (checkpoint.SHARD_INDEX, without importing DCP)
# Every class a DCP index pickles (torch 2.13): its dataclasses, torch.Size, dtypes, a path, a layout lookup.
_INDEX_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


class _IndexUnpickler(pickle.Unpickler):
    """Python's pickle with only DCP's metadata classes allowed ("Restricting Globals", pickle docs)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _INDEX_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_index(directory: Path) -> dcp_metadata.Metadata:
    """A sharded checkpoint's DCP index, read without running code; UserError if it is not one."""
    try:
        with open(Path(directory) / INDEX_FILE, "rb") as f:
            index = _IndexUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {Path(directory) / INDEX_FILE}: it holds {e}, which is not part of a "
                        "checkpoint index and could run code; use a checkpoint written by nanoPALM") from None
    except Exception as e:  # OSError, EOFError, ... for a missing or damaged file
        raise UserError(f"cannot read the shard index of {directory}: {str(e).splitlines()[0]}") from None
    if not isinstance(index, dcp_metadata.Metadata):
        raise UserError(f"{Path(directory) / INDEX_FILE} is not a torch.distributed.checkpoint index")
    return index


class _Reader(FileSystemReader):
    """DCP's file reader, with its index read by read_index instead of pickle.load."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        index = read_index(Path(self.path))
        index.storage_meta = index.storage_meta or dcp_metadata.StorageMeta()
        index.storage_meta.load_id = self.load_id
        return index


class _TensorsOnly(dcp.DefaultLoadPlanner):
    """DCP's load planner, refusing what only a crafted checkpoint holds here: a pickled non-tensor entry."""

    def load_bytes(self, read_item, value) -> None:
        raise UserError(f"refusing to load entry {read_item.dest_index.fqn!r} of a sharded checkpoint: nanoPALM "
                        "writes only tensors there, and unpickling it could run code")


@contextlib.contextmanager
def _dcp() -> Iterator[None]:
    """Around a DCP call. A failure on any rank comes as a CheckpointException (a BaseException) on every
    rank: re-raised as the first failing rank's own exception (OSError(ENOSPC), our UserError, ...). And DCP
    warns on every call without a process group, where one process is a case as good as any other."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            yield
        except CheckpointException as e:
            failure = next(iter(e.failures.values()))[0]
            raise failure if isinstance(failure, Exception) else RuntimeError(str(failure)) from None


def _read(directory: Path, state: dict) -> None:
    """Fill `state`'s tensors (plain or DTensor shards, on any device) from the checkpoint, in place."""
    with _dcp():
        dcp.load(state, storage_reader=_Reader(directory), planner=_TensorsOnly(), no_dist=not dist.is_initialized())


def param_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's hyperparameters, with each group's parameters by name (as DCP keys their state)."""
    names = dict(enumerate(D.param_names(model, optimizer)))
    return D.renumber_optimizer_state({"state": {}, "param_groups": optimizer.state_dict()["param_groups"]},
                                      names)["param_groups"]


def state_to_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What this rank writes: its shards (FSDP2 DTensors) or whole tensors (one process, DDP), by name. The
    optimizer's state only once it has some: before its first step DCP would take a zero step to create it
    (see distributed.gather_optimizer_state), and an empty state is what a fresh optimizer has anyway."""
    state = {"model": get_model_state_dict(model)}
    if optimizer.state:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)["state"]
    return state


def write(directory: Path, state: dict) -> None:
    """Every rank writes its part of `state` into `directory` (one file per rank, then rank 0 the index).
    DCP writes each replicated tensor (DDP, one process) once, whichever rank holds it."""
    with _dcp():
        dcp.save(state, checkpoint_id=directory, no_dist=not dist.is_initialized())


def tensor_shapes(directory: Path) -> dict[str, torch.Size]:
    """The model's tensors in a sharded checkpoint, name -> shape, from its index alone."""
    index = read_index(directory)
    return {key.removeprefix("model."): item.size for key, item in index.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(item, dcp_metadata.TensorStorageMetadata)}


def load(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         trainer_state: dict | None) -> None:
    """Load the weights, and with an optimizer its state (trainer_state: the checkpoint's trainer.pt), into
    this rank's model and optimizer, whatever the number of ranks that wrote them. Call on every rank."""
    # A LoRA model's adapters are never in a sharded checkpoint (a LoRA run saves them single-file): its base is.
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if not is_adapter(k)}}
    with_state = optimizer is not None and trainer_state["optimizer_state"]
    if with_state:
        # A fresh optimizer has no state to load into yet: DCP creates it with a zero step (lr 0, every
        # parameter unchanged), and every value is then overwritten by the checkpoint's.
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)["state"]
    _read(directory, state)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    if with_state:
        set_optimizer_state_dict(model, optimizer, {"state": state["optimizer"],
                                                    "param_groups": trainer_state["param_groups"]})
    elif optimizer is not None:  # saved before the first step: the state of a fresh optimizer
        numbers = {name: i for i, name in enumerate(D.param_names(model, optimizer))}
        fresh = {"state": {}, "param_groups": trainer_state["param_groups"]}
        optimizer.load_state_dict(D.renumber_optimizer_state(fresh, numbers))


def read_tensor(directory: Path, name: str) -> torch.Tensor:
    """One model tensor, whole on this process's CPU: what an export streams, never the whole model at once."""
    item = read_index(directory).state_dict_metadata[f"model.{name}"]
    state = {"model": {name: torch.empty(item.size, dtype=item.properties.dtype)}}
    _read(directory, state)
    return state["model"][name]


def read_whole(directory: Path, with_optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, optimizer state by parameter name) as whole tensors on this process's CPU: the whole
    checkpoint in memory, what consolidation and sample.py read. Works without a process group."""
    index = read_index(directory)
    state: dict = {"model": {}, "optimizer": {}}
    for key, item in index.state_dict_metadata.items():
        path = index.planner_data[key]  # ("model", name) or ("optimizer", name, "exp_avg"): DCP's own nesting
        if not isinstance(item, dcp_metadata.TensorStorageMetadata) or path[0] not in state:
            continue
        if path[0] == "optimizer" and not with_optimizer:
            continue
        node = state[path[0]]
        for part in path[1:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = torch.empty(item.size, dtype=item.properties.dtype)
    _read(directory, {k: v for k, v in state.items() if v})
    return state["model"], state["optimizer"]


__all__ = ["read_index", "param_groups", "state_to_save", "write", "tensor_shapes", "load", "read_tensor",
           "read_whole"]
