"""The default run's recipe study (nanopalm/tools/recipes.py): every recipe is PaLM's architecture and differs
from the paper's recipe only where it says so; the report's numbers, by hand."""

import dataclasses
import json
import statistics

import pytest
from conftest import REPO

from nanopalm.config import build_config
from nanopalm.errors import UserError
from nanopalm.tools import recipes
from nanopalm.tools.ablate import SWITCHES


def model_of(name: str):
    return build_config({**recipes.load_preset("shakespeare"), **recipes.PAPER, **recipes.RECIPES[name][1]}).model


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_every_recipe_keeps_palms_architecture_and_changes_only_what_it_names(name):
    model, paper = model_of(name), model_of("paper")
    section2 = {k: v for switch, (choice, _, _) in SWITCHES.items() if switch != "adafactor" for k, v in choice.items()}
    assert {k: getattr(model, k) for k in section2} == section2  # parallel, multi-query, SwiGLU, RoPE, no bias, ...
    values = {**recipes.load_preset("shakespeare"), **recipes.PAPER, **recipes.RECIPES[name][1]}
    mine, theirs = build_config(values).to_dict(), build_config({**values, **recipes.PAPER}).to_dict()
    derived = {"min_lr"} if "learning_rate" in recipes.RECIPES[name][1] else set()  # learning_rate / 10, unused
    assert {k for k in mine if mine[k] != theirs[k]} - derived <= set(recipes.RECIPES[name][1])
    assert paper.d_model == 256 and paper.n_layer == 4 and build_config(recipes.PAPER).optim.lr_schedule == "palm"


def test_the_report_gives_each_recipes_mean_sd_and_difference_from_the_paper():
    run = {"tokens_per_s": 5000.0, "steps": 400, "curve": []}
    done = [("paper", recipes.PAPER, [{**run, "val_bpb_full": 2.0}, {**run, "val_bpb_full": 2.1}]),
            ("wsd", {**recipes.PAPER, **recipes.WSD}, [{**run, "val_bpb_full": 1.9}, {**run, "val_bpb_full": 1.96}]),
            ("wsd-lr2e-2", recipes.PAPER, [{**run, "val_bpb_full": 1.95}] * 2),
            ("wsd-lr4e-2", recipes.PAPER, [{**run, "val_bpb_full": 1.98}] * 2)]
    text = recipes.report(done, "python -m nanopalm.tools.recipes", "Measured here", 3.0)
    # means 2.05 and 1.93; sd of two values a, b is |a - b| / sqrt(2): 0.0707 and 0.0424; 1.93 - 2.05 = -0.12
    assert "| paper | the paper's recipe at the old default's size | 5,899,520 | 5,000 | 400 | 2.0500 +- 0.0707 |  |" \
        in text
    assert "| 1.9300 +- 0.0424 | -0.1200 | 1.9000 1.9600 |" in text
    # 1.95 - 1.93 = 0.02 is within 0.0424 + 0 of the lowest; 1.98 - 1.93 = 0.05 is not
    assert "Lowest: **wsd**, 1.9300 bits per byte; within the seeds' spread of it (closer than the two sds " \
        "together): wsd-lr2e-2. The default" in text


def test_an_unknown_recipe_is_refused_naming_the_known_ones():
    with pytest.raises(UserError, match="no recipe nope; the recipes: paper, paper"):
        recipes.parse_args(["--only", "paper,nope"])
    assert recipes.parse_args(["--only", "wsd, paper"]).names == ["wsd", "paper"]


def test_the_default_run_is_the_lowest_recipe_the_study_kept():
    """docs/DEFAULT_RUN.md's raw results: every recipe with 2 seeds or more, and config/shakespeare.json trains the
    one with the lowest mean (its model, optimizer, schedule and batch)."""
    kept = json.loads((REPO / "docs" / "recipes" / "results.json").read_text())
    assert set(kept) == set(recipes.RECIPES) and all(len(v["runs"]) >= 2 for v in kept.values())
    means = {name: statistics.mean(run["val_bpb_full"] for run in v["runs"]) for name, v in kept.items()}
    lowest, default = build_config(kept[min(means, key=means.get)]["config"]), build_config(
        recipes.load_preset("shakespeare"))
    assert default.optim.lr_schedule == "constant"  # so palm_constant_steps (PAPER pins 100) is unused
    optim = dataclasses.replace(lowest.optim, palm_constant_steps=default.optim.palm_constant_steps)
    assert (lowest.model, optim) == (default.model, default.optim)
    assert lowest.train.batch_size == default.train.batch_size
