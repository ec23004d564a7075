"""Checkpoints: safe to load, atomic to write, checked before use.

A run directory holds `checkpoints/step_XXXXXXXX/`, each with
  model.safetensors   the weights (plain tensors: loading them can never run code)
  trainer.pt          optimizer and grad-scaler state, read with torch.load(weights_only=True)
  meta.json           step, data position, val loss, the run config (as data) and a SHA-256 per file
A checkpoint is written into a temporary directory, fsync'ed and renamed into place, so a crash or a
full disk never leaves a half-written checkpoint under a final name, and the previous ones stay intact.
The newest `keep_last` checkpoints are kept, plus the one with the best val loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanopalm.errors import UserError
from nanopalm.model import PaLM, PaLMConfig

FORMAT_VERSION = 1
MODEL_FILE, TRAINER_FILE, META_FILE = "model.safetensors", "trainer.pt", "meta.json"
_PREFIX = "step_"


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
    """Write checkpoint `step` atomically, then prune old ones. meta must hold `config` and `val_loss`."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, tensor in model_state.items():
            if not torch.isfinite(tensor).all():
                raise RuntimeError(f"refusing to save a checkpoint with non-finite values in {name}")
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / MODEL_FILE)
        torch.save(trainer_state, tmp / TRAINER_FILE)
        files = {name: _sha256(tmp / name) for name in (MODEL_FILE, TRAINER_FILE)}
        meta = {**meta, "step": step, "format_version": FORMAT_VERSION, "sha256": files}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name in (MODEL_FILE, TRAINER_FILE, META_FILE):
            _fsync(tmp / name)
        if final.exists():  # re-saving a step (e.g. after a rollback): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep_last)
    return final


def _steps(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt} has no readable {META_FILE} ({e}); it is incomplete or corrupt") from None


def verify_checkpoint(ckpt: Path) -> dict:
    """Return the checkpoint's meta after checking every file against its SHA-256; UserError if not."""
    meta = read_meta(ckpt)
    for name, expected in meta.get("sha256", {}).items():
        path = Path(ckpt) / name
        if not path.is_file():
            raise UserError(f"checkpoint {ckpt} is missing {name}; it is incomplete")
        if _sha256(path) != expected:
            raise UserError(f"checkpoint {ckpt}: {name} does not match its checksum; the file is corrupt")
    return meta


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest keep_last checkpoints and the one with the lowest val loss."""
    ckpts = _steps(run_dir)
    keep = set(ckpts[-keep_last:])
    scored = [(read_meta(p).get("val_loss"), p) for p in ckpts if (p / META_FILE).is_file()]
    scored = [(v, p) for v, p in scored if v is not None]
    if scored:
        keep.add(min(scored, key=lambda vp: vp[0])[1])
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(path: str | Path, prefer_best: bool = False) -> tuple[Path, dict]:
    """The checkpoint to use for `path`: a checkpoint directory, or a run directory (its newest good
    checkpoint, or the best by val loss with prefer_best). Corrupt ones are named and skipped."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path, verify_checkpoint(path)
    candidates = _steps(path)
    if not candidates:
        raise UserError(f"no checkpoint in {path}: train first (python train.py --out_dir={path})")
    good: list[tuple[Path, dict]] = []
    for ckpt in reversed(candidates):
        try:
            good.append((ckpt, verify_checkpoint(ckpt)))
        except UserError as e:
            print(f"warning: skipping {e}", flush=True)
            continue
        if not prefer_best:
            break
    if not good:
        raise UserError(f"every checkpoint in {path} is corrupt or incomplete; start again without --resume")
    if prefer_best:
        scored = [g for g in good if g[1].get("val_loss") is not None]
        if scored:
            return min(scored, key=lambda g: g[1]["val_loss"])
    return good[0]


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(Path(ckpt) / MODEL_FILE)
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read weights in {ckpt}: {e}") from None


def load_trainer_state(ckpt: Path) -> dict:
    """Optimizer and scaler state. weights_only=True: a malicious pickle cannot run code here."""
    try:
        return torch.load(Path(ckpt) / TRAINER_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for a bad file
        raise UserError(f"cannot read trainer state in {ckpt}: {str(e).splitlines()[0]}") from None


def model_config_from_meta(meta: dict) -> PaLMConfig:
    from nanopalm.config import config_from_dict  # config imports model; avoid the import cycle

    return config_from_dict(meta["config"]).model


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
