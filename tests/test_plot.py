"""Loss plots: one run or several together, from metrics.jsonl."""

import json

import pytest

from nanopalm.errors import UserError
from nanopalm.metrics import read_metrics
from nanopalm.plot import main, plot_runs


def write_run(run_dir, scale: float) -> None:
    run_dir.mkdir()
    rows = [{"step": s, "tokens": 100 * s, "train_loss": scale / (s + 1)} for s in range(1, 6)]
    rows += [{"step": 5, "tokens": 500, "val_loss": scale / 5, "val_bpb": 1.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "tr')


def test_several_runs_plot_into_one_png(tmp_path):
    write_run(tmp_path / "a", 4.0)
    write_run(tmp_path / "b", 5.0)
    assert len(read_metrics(tmp_path / "a")) == 6  # the line cut short by a crash is skipped
    out = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "both.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert not list(tmp_path.glob("*.tmp*"))


def test_the_command_names_a_directory_without_metrics(tmp_path, capsys):
    with pytest.raises(UserError, match="metrics.jsonl not found"):
        main([str(tmp_path), "--output", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
