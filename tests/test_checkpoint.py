"""Checkpoints: corruption is caught by checksum and skipped, a failed write keeps the previous ones,
nothing non-finite is saved, and loading one never runs code."""

import ast
import errno
import json
import os
import shlex
from pathlib import Path

import pytest
import torch
from conftest import REPO

from nanopalm import checkpoint as ckpt
from nanopalm.atomic import sha256
from nanopalm.errors import UserError, run_cli
from nanopalm.trainer import Trainer


@pytest.fixture
def run_with_checkpoints(tiny_run, tmp_path):
    """A run directory with checkpoints at steps 0, 10 and 20 (no training: the weights do not matter)."""
    trainer = Trainer(tiny_run(keep_last=5))
    for step in (0, 10, 20):
        trainer.state.step = step
        trainer.save(val_loss=5.0 - step / 10)
    return trainer, tmp_path / "run"


def newest(run_dir: Path) -> Path:
    return ckpt.checkpoint_dir(run_dir, 20)


def damage_truncate(path: Path) -> str:
    (path / ckpt.MODEL_FILE).write_bytes((path / ckpt.MODEL_FILE).read_bytes()[:100])
    return "model.safetensors does not match its checksum; the file is corrupt"


def damage_flip_a_byte(path: Path) -> str:
    data = bytearray((path / ckpt.TRAINER_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern changed: only the checksum can tell
    (path / ckpt.TRAINER_FILE).write_bytes(bytes(data))
    return "trainer.pt does not match its checksum; the file is corrupt"


def damage_cut_meta(path: Path) -> str:
    (path / ckpt.META_FILE).write_text((path / ckpt.META_FILE).read_text()[:50])
    return "has no readable meta.json"


def damage_drop_checksums(path: Path) -> str:
    meta = json.loads((path / ckpt.META_FILE).read_text())
    del meta["sha256"]
    (path / ckpt.META_FILE).write_text(json.dumps(meta))
    return "has no checksums in meta.json"


def damage_delete_weights(path: Path) -> str:
    (path / ckpt.MODEL_FILE).unlink()
    return "is missing model.safetensors; it is incomplete"


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_a_byte, damage_cut_meta, damage_drop_checksums,
                                    damage_delete_weights])
def test_a_corrupt_checkpoint_is_named_in_one_line_and_resume_falls_back(run_with_checkpoints, tiny_run, capsys,
                                                                          damage):
    _, run_dir = run_with_checkpoints
    message = damage(newest(run_dir))
    capsys.readouterr()
    resumed = Trainer(tiny_run(keep_last=5, resume=True))
    assert resumed.state.step == 10
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: skipping checkpoint {newest(run_dir)}") and message in err[0]


def test_when_every_checkpoint_is_corrupt_resume_stops_with_one_line(run_with_checkpoints, tiny_run, capsys):
    _, run_dir = run_with_checkpoints
    for step in (0, 10, 20):
        damage_truncate(ckpt.checkpoint_dir(run_dir, step))
    capsys.readouterr()
    assert run_cli(lambda argv: Trainer(tiny_run(resume=True)), []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: no usable checkpoint in {run_dir}: 3 corrupt")


def fill_the_disk_at_trainer_pt(monkeypatch):
    """The kernel's own ENOSPC: trainer.pt is written to /dev/full, a device that is always full."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux)")
    save_file = ckpt.save_file

    def save_then_fill(tensors, path):
        save_file(tensors, path)
        os.symlink("/dev/full", Path(path).with_name(ckpt.TRAINER_FILE))

    monkeypatch.setattr(ckpt, "save_file", save_then_fill)


def fail_the_weights_write(monkeypatch):
    def no_space(tensors, path):
        Path(path).write_bytes(b"\0" * 64)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt, "save_file", no_space)


@pytest.mark.parametrize("failure", [fill_the_disk_at_trainer_pt, fail_the_weights_write])
def test_a_full_disk_leaves_the_previous_checkpoint_intact(run_with_checkpoints, monkeypatch, capsys, failure):
    trainer, run_dir = run_with_checkpoints
    before = {p: p.read_bytes() for p in newest(run_dir).iterdir()}
    failure(monkeypatch)
    trainer.state.step = 30
    capsys.readouterr()
    assert run_cli(lambda argv: trainer.save(val_loss=1.0), []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: cannot write checkpoint {ckpt.checkpoint_dir(run_dir, 30)} (No space left on "
                          "device): the previous checkpoints are intact; free space")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_00000000", "step_00000010", "step_00000020"]  # no step 30, no *.tmp left behind
    assert {p: p.read_bytes() for p in newest(run_dir).iterdir()} == before
    assert ckpt.find_checkpoint(run_dir).path == newest(run_dir)


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_non_finite_values_never_reach_a_checkpoint(run_with_checkpoints, where):
    trainer, run_dir = run_with_checkpoints
    if where == "model":
        with torch.no_grad():
            next(trainer.raw_model.parameters()).view(-1)[3] = float("nan")
        match = r"refusing to save checkpoint step 30: model\.\S+ holds NaN or inf"
    else:
        trainer.train_step()  # the optimizer now has moment tensors
        state = next(iter(trainer.optimizer.state.values()))
        next(v for v in state.values() if v.dim() > 0).view(-1)[0] = float("inf")
        match = r"refusing to save checkpoint step 30: trainer\.optimizer\.state\.\S+ holds NaN or inf"
    trainer.state.step = 30
    with pytest.raises(UserError, match=match):
        trainer.save(val_loss=1.0)
    assert not ckpt.checkpoint_dir(run_dir, 30).exists()
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_resaving_a_step_replaces_it_whole_and_leftovers_are_pruned(run_with_checkpoints):
    trainer, run_dir = run_with_checkpoints
    root = run_dir / "checkpoints"
    (root / "step_00000040.tmp").mkdir()  # what kills during a save leave behind
    (root / "step_00000020.old").mkdir()
    trainer.save(val_loss=0.5)  # step 20 again, as after a rollback
    assert sorted(p.name for p in root.iterdir()) == ["step_00000000", "step_00000010", "step_00000020"]
    assert ckpt.verify_checkpoint(newest(run_dir)).meta["val_loss"] == 0.5



def test_a_run_resumed_past_a_corrupt_meta_json_goes_on_saving(run_with_checkpoints, tiny_run):
    """Resume skips the checkpoint whose meta.json is cut; pruning after the next save must skip it too."""
    _, run_dir = run_with_checkpoints
    damage_cut_meta(newest(run_dir))
    resumed = Trainer(tiny_run(keep_last=5, resume=True))
    resumed.state.step = 11
    resumed.save(val_loss=4.0)
    assert ckpt.verify_checkpoint(ckpt.checkpoint_dir(run_dir, 11)).meta["val_loss"] == 4.0


def test_the_best_checkpoint_is_the_best_good_one(run_with_checkpoints, capsys):
    """prefer_best hashes in val-loss order: a corrupt best is named and the next best is used."""
    trainer, run_dir = run_with_checkpoints
    trainer.state.step = 30
    trainer.save(val_loss=4.5)  # newest, but not the best (step 20: 3.0)
    capsys.readouterr()
    assert ckpt.find_checkpoint(run_dir, prefer_best=True).path == newest(run_dir)
    damage_truncate(newest(run_dir))
    assert ckpt.find_checkpoint(run_dir, prefer_best=True).path == ckpt.checkpoint_dir(run_dir, 10)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: skipping checkpoint {newest(run_dir)}")

class RunsAShellCommand:
    """Unpickling this runs `command`: what a malicious checkpoint downloaded from anywhere could hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_carrying_a_malicious_pickle_cannot_run_code(run_with_checkpoints, tiny_run, tmp_path, capsys):
    _, run_dir = run_with_checkpoints
    marker = tmp_path / "pwned"
    path = newest(run_dir)
    torch.save({"optimizer": RunsAShellCommand(f"touch {shlex.quote(str(marker))}"), "scaler": {}},
               path / ckpt.TRAINER_FILE)
    meta = json.loads((path / ckpt.META_FILE).read_text())
    meta["sha256"][ckpt.TRAINER_FILE] = sha256(path / ckpt.TRAINER_FILE)  # the checksum is no defence
    (path / ckpt.META_FILE).write_text(json.dumps(meta))

    capsys.readouterr()
    assert run_cli(lambda argv: Trainer(tiny_run(resume=True)), []) == 2
    err = capsys.readouterr().err
    assert err == (f"error: refusing to load {path / ckpt.TRAINER_FILE}: it holds objects other than tensors and "
                   "plain data, which could run code; use a checkpoint written by nanoPALM\n")
    assert not marker.exists()
    # The payload is live: the unsafe default of older PyTorch would have run it.
    torch.load(path / ckpt.TRAINER_FILE, weights_only=False)
    assert marker.exists()


def test_every_torch_load_in_the_code_is_weights_only():
    """Whatever name torch.load goes by (`import torch as t`, `from torch import load as read`) and pickle's
    loaders (which run code by design) not at all, in every Python file of the code."""
    sources = [p for pattern in ("*.py", "nanopalm/**/*.py", "data/*/*.py", "scripts/*.py") for p in REPO.glob(pattern)]
    calls, pickle_loads = [], []
    for source in sources:
        tree = ast.parse(source.read_text(), str(source))
        torch_names, load_names = {"torch"}, set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                torch_names |= {a.asname or a.name for a in node.names if a.name == "torch"}
            elif isinstance(node, ast.ImportFrom) and node.module == "torch":
                load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            is_load = (isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name)
                       and func.value.id in torch_names) or (isinstance(func, ast.Name) and func.id in load_names)
            if is_load:
                calls.append((source.name, {k.arg: ast.unparse(k.value) for k in node.keywords}))
            if ast.unparse(func) in ("pickle.load", "pickle.loads", "torch.serialization.load"):
                pickle_loads.append((source.name, node.lineno))
    assert calls, "expected checkpoint.py to call torch.load"
    assert all(kw.get("weights_only") == "True" for _, kw in calls), calls
    assert not pickle_loads, pickle_loads


def test_a_config_read_from_a_checkpoint_is_data(run_with_checkpoints):
    _, run_dir = run_with_checkpoints
    path = newest(run_dir)
    meta = json.loads((path / ckpt.META_FILE).read_text())
    meta["config"]["n_layer"] = "__import__('os').system('echo pwned')"
    meta["config"]["__class__"] = "os.system"  # unknown keys are ignored, never looked up
    (path / ckpt.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"^the checkpoint's config is invalid \(n_layer expects int, got "):
        ckpt.load_model(path)


def test_every_file_of_a_run_has_the_mode_its_umask_gives(run_with_checkpoints):
    """safetensors writes its file 0600; in a run directory, where config.json and metrics are 0644 under the usual
    umask 022, the weights must be readable by the same people (a shared cluster disk, a web server of runs)."""
    _, run_dir = run_with_checkpoints
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.relative_to(run_dir).as_posix(): oct(p.stat().st_mode & 0o777) for p in run_dir.rglob("*")
             if p.is_file()}
    assert "checkpoints/step_00000020/model.safetensors" in modes and "config.json" in modes
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_probing_an_output_directory_tolerates_another_rank_probing_it_at_once(tmp_path, monkeypatch):
    """Every rank of a job checks --out_dir at start (atomic.check_dir makes it, then removes what it made). When
    another rank's probe removed it first, or already uses it, this rank's probe neither fails nor removes it."""
    from nanopalm import atomic

    target = tmp_path / "a" / "run"
    make = atomic.ensure_dir

    def others_probe_removed_it(path, flag):
        made = make(path, flag)
        target.rmdir()  # the other rank's probe, between this one's mkdir and its cleanup
        return made

    monkeypatch.setattr(atomic, "ensure_dir", others_probe_removed_it)
    assert atomic.check_dir(target, "--out_dir") == target and not (tmp_path / "a").exists()

    def another_rank_uses_it(path, flag):
        made = make(path, flag)
        (target / "config.json").write_text("{}")  # the other rank already writes into it
        return made

    monkeypatch.setattr(atomic, "ensure_dir", another_rank_uses_it)
    atomic.check_dir(target, "--out_dir")
    assert (target / "config.json").is_file()
