"""The run's budget and its cooldown (nanopalm/budget.py): hand-computed plans, the clock's decision taken once
and replayed on resume, and the lr each step trains with."""

import shutil

import pytest
import torch
from test_trainer import final_weights, metrics, spike_at

from nanopalm import checkpoint as ckpt
from nanopalm.budget import Budget, Cooldown
from nanopalm.checkpoint import TrainState
from nanopalm.optim import OptimConfig, lr_at
from nanopalm.trainer import Trainer, train


def test_the_factor_falls_linearly_from_one_to_zero_over_the_cooldown():
    cooldown = Cooldown(start=80, end=100)
    assert [cooldown.scale(s) for s in (0, 79, 80, 90, 99, 100)] == [1.0, 1.0, 1.0, 0.5, 0.05, 0.0]
    assert Cooldown(100, 100).scale(99) == 1.0  # no cooldown


def test_by_steps_the_cooldown_is_the_last_fraction_of_max_iters():
    assert Budget(100, 0, 0.2).plan(TrainState()) == Cooldown(80, 100)
    assert Budget(1000, 0, 0.25).plan(TrainState()) == Cooldown(750, 1000)
    assert Budget(10, 0, 0.01).plan(TrainState()) == Cooldown(9, 10)  # at least one step
    assert Budget(100, 5, 0.0).plan(TrainState()) == Cooldown(100, 100)


def test_the_clock_plans_the_rest_of_the_time_at_the_speed_so_far_and_only_to_shorten_the_run():
    budget = Budget(max_iters=10**6, max_minutes=10, cooldown=0.2)
    assert not budget.cooldown_due(479.9, TrainState()) and budget.cooldown_due(480.1, TrainState())  # 80% of 600 s
    state = TrainState(step=400)
    assert budget.decide(state) == Cooldown(400, 500)  # 400 steps in 8 minutes: 100 more in the last 2
    assert (state.cooldown_start, state.cooldown_end) == (400, 500) and budget.end(state) == 500
    assert not budget.cooldown_due(590.0, state)  # decided once
    # max_iters comes first, or its own cooldown has begun: nothing is recorded, the step plan stands
    for state in (TrainState(step=400), TrainState(step=700)):
        assert Budget(max_iters=450, max_minutes=10, cooldown=0.2).decide(state) is None
        assert state.cooldown_end == 0
    assert not Budget(10**6, 0, 0.2).cooldown_due(10**6, TrainState())  # no time budget, no clock
    assert not Budget(10**6, 10, 0.0).cooldown_due(10**6, TrainState())  # no cooldown


CLOCK_RUN = dict(max_iters=100, max_minutes=2.0, cooldown=0.5, eval_interval=10, keep_last=20, lr_schedule="constant",
                 warmup_iters=0, learning_rate=3e-3, dropout=0.1)


def fake_clock(monkeypatch, seconds):
    """Trainer.seconds_trained as a function of the step: the clock the budget reads, made deterministic."""
    monkeypatch.setattr(Trainer, "seconds_trained", lambda self: seconds(self.state.step))


# The default run's recipe (config/shakespeare.json): PaLM's Adafactor, lr^2 decay, z-loss, a constant lr and the
# cooldown; under bf16 autocast, as the default run trains on a CPU with native bf16.
DEFAULT_RECIPE = dict(optimizer="adafactor", weight_decay_mode="lr_squared", z_loss=1e-4, dtype="bfloat16")


@pytest.mark.parametrize("recipe", [{}, DEFAULT_RECIPE], ids=["adamw-fp32", "default-bf16"])
def test_a_run_cut_by_time_ends_annealed_and_its_resume_replays_the_recorded_decision(tiny_run, tmp_path,
                                                                                       monkeypatch, recipe):
    # The clock says 70 s (past half of 2 minutes) from step 20 on: during step 20 the flag is raised, after it
    # (21 steps done) the cooldown is planned over 21 * 0.5 / 0.5 = 21 more steps, to step 42.
    fake_clock(monkeypatch, lambda step: 70.0 if step >= 20 else 0.0)
    run = {**CLOCK_RUN, **recipe}
    train(tiny_run("straight", **run))
    state = ckpt.find_checkpoint(tmp_path / "straight").train_state()
    assert (state.step, state.cooldown_start, state.cooldown_end) == (42, 21, 42)
    rows = metrics(tmp_path / "straight")
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}  # logged after the step: row k trained at step k - 1
    assert [lrs[k + 1] for k in (0, 20, 21, 31, 41)] == pytest.approx([3e-3, 3e-3, 3e-3, 3e-3 * 11 / 21, 3e-3 / 21],
                                                                       rel=1e-12)
    assert [r for r in rows if r.get("event") == "cooldown"] == [{"step": 21, "event": "cooldown", "end_step": 42}]

    # Resumed from step 30, in its cooldown, under a clock that would never decide: the record is replayed.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for late in (tmp_path / "resumed" / "checkpoints").glob("step_*"):
        if int(late.name.removeprefix("step_")) > 30:
            shutil.rmtree(late)
    fake_clock(monkeypatch, lambda step: 0.0)
    train(tiny_run("resumed", **run, resume=True))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    trained = [(r["step"], r["lr"], r["train_loss"]) for r in metrics(tmp_path / "resumed") if "lr" in r]
    assert trained == [(r["step"], r["lr"], r["train_loss"]) for r in rows if "lr" in r]


def test_a_resume_with_a_new_budget_plans_its_cooldown_anew(tiny_run, tmp_path, monkeypatch, capsys):
    fake_clock(monkeypatch, lambda step: 70.0 if step >= 20 else 0.0)
    train(tiny_run(**CLOCK_RUN))
    fake_clock(monkeypatch, lambda step: 0.0)
    trainer = Trainer(tiny_run(**{**CLOCK_RUN, "max_minutes": 5.0}, resume=True))
    assert trainer.state.step == 42 and trainer.state.cooldown_end == 0 and trainer.budget.end(trainer.state) == 100
    assert "the budget changed" in capsys.readouterr().out


def test_by_steps_the_last_fraction_of_max_iters_trains_at_the_falling_lr(tiny_run, tmp_path):
    cfg = tiny_run(**{**CLOCK_RUN, "max_minutes": 0, "max_iters": 20, "cooldown": 0.25, "lr_schedule": "cosine",
                      "warmup_iters": 2, "lr_decay_iters": 30})
    train(cfg)
    lrs = [r["lr"] for r in metrics(tmp_path / "run") if "lr" in r]
    optim = OptimConfig(**{k: getattr(cfg.optim, k) for k in ("learning_rate", "lr_schedule", "warmup_iters",
                                                              "lr_decay_iters", "min_lr")})
    expected = [lr_at(k, optim) * min(1.0, (20 - k) / 5) for k in range(20)]  # the cooldown: steps 15..19
    assert lrs == pytest.approx(expected, rel=1e-12) and lrs[16] < lr_at(16, optim) and lrs[14] == lr_at(14, optim)


def test_a_loss_spike_rollback_to_before_the_plan_keeps_the_plan(tiny_run, tmp_path, monkeypatch):
    """A clock of 3 s a step (the furthest step reached: time is not given back by a rollback) plans the cooldown
    during step 21 (63 s > 60 s), from step 22 to 44; a spike at 25 rolls back to the checkpoint of step 15, saved
    before the plan. The plan stays: not planned anew from step 16 (to 32)."""
    furthest = [0]

    def clock(self):
        furthest[0] = max(furthest[0], self.state.step)
        return 3.0 * furthest[0]

    monkeypatch.setattr(Trainer, "seconds_trained", clock)
    monkeypatch.setattr(Budget, "time_up", lambda self, seconds: False)  # the plan alone ends this run
    trainer = Trainer(tiny_run(**{**CLOCK_RUN, "eval_interval": 15, "spike_factor": 3.0}))
    spike_at(trainer, 25)
    trainer.train()
    (event,) = [r for r in metrics(tmp_path / "run") if r.get("event") == "loss_spike"]
    assert event["step"] == 15
    assert (trainer.state.step, trainer.state.cooldown_start, trainer.state.cooldown_end) == (44, 22, 44)
