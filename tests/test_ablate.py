"""The ablation runner end to end on a tiny model and budget: sizes, resuming, skipping, the table."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN

from nanopalm.config import build_config, load_preset
from nanopalm.errors import UserError
from nanopalm.metrics import read_metrics
from nanopalm.tools import ablate
from nanopalm.trainer import train
from nanopalm.variants import GPT2_CHOICES, equal_size_gpt2, param_count


def test_every_variant_is_one_switch_away_and_the_same_size():
    palm_base = build_config(TINY_RUN).model
    target = param_count(palm_base)
    names = [v.name for v in ablate.variants("both")]
    assert names[:2] == ["palm", "gpt2"] and len(names) == 2 + 2 * len(ablate.SWITCHES)
    gpt2 = ablate.variants("gpt2")[1].values
    assert {k: gpt2[k] for k in GPT2_CHOICES if k in gpt2} == {k: v for k, v in GPT2_CHOICES.items() if k in gpt2}
    for v in ablate.variants("both"):
        values = ablate.run_values(v, TINY_RUN, 0, "out", {})
        model = build_config(values).model
        assert abs(param_count(model) / target - 1) <= 0.02, v.name
        assert (model.n_layer, model.n_head, model.head_dim) == (2, 2, 16)
        assert 3.5 * model.d_model <= model.d_ff <= 4.5 * model.d_model
        if v.name.startswith(("palm-", "gpt2+")):  # its base everywhere but the one switch and the width
            base = ablate.run_values(ablate.variants("palm")[v.name.startswith("gpt2")], TINY_RUN, 0, "out", {})
            mine, theirs = build_config(values).to_dict(), build_config(base).to_dict()
            differing = {k for k in mine if mine[k] != theirs[k]} - {"d_model", "d_ff"}
            palm_choice, gpt2_choice, _ = ablate.SWITCHES[v.switch]
            assert differing and differing <= {*palm_choice, *gpt2_choice}, (v.name, differing)


@pytest.mark.parametrize("preset", ["tiny", "shakespeare"])
def test_the_ablations_gpt2_is_the_benchmarks_gpt2(preset):
    """One GPT-2-style baseline: the study's gpt2 run trains the model that bench.py --compare times."""
    base = TINY_RUN if preset == "tiny" else load_preset(preset)
    palm, gpt2 = (build_config(ablate.run_values(v, base, 0, "out", {})).model for v in ablate.variants("palm")[:2])
    assert gpt2 == equal_size_gpt2(palm)


def test_the_ablation_runs_resumes_a_killed_run_skips_finished_ones_and_writes_the_table(small_val_dataset,
                                                                                          tmp_path, capsys):
    preset = tmp_path / "base.json"
    preset.write_text(json.dumps({**TINY_RUN, "dataset": str(small_val_dataset), "full_val_tokens": 10_000,
                                  "eval_interval": 5}))
    doc, runs = tmp_path / "docs" / "ABLATIONS.md", tmp_path / "runs"
    argv = ["--preset", str(preset), "--tokens", str(8 * 32 * 10), "--seeds", "2", "--only", "palm,gpt2,palm-rope",
            "--out", str(runs), "--doc", str(doc)]
    # A run killed at step 5 (its checkpoint there), as if the machine went down mid-study.
    killed = ablate.run_values(ablate.variants("palm")[0], json.loads(preset.read_text()), 1, runs / "palm" / "seed1",
                               {"max_iters": 5})
    train(build_config(killed))
    capsys.readouterr()
    ablate.main(argv)
    out = capsys.readouterr().out
    assert f"resumed from {runs / 'palm' / 'seed1' / 'checkpoints' / 'step_00000005'} at step 5" in out
    rows = read_metrics(runs / "palm" / "seed1")
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 10]  # every logged step once (log_interval 10)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 5, 10]
    table = [line for line in doc.read_text().splitlines() if line.startswith("| palm") or line.startswith("| gpt2")]
    assert [line.split(" | ")[0] for line in table[:3]] == ["| palm", "| gpt2", "| palm-rope"]
    assert "+- " in table[0] and "python -m nanopalm.tools.ablate --preset" in doc.read_text()
    commit = ablate.source_commit()  # this checkout's commit (None outside git: then "not recorded")
    assert f"Code: {commit or 'not recorded'} (6 runs)." in doc.read_text()
    assert (doc.parent / "ablations" / "curves.png").stat().st_size > 1000
    results = json.loads((doc.parent / "ablations" / "results.json").read_text())
    assert sorted(results) == ["gpt2", "palm", "palm-rope"] and all(len(r["runs"]) == 2 for r in results.values())
    finished = {p: p.stat().st_mtime_ns for p in runs.rglob("ablation.json")}
    assert len(finished) == 6
    ablate.main(argv)  # everything is done: nothing retrains
    assert "=== palm, seed 0" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("ablation.json")} == finished


def test_unknown_variants_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="--only: no variant palm-wings; the variants: palm, gpt2, palm-parallel"):
        ablate.main(["--only", "palm,palm-wings", "--out", str(tmp_path)])


def test_the_verdict_compares_the_claim_with_the_effect_beyond_the_noise():
    verdict = ablate.verdict
    assert verdict("better", -0.02, 0.005, better_if_negative=True) == "agrees"  # lower bpb is better
    assert verdict("neutral", 0.02, 0.005, better_if_negative=True) == "differs: measured worse"
    assert verdict("better", -0.004, 0.005, better_if_negative=True) == "differs: within noise"
    assert verdict("better", 0.10, 0.03, better_if_negative=False) == "agrees"  # faster is better
    assert verdict(None, 1.0, 0.0, better_if_negative=True) == "no claim to test"


def test_the_equal_tokens_quality_is_read_at_the_furthest_point_every_run_reached():
    def run(curve, full, speed):
        return {"curve": curve, "val_bpb_full": full, "tokens_per_s": speed}

    a = [run([(0, 0, 4.0), (100, 10, 3.0), (200, 20, 2.5)], 2.4, 100.0),
         run([(0, 0, 4.0), (100, 11, 3.2), (200, 22, 2.7), (300, 30, 2.6)], 2.5, 120.0)]
    b = [run([(0, 0, 4.1), (100, 9, 3.1), (200, 18, 2.9)], 2.8, 90.0)]
    plan = [(None, {}, a), (None, {}, b)]
    assert ablate.common_tokens(plan) == 200  # 300: only one run got there
    s = ablate.summarize(a, target_bpb=2.6, at_tokens=200)
    assert s["bpb_at"] == pytest.approx(2.6) and s["sd_at"] == pytest.approx(0.1414, abs=1e-4)
    assert s["bpb"] == pytest.approx(2.45) and s["speed_sd"] == pytest.approx(14.142 / 110, rel=1e-3)
    assert s["time_to_target"] == pytest.approx(25.0)  # the seeds reach 2.6 at 20 s (2.5) and 30 s (2.6)


def test_the_report_names_the_code_of_every_run(monkeypatch, tmp_path):
    plan = [(None, {}, [{"commit": "abc"}, {"commit": "abc"}]), (None, {}, [{"commit": "def-dirty"}, {}])]
    assert ablate.code_line(plan) == "Code: abc (2 runs), def-dirty (1 run), not recorded (1 run)."
    described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                               text=True, cwd=REPO).stdout.strip()
    monkeypatch.chdir(tmp_path)  # the checkout the package lives in, wherever the study is started from
    assert ablate.source_commit() == (described or None)


def test_a_users_study_writes_its_report_beside_its_runs_not_over_the_repositorys(tmp_path):
    """The repository's docs/ABLATIONS.md is written only when asked for by name (its own command says so)."""
    assert ablate.parse_args([]).doc == Path("runs/ablate/ABLATIONS.md")
    assert ablate.parse_args(["--out", str(tmp_path)]).doc == tmp_path / "ABLATIONS.md"
    assert ablate.parse_args(["--doc", "docs/ABLATIONS.md"]).doc == Path("docs/ABLATIONS.md")
    report = (REPO / "docs" / "ABLATIONS.md").read_text()
    assert "    python -m nanopalm.tools.ablate --doc docs/ABLATIONS.md\n" in report
