"""Seeing a run: TensorBoard events, a profiler trace, and clear errors when a logger is missing."""

import sys

import pytest

from nanopalm.errors import UserError
from nanopalm.trainer import train


def test_tensorboard_and_the_profiler_write_their_files(tiny_run, tmp_path):
    pytest.importorskip("tensorboard")  # installed by the test extra: `pip install -e ".[test]"`
    train(tiny_run(max_iters=6, eval_interval=3, tensorboard=True, profile=True))
    run = tmp_path / "run"
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 200
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("val_loss")] == [0, 3, 6]
    traces = list((run / "profile").glob("*.pt.trace.json"))
    assert traces and traces[0].stat().st_size > 1000


@pytest.mark.parametrize("flag, module, message", [
    ({"tensorboard": True}, "torch.utils.tensorboard", "pip install tensorboard"),
    ({"wandb_project": "x"}, "wandb", "pip install wandb"),
])
def test_a_missing_logger_is_one_clear_error(tiny_run, monkeypatch, flag, module, message):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if not installed
    with pytest.raises(UserError, match=message):
        train(tiny_run(max_iters=2, **flag))
