"""scripts/: the helpers that regenerate figures of the docs."""

import json
import math
import statistics

import pytest
from conftest import REPO, load_script

from nanopalm import fused, model
from nanopalm.data import SplitStats, write_meta, write_token_file
from nanopalm.errors import run_cli
from nanopalm.tokenizer import CharTokenizer


def script(name: str):
    return load_script(f"scripts/{name}.py")


def test_baselines_are_uniform_and_add_one_unigram(tmp_path):
    tok = CharTokenizer("ab")  # a, b and the end-of-document token: 3 ids
    write_token_file(tmp_path / "train.bin", [0, 0, 0, 1], 3, tok.name)  # counts+1: a 4, b 2, eot 1
    write_token_file(tmp_path / "val.bin", [0, 1], 3, tok.name)
    tok.save(tmp_path)
    write_meta(tmp_path, tok, "test", SplitStats(1, 4, 4), SplitStats(1, 2, 4))  # 2 bytes per val token
    script("baselines").main([str(tmp_path), str(tmp_path / "out.json")])
    result = json.loads((tmp_path / "out.json").read_text())
    unigram = -(math.log(4 / 7) + math.log(2 / 7)) / 2
    assert result["nats_per_token"] == pytest.approx({"uniform": math.log(3), "unigram": unigram})
    assert result["bits_per_byte"]["unigram"] == pytest.approx(unigram / math.log(2) / 2)


def test_fused_before_after_times_every_variant_in_every_round(capsys):
    """Against this tree's own fused.py: the variants agree on the loss (checked by the script) and each is
    timed once a round."""
    times = script("fused_before_after").main(str(REPO / "nanopalm" / "fused.py"), "tiny", 1, 2, "cpu")
    assert list(times) == ["before", "after: output layer", "after"]
    assert (model.linear_cross_entropy, model.split_projection) == (fused.linear_cross_entropy,
                                                                   fused.split_projection)  # restored
    assert all(len(t) == 2 for t in times.values())
    out = capsys.readouterr().out
    for name, t in times.items():  # what it prints is the statistics of what it timed
        line = next(line for line in out.splitlines() if line.startswith(f"{name}: median "))
        assert f"median {statistics.median(t):.1f} ms" in line
        ratios = sorted(a / b for a, b in zip(times["before"], t, strict=True))
        assert f"range {ratios[0]:.3f}x-{ratios[-1]:.3f}x" in line


def test_adafactor_before_after_times_both_steps_and_adamw(capsys):
    """This tree's optim.py as the "before": the two Adafactor steps are the same code, timed in turns."""
    script("adafactor_before_after").main(str(REPO / "nanopalm" / "optim.py"), "tiny", 1)
    out = capsys.readouterr().out
    medians = [float(line.split("median ")[1].split(" ")[0]) for line in out.splitlines() if ": median " in line]
    assert len(medians) == 4 and min(medians) > 0  # three optimizers' ms, then after / before
    assert "after / before: median" in out


@pytest.mark.parametrize("name", ["fused_before_after", "adafactor_before_after"])
@pytest.mark.parametrize("mistake", ["missing file", "zero threads"])
def test_before_after_scripts_refuse_bad_arguments_in_one_line(name, mistake, capsys, tmp_path):
    old = REPO / "nanopalm" / ("fused.py" if name == "fused_before_after" else "optim.py")
    old, threads = (tmp_path / "old.py", "1") if mistake == "missing file" else (old, "0")
    args = [str(old), "tiny", threads] + (["2"] if name == "fused_before_after" else [])
    assert run_cli(script(name).cli, args) == 2
    err = capsys.readouterr().err
    want = "old.py: no such Python file; give the path of a .py file" if mistake == "missing file" else "threads=0"
    assert err.count("\n") == 1 and want in err
