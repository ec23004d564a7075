"""Checkpoints: safe to load, atomic to write, checked before use. One Checkpointer decides which
checkpoint a run starts from, saves and loads it, and the run's TrainState travels as one object.

A run directory holds `checkpoints/step_XXXXXXXX/`, each in one of two formats. Single (one process, DDP):
  model.safetensors   the weights (plain tensors: loading them can never run code)
  trainer.pt          optimizer and grad-scaler state, read with torch.load(weights_only=True)
  meta.json           the TrainState, val loss, the run config (as data) and a SHA-256 per file
Sharded (the default under FSDP2; nanopalm/sharded.py): `.metadata` and one `__R_0.distcp` per rank, written
by torch.distributed.checkpoint, each rank its own shards, with the same trainer.pt (hyperparameters only)
and meta.json. Either way a checkpoint is written into a temporary directory, fsync'ed and renamed into
place, so a crash or a full disk never leaves a half-written checkpoint under a final name, and the
previous ones stay intact. Nothing non-finite is ever saved. The newest `keep_last` checkpoints are kept,
plus the one with the best val loss. docs/RELIABILITY.md lists these promises and the tests that hold them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanopalm import atomic
from nanopalm import distributed as D
from nanopalm.config import RunConfig, config_from_dict
from nanopalm.errors import UserError, warn
from nanopalm.faults import fault_point
from nanopalm.lora import is_adapter, lora_base, merge_
from nanopalm.model import PaLM
from nanopalm.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 2
MODEL_FILE, TRAINER_FILE, META_FILE = "model.safetensors", "trainer.pt", "meta.json"
SHARD_INDEX = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint (sharded.INDEX_FILE)
REQUIRED_FILES = {"single": {MODEL_FILE, TRAINER_FILE}, "sharded": {SHARD_INDEX, TRAINER_FILE}}
_PREFIX = "step_"
_TMP, _OLD = ".tmp", ".old"  # a checkpoint being written; one being replaced (both removed by pruning)


@dataclass
class TrainState:
    """Where a run is: all a resume needs besides the weights and the optimizer. Saved as one object."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on
    data_offset: int = 0  # step s reads data step s + data_offset (batches skipped after loss spikes)
    rollbacks: int = 0  # loss-spike rollbacks so far
    best_val: float = math.inf  # lowest val loss so far
    seconds: float = 0.0  # wall time in the training loop, over every attempt (what max_minutes counts)
    cooldown_start: int = 0  # the cooldown the clock decided, replayed on resume (nanopalm/budget.py);
    cooldown_end: int = 0  # 0, 0: none decided, the last steps before max_iters cool down


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory whose files matched their checksums, with its meta.json."""

    path: Path
    meta: dict

    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent  # RUN/checkpoints/step_N

    @property
    def sharded(self) -> bool:
        return self.meta.get("format") == "sharded"

    def config(self) -> RunConfig:
        """The config it was trained with: JSON checked key by key, never code."""
        if not isinstance(self.meta.get("config"), dict):
            raise UserError(f"{self.path}/{META_FILE} has no config object; it is corrupt or not from nanoPALM")
        try:
            return config_from_dict(self.meta["config"])
        except UserError as e:
            raise UserError(f"the checkpoint's config is invalid ({e}); it is corrupt or from another "
                            "version") from None

    def train_state(self) -> TrainState:
        try:
            return TrainState(**self.meta["train_state"])
        except (KeyError, TypeError):
            raise UserError(f"{self.path}/{META_FILE} has no valid train_state; it is corrupt or from an older "
                            "nanoPALM: start a new run (--init_from takes its weights)") from None


@dataclass(frozen=True)
class StartPoint:
    """The checkpoint a run starts from: resumed (weights, optimizer, TrainState) or finetuned (weights)."""

    checkpoint: Checkpoint
    resume: bool


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{step:08d}"


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, oldest first (good or not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int:
    return int(path.name[len(_PREFIX):])


# ---- reading -------------------------------------------------------------------------------------
def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((Path(path) / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} has no readable {META_FILE} ({e}); it is incomplete or corrupt") from None
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint {path}: {META_FILE} is not a JSON object; it is corrupt")
    return meta


def verify_checkpoint(path: Path, share: tuple[int, int] = (0, 1)) -> Checkpoint:
    """The checkpoint at `path` after checking its files against their SHA-256; UserError if not.
    share=(i, n) hashes only every n-th file from the i-th: one rank's share (Checkpointer.verify)."""
    meta = read_meta(path)
    checksums = meta.get("sha256")
    required = REQUIRED_FILES.get(meta.get("format", "single"))
    if not isinstance(checksums, dict) or required is None or not required <= set(checksums):
        raise UserError(f"checkpoint {path} has no checksums in {META_FILE}; it is corrupt or not from nanoPALM")
    for i, (name, expected) in enumerate(sorted(checksums.items())):
        file = Path(path) / name
        if not file.is_file():
            raise UserError(f"checkpoint {path} is missing {name}; it is incomplete")
        if i % share[1] == share[0] and atomic.sha256(file) != expected:
            raise UserError(f"checkpoint {path}: {name} does not match its checksum; the file is corrupt")
    return Checkpoint(Path(path), meta)


def _val_loss(path: Path) -> float | None:
    """The checkpoint's val loss; None where its meta.json is missing or unreadable. Resume skips such a
    checkpoint with a warning, so pruning must not stop every later save on it either."""
    try:
        value = read_meta(path).get("val_loss")
    except UserError:
        return None
    return value if isinstance(value, (int, float)) else None


def find_checkpoint(path: str | Path, prefer_best: bool = False,
                    verify: Callable[[Path], Checkpoint] = verify_checkpoint) -> Checkpoint:
    """The checkpoint to use for `path`: a checkpoint directory, or a run directory (its newest good
    checkpoint, or the best by val loss with prefer_best). Corrupt ones are named and skipped."""
    path = Path(path)
    if path.is_file():
        raise UserError(f"{path} is a file: give a run directory (or one of its checkpoints/step_N directories)")
    if (path / META_FILE).is_file():
        return verify(path)
    candidates = _checkpoint_dirs(path)
    if not candidates:
        raise UserError(f"no checkpoint in {path}: train first (python train.py --out_dir={path})")
    order = list(reversed(candidates))  # newest first
    if prefer_best:  # lowest val loss first (the newest of equals), unscored ones last: only what is used is hashed
        losses = {p: _val_loss(p) for p in order}
        order.sort(key=lambda p: (losses[p] is None, losses[p] or 0.0))
    bad: dict[Path, str] = {}
    for candidate in order:
        try:
            found = verify(candidate)
        except UserError as e:
            bad[candidate] = str(e)
            continue
        for problem in bad.values():  # one line each on stderr, the run itself goes on from another checkpoint
            warn(f"skipping {problem}")
        return found
    raise UserError(f"no usable checkpoint in {path}: {len(bad)} corrupt or incomplete, the newest: "
                    f"{bad[candidates[-1]]}; restore a good copy, or start again in a new --out_dir")


def read_weights(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """A checkpoint's weights, whole tensors on the CPU, from either format."""
    if checkpoint.sharded:
        from nanopalm import sharded

        return sharded.read_whole(checkpoint.path, with_optimizer=False)[0]
    try:
        return load_file(checkpoint.path / MODEL_FILE)
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read weights in {checkpoint.path}: {e}") from None


def read_trainer_state(path: Path) -> dict:
    """Optimizer and scaler state. weights_only=True: a malicious pickle cannot run code here."""
    try:
        return torch.load(Path(path) / TRAINER_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only raises for anything but tensors and plain data
        raise UserError(f"refusing to load {path / TRAINER_FILE}: it holds objects other than tensors and plain "
                        "data, which could run code; use a checkpoint written by nanoPALM") from None
    except Exception as e:  # RuntimeError, EOFError, ... for a damaged file
        raise UserError(f"cannot read trainer state in {path}: {str(e).splitlines()[0]}") from None


def check_weights_fit(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """A key or shape mismatch between a checkpoint and a model, as one line naming the difference. A LoRA
    model loads its base's weights and its adapters apart: `state` holds either, never both."""
    own = model.state_dict()
    if any(is_adapter(k) for k in own):
        adapters = any(is_adapter(k) for k in state)
        own = {k: v for k, v in own.items() if is_adapter(k) == adapters}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"checkpoint {source} does not fit this model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; use the same model settings as the checkpoint")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise UserError(f"checkpoint {source}: {name} has shape {tuple(tensor.shape)} but the model "
                            f"expects {tuple(own[name].shape)}; use the model settings it was trained with")


def load_weights(checkpoint: Checkpoint, model: torch.nn.Module, info: D.DistInfo | None = None,
                 verify: Callable[[Path], Checkpoint] = verify_checkpoint,
                 optimizer: torch.optim.Optimizer | None = None, trainer_state: dict | None = None) -> None:
    """A checkpoint's weights into `model` (on every rank of `info`), from either format: a LoRA checkpoint's
    base first, then its adapters. A sharded checkpoint's optimizer state comes with its weights, if asked."""
    base = lora_base(checkpoint, verify)
    for source in ([base] if base is not None else []) + [checkpoint]:
        if source.sharded:  # every rank reads what its own shards need
            from nanopalm import sharded

            shapes = sharded.tensor_shapes(source.path)
            check_weights_fit(model, {name: torch.empty(shape, device="meta") for name, shape in shapes.items()},
                              source.path)
            sharded.load(source.path, model, *((optimizer, trainer_state) if source is checkpoint else (None, None)))
        else:
            weights = read_weights(source)
            check_weights_fit(model, weights, source.path)
            D.scatter_model_state(model, weights, info or D.DistInfo())


def load_model(path: str | Path, device: str | torch.device = "cpu", prefer_best: bool = True
               ) -> tuple[PaLM, Checkpoint]:
    """(model in eval mode on `device`, its checkpoint) from a run or checkpoint directory: what sample.py,
    eval.py and finetuning start from. The best checkpoint by val loss, unless prefer_best=False. A LoRA
    run's adapters come merged into its base: a plain model with the same logits."""
    found = find_checkpoint(path, prefer_best=prefer_best)
    model = PaLM(found.config().model)
    load_weights(found, model)
    merge_(model)
    return model.to(device).eval(), found


def load_model_and_tokenizer(path: str | Path, device: str | torch.device = "cpu"
                             ) -> tuple[PaLM, Tokenizer, Checkpoint]:
    """load_model, and the tokenizer train.py saved in the run directory, checked to fit the model."""
    model, found = load_model(path, device)
    tokenizer = load_tokenizer(found.run_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer in {found.run_dir} has {tokenizer.vocab_size} tokens but the model "
                        f"only {model.config.vocab_size}: this run's files do not belong together")
    return model, tokenizer, found


# ---- writing -------------------------------------------------------------------------------------
def non_finite(step: int, states: dict) -> str | None:
    """Why checkpoint `step` must not be saved: a NaN or inf in any tensor would poison every run resumed from
    it (the problem, naming the tensor), or None. A sharded (DTensor) tensor is checked on this rank's shard."""
    def walk(value, name: str) -> str | None:
        if isinstance(value, torch.Tensor):
            local = D.local_shard(value)
            if local.is_floating_point() and not torch.isfinite(local).all():
                return (f"refusing to save checkpoint step {step}: {name} holds NaN or inf; the run diverged: "
                        "lower --learning_rate and continue with --resume from the last checkpoint")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) \
            else ()
        return next((p for key, item in items if (p := walk(item, f"{name}.{key}"))), None)
    return next((p for name, state in states.items() if (p := walk(state, name))), None)


def write_atomically(run_dir: Path, step: int, write: Callable[[Path], None], meta: dict, keep_last: int,
                     info: D.DistInfo | None = None) -> Path:
    """Checkpoint `step`: its files written by `write(tmp)` (on every rank of `info`, if given) into a
    temporary directory, hashed (each rank its share), meta.json last, renamed into place by rank 0, which
    then prunes. meta must hold `config` and `val_loss`. A failed write (disk full, ...) on any rank is a
    UserError on every rank and leaves the previous checkpoints as they were."""
    info = info or D.DistInfo()
    final = checkpoint_dir(run_dir, step)

    def manifest(checksums: dict[str, str]) -> bytes:
        full = {**meta, "step": step, "format_version": FORMAT_VERSION, "sha256": checksums}
        return (json.dumps(full, indent=2, sort_keys=True) + "\n").encode()
    try:
        atomic.write_directory(final, write, manifest, META_FILE, (OSError, RuntimeError, SafetensorError),
                               (info.rank, info.world_size), functools.partial(D.all_gather, info=info))
    except atomic.WriteFailed as e:
        raise UserError(f"cannot write checkpoint {final} ({e}): the previous checkpoints are intact; free space "
                        "on that disk (or fix its permissions), then continue with --resume") from None
    if info.is_main:
        prune_checkpoints(run_dir, keep_last)
    return final


def write_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], trainer_state: dict,
                     meta: dict, keep_last: int) -> Path:
    """Write single-file checkpoint `step` atomically (one process: rank 0), then prune old ones."""
    problem = non_finite(step, {"model": model_state, "trainer": trainer_state})
    if problem:
        raise UserError(problem)

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / MODEL_FILE)
        fault_point("checkpoint_write")
        with open(tmp / TRAINER_FILE, "wb") as f:  # a Python file: a full disk surfaces as OSError(ENOSPC)
            torch.save(trainer_state, f)
    return write_atomically(run_dir, step, write, {**meta, "format": "single"}, keep_last)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest keep_last checkpoints and the one with the lowest val loss; remove what a killed
    writer left behind (pruning follows a checkpoint's rename into place, so a *.tmp or *.old here is stale)."""
    for leftover in (Path(run_dir) / "checkpoints").glob(f"{_PREFIX}*"):
        if leftover.name.endswith((_TMP, _OLD)):
            shutil.rmtree(leftover, ignore_errors=True)
    found = _checkpoint_dirs(run_dir)
    keep = set(found[-keep_last:])
    scored = [(v, p) for p in found if (v := _val_loss(p)) is not None]
    if scored:
        keep.add(min(scored, key=lambda vp: vp[0])[1])
    for p in found:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


# ---- the run's checkpoints ---------------------------------------------------------------------
class Checkpointer:
    """A run's checkpoints: which one it starts from, and saving and loading its whole state.

    `save` and `load` are called on every rank (under FSDP2 they gather and scatter); rank 0 writes.
    """

    def __init__(self, run_dir: str | Path, keep_last: int, info: D.DistInfo, checkpoint_format: str = "auto"
                 ) -> None:
        self.run_dir, self.keep_last, self.dist = Path(run_dir), keep_last, info
        # What it writes (it reads either): sharded under FSDP2 unless asked otherwise, single-file elsewhere.
        self.sharded = checkpoint_format == "sharded" or (checkpoint_format == "auto" and info.sharded)

    def start_point(self, resume: bool, init_from: str) -> StartPoint | None:
        """The one decision of where a run starts: its own newest good checkpoint (--resume, or torchrun
        restarting this job after a failure), another run's best weights (--init_from), or scratch."""
        has_checkpoints = bool(_checkpoint_dirs(self.run_dir))
        if resume and has_checkpoints:
            newest = self.latest_good()
            made = next((k for k in ("imported_from", "merged_from") if k in newest.meta), None)
            if made:  # weights alone: no optimizer state, no data to continue on
                raise UserError(f"{self.run_dir} was {made.split('_')[0]} by python -m nanopalm.convert: there is no "
                                f"run to resume; finetune it with --init_from={self.run_dir} and a new --out_dir")
            return StartPoint(newest, resume=True)
        if has_checkpoints:
            # torchrun restarted this job after a failure (--max_restarts): continue from the checkpoint this
            # same job wrote (a first start never finds one). Not TORCHELASTIC_RESTART_COUNT: on a node whose
            # own workers were healthy it stays 0. An earlier job's checkpoint always needs --resume.
            if D.job_id() is not None:
                newest = self.latest_good()
                if newest.meta.get("job_id") == D.job_id():
                    return StartPoint(newest, resume=True)
            raise UserError(f"{self.run_dir} already holds a run: add --resume to continue it, or pick a new --out_dir")
        if resume and self.dist.is_main:  # a job killed before its first checkpoint, started again
            print(f"--resume: no checkpoint in {self.run_dir} yet, starting the run from "
                  f"{'the weights of ' + init_from if init_from else 'step 0'}", flush=True)
        if init_from:
            return StartPoint(find_checkpoint(init_from, prefer_best=True, verify=self.verify), resume=False)
        return None

    def latest_good(self) -> Checkpoint:
        """The run's newest checkpoint whose files match their checksums (corrupt ones are named, skipped)."""
        return find_checkpoint(self.run_dir, verify=self.verify)

    def verify(self, path: Path) -> Checkpoint:
        """verify_checkpoint, each rank hashing its share of the files: good when every share is."""
        problem = None
        try:
            found = verify_checkpoint(path, (self.dist.rank, self.dist.world_size))
        except UserError as e:
            problem = str(e)
        problems = [p for p in D.all_gather(problem, self.dist) if p]
        if problems:
            raise UserError(problems[0])
        return found

    def discard_after(self, step: int) -> None:
        """Remove the checkpoints after `step`: after a loss-spike rollback to `step` they hold the abandoned
        trajectory, and a resume must continue the new one."""
        if self.dist.is_main:
            for path in _checkpoint_dirs(self.run_dir):
                if _step_of(path) > step:
                    shutil.rmtree(path)

    def save(self, state: TrainState, val_loss: float, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, meta: dict) -> None:
        """Checkpoint step `state.step`: weights, optimizer, scaler and TrainState, with `meta` (config, ...)."""
        meta = {**meta, "train_state": dataclasses.asdict(state), "val_loss": val_loss,
                "world_size": self.dist.world_size, "job_id": D.job_id(), "torch_version": torch.__version__}
        adapters = model.config.lora_rank > 0  # a LoRA run saves its adapters alone, single-file (they are small)
        if self.sharded and not adapters:  # every rank checks and writes its own shards, rank 0 trainer.pt
            from nanopalm import sharded  # (here: DCP takes a second to import)

            shards = sharded.state_to_save(model, optimizer)
            problems = [p for p in D.all_gather(non_finite(state.step, shards), self.dist) if p]
            if problems:
                raise UserError(problems[0])
            trainer_state = {"param_groups": sharded.param_groups(model, optimizer), "scaler": scaler.state_dict(),
                             "optimizer_state": "optimizer" in shards}

            def write(tmp: Path) -> None:
                if self.dist.is_main:
                    with open(tmp / TRAINER_FILE, "wb") as f:
                        torch.save(trainer_state, f)
                sharded.write(tmp, shards)
                fault_point("checkpoint_write")  # this rank's shards are written, nothing renamed yet
            write_atomically(self.run_dir, state.step, write, {**meta, "format": "sharded"}, self.keep_last,
                             self.dist)
        else:  # gathered whole onto rank 0, which writes
            model_state = D.gather_model_state(model, self.dist, adapters)
            trainer_state = {"optimizer": D.gather_optimizer_state(model, optimizer, self.dist),
                             "scaler": scaler.state_dict()}
            if self.dist.is_main:
                write_checkpoint(self.run_dir, state.step, model_state, trainer_state, meta, self.keep_last)
        D.barrier(self.dist)

    def load(self, checkpoint: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
             scaler: torch.amp.GradScaler | None = None) -> TrainState:
        """Load the weights, and with an optimizer also its state, the scaler's and the TrainState, from a
        checkpoint of either format written by any number of ranks."""
        trainer_state = read_trainer_state(checkpoint.path) if optimizer is not None else None
        load_weights(checkpoint, model, self.dist, self.verify, optimizer, trainer_state)
        if optimizer is not None and not checkpoint.sharded:
            D.scatter_optimizer_state(model, optimizer, trainer_state["optimizer"], self.dist)
        if trainer_state is not None and scaler is not None:
            scaler.load_state_dict(trainer_state["scaler"])
        return TrainState() if optimizer is None else checkpoint.train_state()
