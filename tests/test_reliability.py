"""Crash safety: a run killed at random moments, or stopped by SIGTERM or Ctrl-C, resumes to the very
weights of a run never interrupted, and every checkpoint under a final name is whole."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_RUN
from safetensors.torch import load_file

from nanopalm import checkpoint as ckpt
from nanopalm.config import build_config
from nanopalm.errors import out_of_memory
from nanopalm.metrics import MetricsLogger
from nanopalm.signals import GracefulStop
from nanopalm.trainer import Trainer, train

RUN = {**TINY_RUN, "max_iters": 30, "eval_interval": 5, "eval_iters": 2, "dropout": 0.1, "log_interval": 1}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the one thread of this process (conftest): the same float sums


@pytest.fixture(scope="module")
def reference(char_dataset, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of the run never interrupted (its checkpoint interval does not change them)."""
    out = tmp_path_factory.mktemp("reference")
    assert torch.get_num_threads() == 1
    train(build_config({**RUN, "dataset": str(char_dataset), "out_dir": str(out), "eval_interval": 30}))
    return final_weights(out)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    found = ckpt.find_checkpoint(run_dir)
    assert found.step == RUN["max_iters"]
    return load_file(found.path / ckpt.MODEL_FILE)


def command(dataset: Path, out: Path, **overrides) -> list[str]:
    """`python train.py` of RUN, always with --resume: with no checkpoint yet, that starts the run."""
    values = {**RUN, "dataset": dataset, "out_dir": out, "resume": True, **overrides}
    return [sys.executable, "train.py", *(f"--{k}={v}" for k, v in values.items())]


def launch(dataset: Path, out: Path, **overrides) -> subprocess.Popen:
    return subprocess.Popen(command(dataset, out, **overrides), cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_to_the_end(dataset: Path, out: Path) -> None:
    result = subprocess.run(command(dataset, out), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def checkpoint_steps(run_dir: Path) -> list[int]:
    names = [p.name for p in (run_dir / "checkpoints").glob("step_*")] if (run_dir / "checkpoints").is_dir() else []
    return sorted(int(n[5:]) for n in names if n[5:].isdigit())


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(char_dataset, tmp_path, reference):
    rng = random.Random(8)
    out = tmp_path / "run"
    killed_after = []
    while len(killed_after) < 3:
        proc = launch(char_dataset, out)
        start = max(checkpoint_steps(out), default=-1)
        while proc.poll() is None and max(checkpoint_steps(out), default=-1) <= start:
            time.sleep(0.01)  # let it get somewhere, then kill it at a random moment
        time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, f"the run finished before kill {len(killed_after) + 1}: make it longer"
        proc.kill()
        proc.communicate()
        killed_after.append(max(checkpoint_steps(out)))
        for step in checkpoint_steps(out):  # whatever the moment, no checkpoint is half-written
            ckpt.verify_checkpoint(ckpt.checkpoint_dir(out, step))
    assert killed_after == sorted(killed_after) and killed_after[-1] < RUN["max_iters"], killed_after
    run_to_the_end(char_dataset, out)
    weights = final_weights(out)
    assert all(torch.equal(weights[k], reference[k]) for k in reference), killed_after


def test_sigterm_and_ctrl_c_save_a_checkpoint_and_exit_cleanly(char_dataset, tmp_path, reference):
    out = tmp_path / "run"
    stopped_at = 0
    for signum, exit_code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        proc = launch(char_dataset, out, eval_interval=1000)  # checkpoints only at the start, on a stop, at the end
        for line in proc.stdout:
            if line.startswith("step") and "| loss" in line and int(line.split()[1]) >= stopped_at + 3:
                break
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == exit_code, stderr
        step = checkpoint_steps(out)[-1]
        assert step >= stopped_at + 3
        name = signal.Signals(signum).name
        assert f"{name} received at step {step}: saving a checkpoint" in stdout
        assert stderr.splitlines()[-1] == f"stopped by {name} at step {step}, checkpoint saved: continue with " \
                                          f"--resume --out_dir={out}"
        assert "Traceback" not in stderr and "--- a sample" not in stdout
        stopped_at = step
    run_to_the_end(char_dataset, out)
    weights = final_weights(out)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_a_second_sigterm_stops_training_at_once_without_saving(char_dataset, tmp_path):
    """The trainer, not GracefulStop alone: SIGTERM twice before step 3's forward ends the process by the signal
    itself, with no checkpoint after step 0's and nothing half-written."""
    out = tmp_path / "run"
    env = {**ENV, "NANOPALM_FAULT": "train_step:sigterm2:3"}
    result = subprocess.run(command(char_dataset, out, eval_interval=1000), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == -signal.SIGTERM, result.stderr
    assert "SIGTERM received: finishing this step" in result.stderr and "saving a checkpoint" not in result.stdout
    assert checkpoint_steps(out) == [0] and not list((out / "checkpoints").glob("*.tmp"))


def test_the_first_ctrl_c_asks_to_stop_and_a_second_stops_at_once(capfd):
    handler = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT and stop.name == "SIGINT"
        assert capfd.readouterr().err == ("SIGINT received: finishing this step, then saving a checkpoint; send it "
                                          "again to stop at once, without saving\n")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is handler


def test_resume_with_no_checkpoint_yet_starts_the_run(tiny_run, tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "step_00000000.tmp").mkdir(parents=True)  # killed in its first save
    trainer = Trainer(tiny_run(resume=True))
    assert trainer.state.step == 0 and trainer.saved_step is None  # so step 0 is evaluated and saved as usual
    assert f"--resume: no checkpoint in {tmp_path / 'run'} yet, starting the run from step 0" in capsys.readouterr().out


def test_a_resumed_run_keeps_each_step_once_in_its_metrics(tmp_path):
    # Killed after step 3 while writing step 4's row; the newest checkpoint is at step 2.
    rows = [{"step": 0, "val_loss": 4.5}, {"step": 1, "train_loss": 4.3}, {"step": 2, "train_loss": 4.2},
            {"step": 2, "val_loss": 4.1}, {"step": 3, "train_loss": 4.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "tra')
    logger = MetricsLogger(tmp_path, True, False, "", {}, resumed_at=2)
    logger.log({"step": 3, "train_loss": 3.9})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == rows[:4] + [{"step": 3, "train_loss": 3.9}]
    MetricsLogger(tmp_path, True, False, "", {}).close()  # a new run in the same directory starts afresh
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_kill_inside_a_checkpoint_write_leaves_the_older_checkpoints_loadable(char_dataset, tmp_path, reference):
    """Deterministic fault injection (nanopalm/faults.py): SIGKILL in the middle of the third checkpoint write,
    after its weights are on disk and before anything is renamed."""
    out = tmp_path / "run"
    killed = subprocess.run(command(char_dataset, out), cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**ENV, "NANOPALM_FAULT": "checkpoint_write:kill:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint_steps(out) == [0, 5]  # step 10 never got its final name
    assert (out / "checkpoints" / "step_00000010.tmp" / ckpt.MODEL_FILE).is_file()  # it was mid-write
    assert ckpt.find_checkpoint(out).step == 5
    for step in (0, 5):
        ckpt.verify_checkpoint(ckpt.checkpoint_dir(out, step))
    run_to_the_end(char_dataset, out)
    assert not list((out / "checkpoints").glob("*.tmp"))  # the leftover was cleaned up by the next save
    weights = final_weights(out)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


OOM_LINE = ("use a smaller --batch_size with a larger --gradient_accumulation_steps (the same global batch), a "
            "smaller --block_size, --activation_checkpointing=full, or --fsdp=True on several GPUs")


def test_running_out_of_memory_mid_run_is_one_line_and_leaves_the_checkpoints(char_dataset, tmp_path):
    """An allocation that fails at step 8 (fault injection: the CPU allocator's own error): exit code 3, one line
    with what ran out and what to change, and the checkpoints of steps 0 and 5 as they were."""
    out = tmp_path / "run"
    result = subprocess.run(command(char_dataset, out), cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**ENV, "NANOPALM_FAULT": "train_step:oom:8"})
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines() == [f"error: out of the CPU's memory, asked for 85.4 GiB: {OOM_LINE}"]
    assert checkpoint_steps(out) == [0, 5] and ckpt.find_checkpoint(out).step == 5
    assert not list((out / "checkpoints").glob("*.tmp"))


@pytest.mark.skipif(sys.platform != "linux", reason="needs prlimit (Linux)")
def test_a_real_allocation_failure_under_a_memory_limit_is_one_line(char_dataset, tmp_path):
    """The user's mistake, really: `--batch_size=100000` under an 8 GB address-space limit."""
    out = tmp_path / "run"
    limited = ["prlimit", "--as=8000000000", *command(char_dataset, out, batch_size=100000, resume=False)]
    result = subprocess.run(limited, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 3, result.stderr
    warning, line = result.stderr.splitlines()  # warnings go to stderr, as errors do; stdout is the log
    assert line.startswith("error: out of the CPU's memory, asked for ") and line.endswith(OOM_LINE)
    assert "Traceback" not in result.stderr and checkpoint_steps(out) == []
    assert warning.startswith("warning: a training step needs") and warning.endswith(OOM_LINE)  # said before step 1
    assert "warning" not in result.stdout


@pytest.mark.parametrize("message, line", [
    ("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
     "1073741824 bytes. Error code 12 (Cannot allocate memory)", "out of the CPU's memory, asked for 1.0 GiB"),
    ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 3.25 GiB is "
     "free.", "out of the GPU's memory, asked for 20.00 GiB"),
    ("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB, max allowed: 18.13 GB). "
     "Tried to allocate 512.00 MB on private pool.", "out of MPS memory, asked for 512.00 MB"),
])
def test_each_allocators_out_of_memory_error_is_recognised(message, line):
    error = torch.OutOfMemoryError(message) if "CUDA" in message else RuntimeError(message)
    assert out_of_memory(error) == f"{line}: {OOM_LINE}"
    assert out_of_memory(RuntimeError("shape mismatch")) is None
