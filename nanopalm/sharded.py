"""Sharded checkpoints through torch.distributed.checkpoint (DCP): each rank writes only the shards it holds
of the model and of the optimizer state, all ranks at once, and any number of ranks, or one process, reads
them back, each rank reading just the pieces its own shards need (DCP reshards on load: 2 ranks -> 1, 2 -> 4).

This module is the sharded format: which state goes into the files and how it comes back
(save_checkpoint and load_checkpoint, which checkpoint.Checkpointer calls), and its consolidation into the
single-file format (`python -m nanopalm.checkpoint consolidate RUN`). checkpoint.py does the rest as for
the single-file format: the temporary directory renamed into place, a SHA-256 per file in meta.json,
keep_last and the best one. Only tensors go through DCP; the optimizer's hyperparameters and the grad
scaler's state travel in trainer.pt, written by rank 0 and read with torch.load(weights_only=True).

Loading a file may never run code (docs/RELIABILITY.md), and DCP would: it reads its index (`.metadata`)
with pickle.load and non-tensor entries with torch.load(weights_only=False). So the index is read here by an
unpickler that knows only DCP's metadata classes, and a non-tensor entry is refused.
"""

from __future__ import annotations

import contextlib
import pickle
import shutil
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
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from nanopalm import distributed as D
from nanopalm.checkpoint import (
    SHARD_INDEX,
    TRAINER_FILE,
    Checkpoint,
    check_weights_fit,
    checkpoint_dir,
    find_checkpoint,
    non_finite,
    read_trainer_state,
    write_atomically,
    write_checkpoint,
)
from nanopalm.errors import ArgumentParser, UserError
from nanopalm.tokenizer import load_tokenizer

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
        with open(Path(directory) / SHARD_INDEX, "rb") as f:
            index = _IndexUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {Path(directory) / SHARD_INDEX}: it holds {e}, which is not part of a "
                        "checkpoint index and could run code; use a checkpoint written by nanoPALM") from None
    except Exception as e:  # OSError, EOFError, ... for a missing or damaged file
        raise UserError(f"cannot read the shard index of {directory}: {str(e).splitlines()[0]}") from None
    if not isinstance(index, dcp_metadata.Metadata):
        raise UserError(f"{Path(directory) / SHARD_INDEX} is not a torch.distributed.checkpoint index")
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


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, meta: dict, keep_last: int, info: D.DistInfo) -> None:
    """Checkpoint `step` in the sharded format, on every rank: each checks and writes its own shards, rank 0
    trainer.pt; checkpoint.write_atomically does the temporary directory, checksums (every rank its share of
    the files), meta.json, the rename and the pruning."""
    state = state_to_save(model, optimizer)
    problems = [p for p in D.all_gather(non_finite(step, state), info) if p]
    if problems:
        raise UserError(problems[0])
    trainer_state = {"param_groups": param_groups(model, optimizer), "scaler": scaler.state_dict(),
                     "optimizer_state": "optimizer" in state}

    def write_files(tmp: Path) -> None:
        if info.is_main:
            with open(tmp / TRAINER_FILE, "wb") as f:
                torch.save(trainer_state, f)
        write(tmp, state)
    write_atomically(run_dir, step, write_files, {**meta, "format": "sharded"}, keep_last, info)


def load_checkpoint(checkpoint: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scaler: torch.amp.GradScaler | None) -> None:
    """Load a sharded checkpoint into the model (and optimizer, scaler), on every rank."""
    shapes = tensor_shapes(checkpoint.path)
    check_weights_fit(model, {name: torch.empty(shape, device="meta") for name, shape in shapes.items()},
                      checkpoint.path)
    trainer_state = read_trainer_state(checkpoint.path) if optimizer is not None else None
    load(checkpoint.path, model, optimizer, trainer_state)
    if trainer_state is not None and scaler is not None:
        scaler.load_state_dict(trainer_state["scaler"])


def tensor_shapes(directory: Path) -> dict[str, torch.Size]:
    """The model's tensors in a sharded checkpoint, name -> shape, from its index alone."""
    index = read_index(directory)
    return {key.removeprefix("model."): item.size for key, item in index.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(item, dcp_metadata.TensorStorageMetadata)}


def load(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         trainer_state: dict | None) -> None:
    """Load the weights, and with an optimizer its state (trainer_state: the checkpoint's trainer.pt), into
    this rank's model and optimizer, whatever the number of ranks that wrote them. Call on every rank."""
    state = {"model": get_model_state_dict(model)}
    with_state = optimizer is not None and trainer_state["optimizer_state"]
    if with_state:
        # A fresh optimizer has no state to load into yet: DCP creates it with a zero step (lr 0, every
        # parameter unchanged), and every value is then overwritten by the checkpoint's.
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)["state"]
    _read(directory, state)
    set_model_state_dict(model, state["model"])
    if with_state:
        set_optimizer_state_dict(model, optimizer, {"state": state["optimizer"],
                                                    "param_groups": trainer_state["param_groups"]})
    elif optimizer is not None:  # saved before the first step: the state of a fresh optimizer
        numbers = {name: i for i, name in enumerate(D.param_names(model, optimizer))}
        fresh = {"state": {}, "param_groups": trainer_state["param_groups"]}
        optimizer.load_state_dict(D.renumber_optimizer_state(fresh, numbers))


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


# ---- consolidation: `python -m nanopalm.checkpoint consolidate RUN` ----------------------------------
def consolidate(source: str | Path, out: str | Path | None = None) -> Path:
    """Write the newest good checkpoint of run `source` (or the checkpoint directory `source`), sharded, as
    a single-file checkpoint (model.safetensors, trainer.pt with the whole optimizer state) in run directory
    `out` (default: SOURCE-consolidated), with the run's tokenizer and config: what sample.py, eval.py and
    --init_from read on any machine, and one process resumes. Holds the whole state in CPU memory."""
    found = find_checkpoint(source)
    if not found.sharded:
        raise UserError(f"{found.path} is already a single-file checkpoint: sample.py, eval.py and --init_from "
                        "read it as it is")
    out_dir = Path(out) if out else found.run_dir.with_name(found.run_dir.name + "-consolidated")
    if (out_dir / "checkpoints").exists():
        raise UserError(f"{out_dir} already holds checkpoints: give another --out (or remove it)")
    tokenizer = load_tokenizer(found.run_dir)  # sample.py reads it from the run directory: first, or nothing
    size = sum(f.stat().st_size for f in found.path.iterdir() if f.is_file())
    print(f"reading {found.path} ({size / 2**30:.2f} GiB, every rank's shards) into memory...", flush=True)
    weights, optimizer_state = read_whole(found.path)
    trainer_state = read_trainer_state(found.path)
    groups = trainer_state["param_groups"]
    numbers = {name: i for i, name in enumerate(name for group in groups for name in group["params"])}
    optimizer = D.renumber_optimizer_state({"state": optimizer_state, "param_groups": groups}, numbers)
    meta = {k: v for k, v in found.meta.items() if k not in ("sha256", "format", "format_version", "step")}
    print(f"writing {checkpoint_dir(out_dir, found.step)}...", flush=True)
    write_checkpoint(out_dir, found.step, weights, {"optimizer": optimizer, "scaler": trainer_state["scaler"]},
                     meta, keep_last=1)
    tokenizer.save(out_dir)
    if (found.run_dir / "config.json").is_file():
        shutil.copyfile(found.run_dir / "config.json", out_dir / "config.json")
    return checkpoint_dir(out_dir, found.step)


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="python -m nanopalm.checkpoint", description=consolidate.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    command = sub.add_parser("consolidate", help="a sharded checkpoint as one single-file checkpoint")
    command.add_argument("source", help="a run directory (its newest good checkpoint) or a checkpoint directory")
    command.add_argument("--out", default=None, help="the run directory to write (default: SOURCE-consolidated)")
    args = parser.parse_args(argv)
    written = consolidate(args.source, args.out)
    print(f"wrote {written}; to sample from it: python sample.py --out_dir={written.parent.parent}")


__all__ = ["read_index", "param_groups", "state_to_save", "write", "save_checkpoint",
           "load_checkpoint", "tensor_shapes", "load", "read_whole", "consolidate", "main"]
