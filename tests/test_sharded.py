"""Sharded checkpoints (nanopalm/sharded.py) keep every promise of the single-file ones: a bitwise resume
(from step 0 too, before the optimizer has any state), corruption named and an older checkpoint used, a
failed write that leaves the previous ones intact, loading that never runs code; consolidation into the
single-file layout; and, under torchrun, resuming on another number of ranks (2 -> 4; 2 -> 1 is in
tests/test_distributed.py)."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_checkpoint import RunsAShellCommand
from test_distributed import losses, torchrun

from nanopalm import checkpoint as ckpt
from nanopalm import convert, sharded
from nanopalm.atomic import sha256
from nanopalm.config import build_config
from nanopalm.errors import run_cli
from nanopalm.trainer import Trainer, train


@pytest.fixture(scope="module")
def shards(reference_values, tmp_path_factory) -> Path:
    """conftest's REFERENCE_RUN in one process, writing sharded checkpoints (steps 0, 6 and 12)."""
    out = tmp_path_factory.mktemp("sharded")
    train(build_config({**reference_values, "out_dir": str(out), "checkpoint_format": "sharded"}))
    return out


def state(path: Path) -> tuple[dict, dict]:
    """(weights, optimizer state in torch's numbering) of a single-file checkpoint."""
    return ckpt.read_weights(ckpt.verify_checkpoint(path)), torch.load(path / ckpt.TRAINER_FILE,
                                                                        weights_only=True)["optimizer"]


def assert_bitwise(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_sharded_checkpoint_holds_the_shards_and_a_checksum_of_each_file(shards):
    path = ckpt.checkpoint_dir(shards, 12)
    files = {p.name for p in path.iterdir()}
    assert files == {ckpt.SHARD_INDEX, "__0_0.distcp", ckpt.TRAINER_FILE, ckpt.META_FILE}  # one shard file a rank
    meta = json.loads((path / ckpt.META_FILE).read_text())
    assert meta["format"] == "sharded" and set(meta["sha256"]) == files - {ckpt.META_FILE}
    assert all(sha256(path / name) == digest for name, digest in meta["sha256"].items())


@pytest.mark.parametrize("step", [0, 6])
def test_a_sharded_run_resumes_bitwise(step, reference_values, one_process, shards, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(ckpt.checkpoint_dir(shards, step), ckpt.checkpoint_dir(out, step))
    train(build_config({**reference_values, "out_dir": str(out), "checkpoint_format": "sharded", "resume": True}))
    assert losses(out) == {k: v for k, v in losses(one_process).items() if k > step}
    expected = state(ckpt.checkpoint_dir(one_process, 12))
    assert_bitwise(state(convert.consolidate(out, tmp_path / "consolidated")), expected)


def test_consolidation_gives_the_one_process_file_checkpoint_of_the_same_run(one_process, shards, tmp_path):
    """`python -m nanopalm.convert consolidate RUN`: bitwise what one process writes, and usable as is by
    sample.py (its tokenizer and config come along)."""
    out = tmp_path / "consolidated"
    result = subprocess.run([sys.executable, "-m", "nanopalm.convert", "consolidate", str(shards),
                             f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    written = ckpt.checkpoint_dir(out, 12)
    assert result.stdout.splitlines() == [  # what it reads and writes, said before the wait
        f"reading {shards / 'checkpoints' / 'step_00000012'} (0.00 GiB, every rank's shards) into memory...",
        f"writing {written}...", f"wrote {written}; to sample from it: python sample.py --out_dir={out}"]
    assert_bitwise(state(written), state(ckpt.checkpoint_dir(one_process, 12)))
    model, found = ckpt.load_model(out)
    assert found.path == written and (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert found.train_state() == ckpt.verify_checkpoint(ckpt.checkpoint_dir(shards, 12)).train_state()


def damage_flip_a_shard_byte(path: Path) -> str:
    data = bytearray((path / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "__0_0.distcp").write_bytes(bytes(data))
    return "__0_0.distcp does not match its checksum; the file is corrupt"


def damage_cut_the_index(path: Path) -> str:
    (path / ckpt.SHARD_INDEX).write_bytes((path / ckpt.SHARD_INDEX).read_bytes()[:40])
    return ".metadata does not match its checksum; the file is corrupt"


def damage_lose_a_shard(path: Path) -> str:
    (path / "__0_0.distcp").unlink()
    return "is missing __0_0.distcp; it is incomplete"


@pytest.fixture
def run_copy(shards, tmp_path) -> Path:
    shutil.copytree(shards, tmp_path / "run")
    return tmp_path / "run"


def test_an_export_reads_a_sharded_checkpoint_one_tensor_at_a_time(one_process, shards):
    """What `python -m nanopalm.convert export` streams from an FSDP2 run: each tensor whole, bitwise the
    one-process run's, read alone (never the whole model in memory)."""
    shapes, read = convert.tensor_reader(ckpt.find_checkpoint(shards))
    expected = state(ckpt.checkpoint_dir(one_process, 12))[0]
    assert shapes == {name: t.shape for name, t in expected.items()}
    for name in shapes:
        assert torch.equal(read(name), expected[name]), name


@pytest.mark.parametrize("damage", [damage_flip_a_shard_byte, damage_cut_the_index, damage_lose_a_shard])
def test_a_corrupt_shard_is_named_and_the_previous_checkpoint_used(reference_values, run_copy, damage, capsys):
    message = damage(ckpt.checkpoint_dir(run_copy, 12))
    capsys.readouterr()
    resumed = Trainer(build_config({**reference_values, "out_dir": str(run_copy), "resume": True}))
    assert resumed.state.step == 6
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: skipping checkpoint {ckpt.checkpoint_dir(run_copy, 12)}")
    assert message in err[0]


def test_a_full_disk_during_a_sharded_save_keeps_the_previous_checkpoints(reference_values, run_copy, monkeypatch,
                                                                          capsys):
    """The shard file is written to /dev/full: the kernel's own ENOSPC, raised inside DCP's writer."""
    trainer = Trainer(build_config({**reference_values, "out_dir": str(run_copy), "resume": True,
                                    "checkpoint_format": "sharded"}))
    before = {p: p.read_bytes() for p in ckpt.checkpoint_dir(run_copy, 12).iterdir()}
    fill_the_disk_at(monkeypatch, "__0_0.distcp")
    trainer.state.step = 18
    capsys.readouterr()
    assert run_cli(lambda argv: trainer.save(val_loss=1.0), []) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write checkpoint {ckpt.checkpoint_dir(run_copy, 18)} (No space left on device): "
                   "the previous checkpoints are intact; free space on that disk (or fix its permissions), then "
                   "continue with --resume\n")
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == [
        "step_00000000", "step_00000006", "step_00000012"]
    assert {p: p.read_bytes() for p in ckpt.checkpoint_dir(run_copy, 12).iterdir()} == before


def fill_the_disk_at(monkeypatch, name: str) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux)")
    write = sharded.dcp.save

    def save_into_a_full_disk(state, checkpoint_id, **kwargs):
        os.symlink("/dev/full", Path(checkpoint_id) / name)
        return write(state, checkpoint_id=checkpoint_id, **kwargs)

    monkeypatch.setattr(sharded.dcp, "save", save_into_a_full_disk)


def replace_the_index(path: Path, marker: Path) -> str:
    """`.metadata` is a plain pickle, which DCP itself would load with pickle.load."""
    import pickle

    (path / ckpt.SHARD_INDEX).write_bytes(pickle.dumps(RunsAShellCommand(f"touch {shlex.quote(str(marker))}")))
    return f"error: refusing to load {path / ckpt.SHARD_INDEX}: it holds posix.system, which is not part of a " \
           "checkpoint index and could run code; use a checkpoint written by nanoPALM\n"


def smuggle_an_object_entry(path: Path, marker: Path) -> str:
    """A well-formed index whose entry for an optimizer moment is a pickled object: DCP would torch.load it
    with weights_only=False."""
    weights, optimizer = sharded.read_whole(path)
    optimizer["norm.weight"]["exp_avg"] = RunsAShellCommand(f"touch {shlex.quote(str(marker))}")
    for name in (ckpt.SHARD_INDEX, "__0_0.distcp"):
        (path / name).unlink()
    sharded.write(path, {"model": weights, "optimizer": optimizer})
    return ("error: refusing to load entry 'optimizer.norm.weight.exp_avg' of a sharded checkpoint: nanoPALM "
            "writes only tensors there, and unpickling it could run code\n")


@pytest.mark.parametrize("craft", [replace_the_index, smuggle_an_object_entry])
def test_a_crafted_sharded_checkpoint_cannot_run_code(reference_values, run_copy, craft, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = ckpt.checkpoint_dir(run_copy, 12)
    expected = craft(path, marker)
    meta = json.loads((path / ckpt.META_FILE).read_text())
    meta["sha256"] = {name: sha256(path / name) for name in meta["sha256"]}  # the checksum is no defence
    (path / ckpt.META_FILE).write_text(json.dumps(meta))
    capsys.readouterr()
    assert run_cli(lambda argv: Trainer(build_config({**reference_values, "out_dir": str(run_copy), "resume": True})),
                   []) == 2
    assert capsys.readouterr().err == expected
    assert not marker.exists()


@pytest.mark.slow
def test_a_run_of_two_ranks_resumes_on_four(reference_values, tmp_path):
    """FSDP2, 4 micro-batches a step: 2 a rank on two ranks, 1 a rank on four; DCP reshards the checkpoint."""
    run = {**reference_values, "fsdp": True, "gradient_accumulation_steps": 4}
    two = tmp_path / "two"
    result = torchrun({**run, "out_dir": two})
    assert result.returncode == 0, result.stderr[-3000:]
    four = tmp_path / "four"
    shutil.copytree(ckpt.checkpoint_dir(two, 6), ckpt.checkpoint_dir(four, 6))
    result = torchrun({**run, "out_dir": four, "resume": True}, nproc=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {ckpt.checkpoint_dir(four, 6)} at step 6" in result.stdout
    reference, got = losses(two), losses(four)
    assert got.keys() == {k for k in reference if k > 6}
    assert max(abs(reference[k][0] - got[k][0]) for k in got) < 1e-5  # summed over 4 ranks, not 2
    expected = ckpt.read_weights(ckpt.verify_checkpoint(ckpt.checkpoint_dir(two, 12)))
    for name, tensor in ckpt.read_weights(ckpt.verify_checkpoint(ckpt.checkpoint_dir(four, 12))).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5)
