"""The training loop: loss falls, accumulation is exact, resume is bitwise, spikes roll back, finetuning."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, TINY_RUN, load_script
from safetensors.torch import load_file

from nanopalm import checkpoint as ckpt
from nanopalm import distributed as D
from nanopalm import fused
from nanopalm.errors import UserError, run_cli
from nanopalm.trainer import Trainer, train


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(ckpt.find_checkpoint(run_dir).path / ckpt.MODEL_FILE)


def test_short_run_learns_and_writes_its_run_directory(tiny_run, tmp_path):
    cfg = tiny_run(max_iters=60, eval_interval=30)
    result = train(cfg)
    out = tmp_path / "run"
    rows = metrics(out)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] - 1.0, vals  # from ~ln(80)=4.4 well down
    assert result["val_bpb"] == pytest.approx(vals[-1] / math.log(2) / 0.99983, rel=1e-3)
    assert {"step", "tokens", "train_loss", "lr", "ms_per_step", "tokens_per_s"} <= set(rows[1])
    assert rows[-1]["tokens"] == 60 * 8 * 32
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "tokenizer.json").is_file()
    keys = final_weights(out).keys()
    assert keys and not any(k.startswith("_orig_mod.") for k in keys)


def test_gradient_accumulation_gives_the_same_gradient(tiny_run):
    """One micro-batch of 8 and two of 4 over the same 8 sequences give one gradient (unclipped: clipping to a norm
    would hide a gradient twice too large)."""
    batch = Trainer(tiny_run("a")).train_loader.get_batch(0, 0)
    grads = []
    for name, micro, size in (("one", 1, 8), ("two", 2, 4)):
        trainer = Trainer(tiny_run(name, batch_size=size, gradient_accumulation_steps=micro, grad_clip=0.0))
        trainer.train_loader.get_batch = lambda step, m, s=size: (batch[0][m * s:(m + 1) * s],
                                                                    batch[1][m * s:(m + 1) * s])
        captured = {}
        trainer.scaler.step = lambda opt, c=captured, t=trainer: c.update(
            {n: p.grad.clone() for n, p in t.raw_model.named_parameters()})
        trainer.train_step()
        grads.append(captured)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)
    assert any(g.abs().max() > 1e-3 for g in grads[0].values())


PAPER_RECIPE = dict(optimizer="adafactor", learning_rate=1e-2, lr_schedule="palm", palm_constant_steps=10,
                    weight_decay_mode="lr_squared", z_loss=1e-4)  # PaLM's recipe (Section 5)


@pytest.mark.parametrize("recipe", [
    dict(),  # AdamW, cosine
    PAPER_RECIPE,  # Adafactor, palm schedule, lr^2 decay, z-loss
    {**PAPER_RECIPE, "dtype": "bfloat16"},  # ... under bf16 autocast, as the default run on a CPU with fast bf16
], ids=["adamw-fp32", "paper-fp32", "paper-bf16"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tiny_run, tmp_path, recipe):
    common = dict(dropout=0.1, max_iters=40, eval_interval=10, **recipe)
    train(tiny_run("straight", **common))
    train(tiny_run("stopped", **{**common, "max_iters": 20}))
    train(tiny_run("stopped", **common, resume=True))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a)
    def losses(run):
        return [(r["step"], r["train_loss"]) for r in metrics(tmp_path / run) if "train_loss" in r]
    assert losses("straight") == losses("stopped")


def cli_run(argv: list[str]) -> int:
    """`python train.py ARGV` in this process: its exit code (run_cli prints a UserError as one line)."""
    return run_cli(load_script("train.py").main, argv)


def test_resume_reads_the_runs_own_config_for_a_non_default_preset(char_dataset, tmp_path, capsys):
    """`train.py --resume --out_dir=RUN`, the form README and the Ctrl-C line give, continues a run started from
    another preset (AdamW where the default is Adafactor, batch 4 from a flag) exactly: the losses and weights of
    the run never stopped, and config.json as it was but for the one allowed change, which the log names."""
    preset = tmp_path / "my_preset.json"
    preset.write_text(json.dumps({**TINY_RUN, "dataset": str(char_dataset), "dropout": 0.1, "eval_interval": 10}))
    assert cli_run([str(preset), "--batch_size=4", "--max_iters=20", f"--out_dir={tmp_path / 'straight'}"]) == 0
    assert cli_run([str(preset), "--batch_size=4", "--max_iters=10", f"--out_dir={tmp_path / 'stopped'}"]) == 0
    capsys.readouterr()
    assert cli_run(["--resume", f"--out_dir={tmp_path / 'stopped'}", "--max_iters=20"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {tmp_path / 'stopped'} as recorded in its config.json, with max_iters 10 -> 20" in out
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a)
    def losses(run):
        return [(r["step"], r["tokens"], r["train_loss"]) for r in metrics(tmp_path / run) if "train_loss" in r]
    assert losses("straight") == losses("stopped") and losses("stopped")[-1][1] == 20 * 4 * 32  # batch 4 kept
    recorded = {run: json.loads((tmp_path / run / "config.json").read_text()) for run in ("straight", "stopped")}
    assert recorded["stopped"] == {**recorded["straight"], "out_dir": str(tmp_path / "stopped"), "resume": True}


def test_resume_refuses_a_flag_that_would_change_the_run_and_leaves_it_as_it_was(char_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    preset = tmp_path / "my_preset.json"
    preset.write_text(json.dumps({**TINY_RUN, "dataset": str(char_dataset), "max_iters": 4, "eval_interval": 4}))
    assert cli_run([str(preset), "--batch_size=4", f"--out_dir={run}"]) == 0
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    capsys.readouterr()
    for argv, message in [
        (["--batch_size=8"], f"--batch_size=8: the run in {run} was trained with batch_size=4; --resume continues a "
                             "run as recorded in its config.json: drop --batch_size, or start a new run from its "
                             f"weights with --init_from={run} --out_dir=NEW_DIR"),
        (["tiny"], "preset tiny sets n_head=4: the run in"),  # a preset's keys count as given
        (["--learning_rate=1e-2", "--max_iters=8"], "--learning_rate=0.01: the run in"),
    ]:
        assert cli_run([*argv, "--resume", f"--out_dir={run}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def spike_at(trainer: Trainer, step: int, factor: float = 100.0) -> None:
    """Multiply the loss of the first attempt at `step` by `factor`: a spike far above the running median."""
    forward = trainer.model.forward
    injected = []

    def spiking_forward(x, y=None):
        out = forward(x, y)
        if y is not None and trainer.state.step == step and not injected:
            injected.append(step)
            out = out._replace(loss=out.loss * factor)
        return out

    trainer.model.forward = spiking_forward


def assert_steps_never_run_backwards(rows: list[dict]) -> None:
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps), steps


def test_a_loss_spike_rolls_back_and_skips_batches(tiny_run, tmp_path):
    trainer = Trainer(tiny_run(max_iters=30, eval_interval=10, spike_factor=3.0, spike_skip=7))
    spike_at(trainer, 15)
    draw, read = trainer.train_loader.get_batch, []
    trainer.train_loader.get_batch = lambda data_step, micro: read.append(data_step) or draw(data_step, micro)
    trainer.train()
    # the data steps actually read: 0..15 (15 spiked), then from step 10 on 22..41, never 10..21 again
    assert read == [*range(16), *range(22, 42)]
    rows = metrics(tmp_path / "run")
    (event,) = [r for r in rows if r.get("event") == "loss_spike"]
    assert event["spike_step"] == 15 and event["step"] == 10  # back to the newest checkpoint
    assert event["data_offset"] == 15 + 7 - 10  # step 10 now reads the batch after the skipped ones
    assert event["skipped_data_steps"] == [10, 22]  # data steps 10..21 are never trained on
    assert trainer.state.step == 30 and trainer.state.data_offset == 12
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] < 10 for r in rows if "train_loss" in r)
    assert_steps_never_run_backwards(rows)
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 31))  # each step once


def test_rollback_points_go_back_about_distance_steps_as_palm_did(tiny_run, tmp_path):
    """PaLM Section 5.1: restart ~100 steps before the spike, skip 200-500 batches. Scaled down: a point every
    5 steps, at least 10 back, 12 batches skipped past the spike; checkpoints after the point are dropped."""
    trainer = Trainer(tiny_run(max_iters=40, eval_interval=10, rollback_interval=5, rollback_distance=10,
                               spike_skip=12))
    spike_at(trainer, 27)
    trainer.train()
    rows = metrics(tmp_path / "run")
    (event,) = [r for r in rows if r.get("event") == "loss_spike"]
    assert (event["spike_step"], event["step"]) == (27, 15)  # the newest point at least 10 steps back
    assert event["skipped_data_steps"] == [15, 27 + 12]  # 24 batches skipped from the restart, the spike's too
    assert trainer.state.step == 40 and trainer.state.data_offset == 24
    assert_steps_never_run_backwards(rows)
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 41))
    # The checkpoint of step 20 (abandoned path) was replaced by the new path's, at 20, 30 and 40.
    for step in (20, 30, 40):
        assert ckpt.verify_checkpoint(ckpt.checkpoint_dir(tmp_path / "run", step)).train_state().data_offset == 24


def test_an_in_memory_rollback_point_restores_exactly_what_a_checkpoint_does(tiny_run, tmp_path):
    """Rolled back to step 20 from memory or from the checkpoint of step 20: bitwise the same run after."""
    common = dict(max_iters=30, eval_interval=10, spike_skip=5, dropout=0.1, optimizer="adafactor",
                  learning_rate=1e-2, lr_schedule="palm", weight_decay_mode="lr_squared")
    runs = {"disk": tiny_run("disk", **common), "memory": tiny_run("memory", **common, rollback_interval=4,
                                                                  rollback_distance=5)}
    for name, cfg in runs.items():
        trainer = Trainer(cfg)
        spike_at(trainer, 26)
        trainer.train()
        (event,) = [r for r in metrics(tmp_path / name) if r.get("event") == "loss_spike"]
        assert event["step"] == 20, name
    a, b = final_weights(tmp_path / "disk"), final_weights(tmp_path / "memory")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_gradient_never_reaches_the_weights(tiny_run, tmp_path):
    trainer = Trainer(tiny_run(max_iters=14, eval_interval=5))
    forward = trainer.model.forward

    def nan_forward(x, y=None):
        out = forward(x, y)
        nan = y is not None and trainer.state.step == 7 and not trainer.state.rollbacks
        return out._replace(loss=out.loss * float("nan")) if nan else out

    trainer.model.forward = nan_forward
    trainer.train()
    assert trainer.state.rollbacks == 1
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "run").values())


def test_finetune_starts_from_trained_weights_with_a_fresh_optimizer(tiny_run, tmp_path, capsys):
    base = train(tiny_run("base", max_iters=40))
    given = tiny_run("ft", init_from=str(tmp_path / "base"), dropout=0.1, learning_rate=1e-4, min_lr=1e-5,
                     max_iters=5, n_layer=7)
    capsys.readouterr()
    trainer = Trainer(given)  # the architecture comes from the checkpoint, and the run says so
    assert "the checkpoint's model settings apply: n_layer=7 (checkpoint: 2)" in capsys.readouterr().out
    assert trainer.state.step == 0 and trainer.cfg.model.n_layer == 2 and trainer.cfg.model.dropout == 0.1
    assert given.model.n_layer == 7  # the parsed config itself is never changed
    assert not trainer.optimizer.state  # fresh optimizer
    assert trainer.evaluate() == pytest.approx(base["val_loss"], rel=1e-6)
    plain = Trainer(tiny_run("plain", init_from=str(tmp_path / "base"), fused=False))  # how, not what: allowed
    assert plain.cfg.model.fused is False and not plain.raw_model.blocks[0].fused
    assert plain.evaluate() == pytest.approx(base["val_loss"], rel=1e-5)  # model.py's plain lines, same loss


def test_the_batch_ramp_multiplies_the_sequences_per_step(tiny_run, tmp_path):
    train(tiny_run(max_iters=4, eval_interval=4, batch_ramp="2:2"))  # x2 micro-batches from step 2 on
    tokens = [r["tokens"] for r in metrics(tmp_path / "run") if "train_loss" in r]
    micro = 8 * 32
    assert tokens == [micro, 2 * micro, 4 * micro, 6 * micro]


def test_the_last_k_checkpoints_and_the_best_are_kept(tmp_path):
    state = {"w": torch.zeros(2)}
    for step, val in enumerate([5.0, 4.0, 1.0, 3.0, 2.0, 6.0]):
        ckpt.write_checkpoint(tmp_path, step, state, {}, {"config": {}, "val_loss": val}, keep_last=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_00000002", "step_00000004", "step_00000005"]
    assert ckpt.find_checkpoint(tmp_path).step == 5
    assert ckpt.find_checkpoint(tmp_path, prefer_best=True).step == 2


def test_mfu_counts_the_whole_step_against_all_ranks_peak(tiny_run, tmp_path):
    from nanopalm.distributed import DistInfo

    trainer = Trainer(tiny_run())
    trainer.peak_flops, trainer.dist = 1e12, DistInfo(rank=0, local_rank=0, world_size=2)
    trainer._log_train(loss=4.0, grad_norm=1.0, lr=1e-3, seconds=0.5, step_tokens=1000)  # 2,000 tokens/s in all
    (row,) = metrics(tmp_path / "run")
    assert row["mfu"] == pytest.approx(trainer.flops_per_token * 2000 / 2e12)


def test_the_seeds_own_command_line_runs_as_written(char_dataset, tmp_path):
    """`python train.py config/my_run.json --compile=False`, nanoGPT's and the seed's way to run a config."""
    my_run = tmp_path / "my_run.json"
    values = {**TINY_RUN, "dataset": str(char_dataset), "out_dir": str(tmp_path / "out"), "max_iters": 4,
              "eval_interval": 4}
    del values["compile"]
    my_run.write_text(json.dumps(values))
    result = subprocess.run([sys.executable, "train.py", str(my_run), "--compile=False"], cwd=REPO, text=True,
                            capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert ckpt.find_checkpoint(tmp_path / "out").step == 4
    assert json.loads((tmp_path / "out" / "config.json").read_text())["compile"] is False


def test_a_step_syncs_the_host_once_and_runs_one_collective(tiny_run, monkeypatch):
    """Under torchrun the loss, the grad norm and the stop flags (max_minutes, signals) share ONE all-reduce,
    and the step waits for the device once. Mocked as 2 ranks in this process (the collective is the mock)."""
    trainer = Trainer(tiny_run(gradient_accumulation_steps=2, optimizer="adafactor", learning_rate=1e-2,
                               lr_schedule="palm", weight_decay_mode="lr_squared"))
    trainer.train_step()  # the optimizer state exists from here on
    counts = {"collectives": 0, "host syncs": 0}

    def all_reduce_sum(values, info):
        counts["collectives"] += 1
        return values * info.world_size  # two ranks with the same values

    def counted(method):
        def wrapper(self, *args, **kwargs):
            counts["host syncs"] += 1
            return method(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(trainer, "dist", D.DistInfo(rank=0, local_rank=0, world_size=2))
    monkeypatch.setattr(D, "all_reduce_sum", all_reduce_sum)
    monkeypatch.setattr(fused, "HOST_READS_ARE_FREE", set())  # as on a GPU: no logit-bound read (fused.py)
    monkeypatch.setattr(D, "no_grad_sync", lambda model, info, last: contextlib.nullcontext())
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    stop = trainer.train_step()
    assert counts == {"collectives": 1, "host syncs": 1}
    assert trainer.state.step == 2 and stop is None


def test_fp16_skips_overflowing_steps_counts_them_as_t5x_does_and_resumes_with_the_scaler(tiny_run, tmp_path):
    """fp16 with a GradScaler through the real trainer: an overflow at step 6 is skipped by the scaler (weights
    unchanged, scale halved), the step still counts, Adafactor's global k follows the trainer's step, and a run
    resumed from step 10 (scaler state included) is bitwise the uninterrupted one."""
    common = dict(PAPER_RECIPE, dtype="float16", spike_factor=0, max_iters=20, eval_interval=10)

    def run(name: str, **overrides) -> Trainer:
        trainer = Trainer(tiny_run(name, **{**common, **overrides}))
        spike_at(trainer, 6, factor=1e5)  # finite loss, but its fp16 gradients overflow
        train_step, seen = trainer.train_step, {}

        def watched_train_step():
            before = ([p.detach().clone() for p in trainer.raw_model.parameters()], trainer.scaler.get_scale())
            train_step()
            if trainer.state.step == 7 and "skipped" not in seen:
                after = [p.detach() for p in trainer.raw_model.parameters()]
                seen["skipped"] = all(torch.equal(a, b) for a, b in zip(before[0], after, strict=True))
                seen["scale"] = (before[1], trainer.scaler.get_scale())

        trainer.train_step = watched_train_step
        trainer.train()
        trainer.seen = seen
        return trainer

    straight = run("straight")
    assert straight.seen["skipped"] and straight.seen["scale"][1] == straight.seen["scale"][0] / 2
    assert straight.precision.grad_scaler and straight.state.step == 20
    assert all(g["step"] == straight.state.step for g in straight.optimizer.param_groups)
    run("stopped", max_iters=10)
    resumed = Trainer(tiny_run("stopped", **common, resume=True))
    assert resumed.scaler.get_scale() == straight.seen["scale"][1]  # the halved scale came back with the run
    resumed.train()
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_gradient_with_a_finite_loss_is_rolled_back(tiny_run, tmp_path):
    """Not only a NaN loss: a NaN in one gradient (the loss finite) must take the spike path too."""
    trainer = Trainer(tiny_run(max_iters=14, eval_interval=5))
    weight = trainer.raw_model.blocks[0].in_proj.weight
    poisoned = []

    def poison(grad):
        if trainer.state.step == 7 and not poisoned:
            poisoned.append(7)
            return grad.index_fill(0, torch.tensor([0]), float("nan"))
        return grad

    weight.register_hook(poison)
    trainer.train()
    rows = metrics(tmp_path / "run")
    (event,) = [r for r in rows if r.get("event") == "loss_spike"]
    assert event["spike_step"] == 7 and math.isfinite(event["loss"]) and not math.isfinite(event["grad_norm"])
    assert trainer.state.rollbacks == 1 and trainer.state.step == 14
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "run").values())


@pytest.mark.slow
def test_a_compiled_run_checkpoints_plain_names_and_samples(tiny_run, tmp_path, capsys):
    """torch.compile through the real trainer (its blocks compiled in place): it trains, its checkpoint has no
    `_orig_mod.` keys and loads into an eager model that computes the same loss, and sampling works."""
    cfg = tiny_run(compile=True, max_iters=6, eval_interval=3, sample_tokens=12, n_layer=1)
    result = train(cfg)
    assert "--- a sample from the model at step 6 ---" in capsys.readouterr().out
    weights = final_weights(tmp_path / "run")
    assert not any("_orig_mod" in k for k in weights)
    eager, found = ckpt.load_model(tmp_path / "run", prefer_best=False)
    trainer = Trainer(tiny_run("eager_eval", n_layer=1, init_from=str(tmp_path / "run")))
    assert trainer.evaluate() == pytest.approx(result["val_loss"], rel=1e-5)
    assert found.step == 6 and eager.config.n_layer == 1


def test_max_minutes_counts_the_training_time_of_earlier_attempts(tiny_run, tmp_path, capsys):
    train(tiny_run(max_iters=10, eval_interval=5))
    saved = ckpt.find_checkpoint(tmp_path / "run").train_state().seconds
    assert 0 < saved < 60  # the training loop's wall time went into the checkpoint
    trainer = Trainer(tiny_run(max_iters=40, eval_interval=5, resume=True, max_minutes=saved / 60 + 1e-9))
    assert trainer.state.seconds == saved
    trainer.train()  # the budget is all but spent: one more step, then stop and save
    assert trainer.state.step == 11 and "max_minutes=" in capsys.readouterr().out


def test_a_run_that_will_not_fit_is_warned_about_before_its_first_step(tiny_run, monkeypatch, capsys):
    """The planner's estimate of a step's peak against the device's free memory: a stated limit of 1 MiB here."""
    monkeypatch.setattr("nanopalm.trainer.free_memory", lambda device: 1 << 20)
    trainer = Trainer(tiny_run())
    out, err = capsys.readouterr()
    (line,) = err.splitlines()  # on stderr, not in the log on stdout
    assert "warning" not in out
    assert line.startswith("warning: a training step needs about 0.0 GiB of cpu memory at its peak (the planner's "
                           "estimate: parameters") and line.endswith("GiB) but 0.0 GiB is free, so it may run out: use "
                           "a smaller --batch_size with a larger --gradient_accumulation_steps (the same global "
                           "batch), a smaller --block_size, --activation_checkpointing=full, or --fsdp=True on "
                           "several GPUs")
    assert trainer.state.step == 0  # a warning, not a refusal
    monkeypatch.setattr("nanopalm.trainer.free_memory", lambda device: 1 << 40)
    Trainer(tiny_run("roomy"))
    assert "warning:" not in "".join(capsys.readouterr())


def test_a_run_says_what_device_and_precision_auto_chose(tiny_run, capsys):
    train(tiny_run(max_iters=1, eval_interval=1, device="cpu", dtype="float32"))
    first = capsys.readouterr().out.splitlines()[0]
    # 80 x 32 tied embedding + 2 blocks of (32 norm + 320 x 32 fused q,k,v,gate,up + 32 x 32 + 128 x 32) + 32
    assert first == "33,376 parameters on cpu (float32), 256 tokens a step, 1 rank(s)"


def test_the_data_are_checked_before_the_model_is_built(tiny_run, monkeypatch):
    """`--block_size=100000000` took 100 s and ~6 GB (RoPE tables, weights) before the one-line error: the cheap
    checks of the data come first now."""
    def build_model(*args, **kwargs):
        raise AssertionError("the model was built before the data were checked")

    monkeypatch.setattr(D, "build_model", build_model)
    with pytest.raises(UserError, match="--block_size 100000000 needs 100000001 tokens but"):
        Trainer(tiny_run(block_size=100_000_000))
    with pytest.raises(UserError, match="set --vocab_size to at least 77"):
        Trainer(tiny_run(vocab_size=50))


def test_ms_per_step_leaves_out_the_evaluations(tiny_run, tmp_path, monkeypatch):
    """An evaluation that takes 1,000 s (on a clock the test moves) is in no step's ms_per_step, though it is in the
    run's seconds: the step timer starts after the evaluation that precedes a step."""
    skipped = [0.0]
    real_clock = time.perf_counter
    monkeypatch.setattr("nanopalm.trainer.time.perf_counter", lambda: real_clock() + skipped[0])
    evaluate = Trainer.evaluate

    def slow_evaluate(self):
        skipped[0] += 1000.0
        return evaluate(self)

    monkeypatch.setattr(Trainer, "evaluate", slow_evaluate)
    train(tiny_run(max_iters=6, eval_interval=2, log_interval=1))
    rows = metrics(tmp_path / "run")
    steps = [r for r in rows if "ms_per_step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and max(r["ms_per_step"] for r in steps) < 1e6
    assert rows[-1]["seconds"] > 3000  # the evaluations at steps 0, 2 and 4 count in the run's time


@pytest.mark.parametrize("own_signal, other_signalled, seconds, other_cooldown, expected", [
    (None, False, 1.0, False, (None, False)),
    (None, False, 61.0, False, ("max_minutes", True)),
    (signal.SIGINT, False, 61.0, False, ("SIGINT", True)),  # a signal outranks the time budget: it wants out
    (None, True, 1.0, False, ("SIGTERM", False)),  # another rank was signalled: this one stops as for SIGTERM
    (None, False, 50.0, False, (None, True)),  # 80% of the minute gone: time to plan the cooldown
    (None, False, 1.0, True, (None, True)),  # the other rank's clock says so: this one plans it too
])
def test_every_rank_stops_for_the_same_reason_after_the_same_step(tiny_run, monkeypatch, own_signal, other_signalled,
                                                                    seconds, other_cooldown, expected):
    """The clock's and the signals' flags ride on the step's one all-reduce; train_step returns why all ranks stop
    (train() decides) and whether all ranks plan the cooldown now."""
    trainer = Trainer(tiny_run(max_minutes=1.0, cooldown=0.2))
    trainer.signals.signum = own_signal
    monkeypatch.setattr(trainer, "dist", D.DistInfo(rank=0, local_rank=0, world_size=2))

    def all_reduce_sum(stats, info):  # this rank's numbers plus the other rank's: the same loss, its flags
        other = stats.clone()
        other[3:] = torch.tensor([0.0, float(other_signalled), float(other_cooldown)])
        return stats + other

    monkeypatch.setattr(D, "all_reduce_sum", all_reduce_sum)
    monkeypatch.setattr(trainer, "seconds_trained", lambda: seconds)
    # (mean loss, grad norm, the learned tokens of both ranks, why they stop, whether they plan the cooldown)
    assert trainer._sync_step_stats(torch.tensor(4.0), torch.tensor(1.0), torch.tensor(256.0)) == (4.0, 1.0, 512,
                                                                                                  *expected)


def test_importing_the_trainer_loads_no_data_preparation():
    """`import nanopalm.trainer` loads what training needs: not the preparation pipeline (prepare.py, `datasets`),
    the benchmarks or the harness."""
    code = "import sys, nanopalm.trainer; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.split())
    assert "nanopalm.trainer" in loaded and "nanopalm.evaluate" in loaded
    assert not loaded & {"nanopalm.prepare", "datasets", "nanopalm.tools.bench", "nanopalm.harness", "lm_eval"}
