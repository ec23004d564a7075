"""Checkpoints: safe to load, atomic to write, checked before use.

A run directory holds `checkpoints/step_XXXXXXXX/`, each with
  model.safetensors   the weights (plain tensors: loading them can never run code)
  trainer.pt          optimizer and grad-scaler state, read with torch.load(weights_only=True)
  meta.json           step, data position, val loss, the run config (as data) and a SHA-256 per file
A checkpoint is written into a temporary directory, fsync'ed and renamed into place, so a crash or a
full disk never leaves a half-written checkpoint under a final name, and the previous ones stay intact.
Nothing non-finite is ever saved. The newest `keep_last` checkpoints are kept, plus the one with the best
val loss. docs/RELIABILITY.md lists these promises and the tests that hold them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanopalm.errors import UserError
from nanopalm.model import PaLM, PaLMConfig

FORMAT_VERSION = 1
MODEL_FILE, TRAINER_FILE, META_FILE = "model.safetensors", "trainer.pt", "meta.json"
_PREFIX = "step_"
_TMP, _OLD = ".tmp", ".old"  # a checkpoint being written; one being replaced (both removed by pruning)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict,
    meta: dict,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically, then prune old ones. meta must hold `config` and `val_loss`.

    A failed write (disk full, ...) is a UserError and leaves the previous checkpoints as they were."""
    final = checkpoint_dir(run_dir, step)
    tmp, old = final.with_name(final.name + _TMP), final.with_name(final.name + _OLD)
    _check_finite(step, {"model": model_state, "trainer": trainer_state})
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / MODEL_FILE)
        with open(tmp / TRAINER_FILE, "wb") as f:  # a Python file: a full disk surfaces as OSError(ENOSPC)
            torch.save(trainer_state, f)
        files = {name: _sha256(tmp / name) for name in (MODEL_FILE, TRAINER_FILE)}
        meta = {**meta, "step": step, "format_version": FORMAT_VERSION, "sha256": files}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name in (MODEL_FILE, TRAINER_FILE, META_FILE):
            _fsync(tmp / name)
        if final.exists():  # re-saving a step (after a rollback): move the old one aside, never half-delete it
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError, SafetensorError)):
            raise UserError(f"cannot write checkpoint {final} ({_write_failure(e)}): the previous checkpoints "
                            "are intact; free space on that disk (or fix its permissions), then continue with "
                            "--resume") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    prune_checkpoints(run_dir, keep_last)
    return final


def _check_finite(step: int, states: dict) -> None:
    """A NaN or inf in any saved tensor would poison every run resumed from it: refuse, naming the tensor."""
    def walk(value, name: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise UserError(f"refusing to save checkpoint step {step}: {name} holds NaN or inf; the run "
                                "diverged: lower --learning_rate and continue with --resume from the last checkpoint")
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{name}.{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{name}.{i}")
    for name, state in states.items():
        walk(state, name)


def _write_failure(error: BaseException) -> str:
    """The OS's reason for a failed write ("No space left on device"): torch wraps it in its own errors."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and cause.strerror:
        return cause.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _steps(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def has_checkpoints(run_dir: Path) -> bool:
    """Whether the run has any checkpoint directory, good or not (a run killed early may have none)."""
    return bool(_steps(run_dir))


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((Path(ckpt) / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt} has no readable {META_FILE} ({e}); it is incomplete or corrupt") from None
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint {ckpt}: {META_FILE} is not a JSON object; it is corrupt")
    return meta


def verify_checkpoint(ckpt: Path) -> dict:
    """Return the checkpoint's meta after checking every file against its SHA-256; UserError if not."""
    meta = read_meta(ckpt)
    checksums = meta.get("sha256")
    if not isinstance(checksums, dict) or not {MODEL_FILE, TRAINER_FILE} <= set(checksums):
        raise UserError(f"checkpoint {ckpt} has no checksums in {META_FILE}; it is corrupt or not from nanoPALM")
    for name, expected in checksums.items():
        path = Path(ckpt) / name
        if not path.is_file():
            raise UserError(f"checkpoint {ckpt} is missing {name}; it is incomplete")
        if _sha256(path) != expected:
            raise UserError(f"checkpoint {ckpt}: {name} does not match its checksum; the file is corrupt")
    return meta


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest keep_last checkpoints and the one with the lowest val loss; remove what a killed
    writer left behind (one process writes checkpoints, so a *.tmp or *.old here is stale)."""
    for leftover in (Path(run_dir) / "checkpoints").glob(f"{_PREFIX}*"):
        if leftover.name.endswith((_TMP, _OLD)):
            shutil.rmtree(leftover, ignore_errors=True)
    ckpts = _steps(run_dir)
    keep = set(ckpts[-keep_last:])
    scored = [(v, p) for p in ckpts if (v := _val_loss(p)) is not None]
    if scored:
        keep.add(min(scored, key=lambda vp: vp[0])[1])
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _val_loss(ckpt: Path) -> float | None:
    """The checkpoint's val loss; None where its meta.json is missing or unreadable. Resume skips such a
    checkpoint with a warning, so pruning must not stop every later save on it either."""
    try:
        value = read_meta(ckpt).get("val_loss")
    except UserError:
        return None
    return value if isinstance(value, (int, float)) else None


def find_checkpoint(path: str | Path, prefer_best: bool = False) -> tuple[Path, dict]:
    """The checkpoint to use for `path`: a checkpoint directory, or a run directory (its newest good
    checkpoint, or the best by val loss with prefer_best). Corrupt ones are named and skipped."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path, verify_checkpoint(path)
    candidates = _steps(path)
    if not candidates:
        raise UserError(f"no checkpoint in {path}: train first (python train.py --out_dir={path})")
    order = list(reversed(candidates))  # newest first
    if prefer_best:  # lowest val loss first (the newest of equals), unscored ones last: only what is used is hashed
        losses = {p: _val_loss(p) for p in order}
        order.sort(key=lambda p: (losses[p] is None, losses[p] or 0.0))
    bad: dict[Path, str] = {}
    for ckpt in order:
        try:
            meta = verify_checkpoint(ckpt)
        except UserError as e:
            bad[ckpt] = str(e)
            continue
        for problem in bad.values():  # one line each on stderr, the run itself goes on from another checkpoint
            print(f"warning: skipping {problem}", file=sys.stderr, flush=True)
        return ckpt, meta
    raise UserError(f"no usable checkpoint in {path}: {len(bad)} corrupt or incomplete, the newest: "
                    f"{bad[candidates[-1]]}; restore a good copy, or start again in a new --out_dir")


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(Path(ckpt) / MODEL_FILE)
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read weights in {ckpt}: {e}") from None


def load_trainer_state(ckpt: Path) -> dict:
    """Optimizer and scaler state. weights_only=True: a malicious pickle cannot run code here."""
    try:
        return torch.load(Path(ckpt) / TRAINER_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only raises for anything but tensors and plain data
        raise UserError(f"refusing to load {ckpt / TRAINER_FILE}: it holds objects other than tensors and plain "
                        "data, which could run code; use a checkpoint written by nanoPALM") from None
    except Exception as e:  # RuntimeError, EOFError, ... for a damaged file
        raise UserError(f"cannot read trainer state in {ckpt}: {str(e).splitlines()[0]}") from None


def model_config_from_meta(meta: dict) -> PaLMConfig:
    """The architecture a checkpoint was trained with. Its config is JSON checked key by key, never code."""
    from nanopalm.config import config_from_dict  # config imports model; avoid the import cycle

    if not isinstance(meta.get("config"), dict):
        raise UserError("the checkpoint's meta.json has no config object; it is corrupt or not from nanoPALM")
    try:
        return config_from_dict(meta["config"]).model
    except UserError as e:
        raise UserError(f"the checkpoint's config is invalid ({e}); it is corrupt or from another version") from None


def load_weights_into(model: PaLM, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load weights, turning a shape or key mismatch into one line that names the difference."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"checkpoint {source} does not fit this model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; use the same model settings as the checkpoint")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise UserError(f"checkpoint {source}: {name} has shape {tuple(tensor.shape)} but the model "
                            f"expects {tuple(own[name].shape)}; use the model settings it was trained with")
    model.load_state_dict(state)


def load_model(path: str | Path, device: str | torch.device = "cpu", prefer_best: bool = True) -> tuple[PaLM, dict]:
    """(model in eval mode on `device`, the run's flat config) from a run or checkpoint directory."""
    ckpt, meta = find_checkpoint(path, prefer_best=prefer_best)
    model = PaLM(model_config_from_meta(meta))
    load_weights_into(model, load_model_state(ckpt), ckpt)
    return model.to(device).eval(), meta["config"]
