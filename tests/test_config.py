"""Config: presets are data, flags override them with the right types, every key is documented."""

import dataclasses
import json
import re

import pytest

from nanopalm.config import (
    CONFIG_DIR,
    DEFAULT_PRESET,
    FIELDS,
    config_from_dict,
    help_text,
    load_preset,
    parse_args,
    run_config,
)
from nanopalm.errors import UserError


def test_flags_override_the_preset_with_typed_values():
    cfg = parse_args(["--max_iters=7", "--learning_rate=1e-3", "--parallel_block=False", "--resume", "--n_layer=2"])
    assert cfg.train.max_iters == 7 and isinstance(cfg.train.max_iters, int)
    assert cfg.optim.learning_rate == 1e-3
    assert cfg.model.parallel_block is False and cfg.train.resume is True
    assert cfg.model.n_layer == 2
    assert cfg.train.dataset == "shakespeare"  # the rest comes from the default preset


def test_every_preset_loads_and_its_keys_are_real():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    assert {"shakespeare", "owt_palm_213m", "owt_palm_paper", "finetune_shakespeare", "palm_350m"} <= set(names)
    for name in names:
        raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
        assert all(k in FIELDS for k in raw if not k.startswith("_")), name
        parse_args([name])


def test_the_seed_preset_is_the_seed_run():
    cfg = parse_args(["owt_palm_213m"])
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_head, m.head_dim, m.d_model, m.d_ff, m.block_size) == (4, 6, 128, 768, 18432, 512)
    assert (t.batch_size, t.gradient_accumulation_steps, t.max_iters) == (16, 4, 100_000)


def test_the_paper_preset_is_the_paper_recipe():
    cfg = parse_args(["owt_palm_paper"])
    o = cfg.optim
    recipe = (o.optimizer, o.learning_rate, o.lr_schedule, o.weight_decay_mode)
    assert recipe == ("adafactor", 1e-2, "palm", "lr_squared")
    assert o.batch_ramp and cfg.model.block_size == 2048 and cfg.model.logit_scale and cfg.model.z_loss == 1e-4
    # Section 5.1: restart ~100 steps before a spike and skip ~200-500 batches. A point every 50 steps and the
    # newest >= 100 back lands 100-149 steps back; skipping 200 past the spike skips 300-349 from the restart.
    t = cfg.train
    back = (t.rollback_distance, t.rollback_distance + t.rollback_interval - 1)
    skipped = (back[0] + t.spike_skip, back[1] + t.spike_skip)
    assert back == (100, 149) and 200 <= skipped[0] and skipped[1] <= 500


def test_config_round_trips_through_json():
    cfg = parse_args(["owt_palm_paper", "--seed=3"])
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_help_lists_every_key_with_the_value_the_run_would_use():
    """`train.py --help` shows what a bare `python train.py` trains with (the default preset's values, not the
    dataclasses'), and `train.py PRESET --help` that preset's; a value with a newline is quoted, not printed raw."""
    for argv, expected in [([], load_preset(DEFAULT_PRESET)), (["owt_palm_paper"], load_preset("owt_palm_paper"))]:
        text = help_text([*argv, "--help"])
        lines = text.splitlines()
        derived = {"d_ff": 4 * expected["d_model"], "min_lr": expected["learning_rate"] / 10}  # PaLM: d_ff = 4d
        for name, (_, f) in FIELDS.items():
            value = expected.get(name, derived.get(name, f.default))
            shown = repr(value) if isinstance(value, str) and not (value.isprintable() and value.split() == [value]) \
                else value
            assert f"  --{name}={shown} " in text, name
            assert f.metadata.get("help"), f"{name} has no help text"
        flag_lines = [line for line in lines if line.startswith("  ")]
        assert all(line.startswith("  --") for line in flag_lines) and len(flag_lines) == len(FIELDS)
    assert "  --optimizer=adafactor " in help_text() and "  --sample_prompt='\\n' " in help_text()
    assert "  --out_dir=out-owt-palm-paper " in help_text(["owt_palm_paper"])


def test_a_shape_preset_trains_on_the_default_runs_data_with_its_vocabulary():
    """`python train.py tiny`: the shape's layers and widths, the default run's data, recipe and vocabulary (the
    shape's 256 is not the data's 8192), into out-tiny; a flag still sets the vocabulary."""
    default, tiny = parse_args([]), parse_args(["tiny"])
    shape = load_preset("tiny")
    assert (tiny.model.n_layer, tiny.model.d_model, tiny.model.d_ff) == (shape["n_layer"], shape["d_model"],
                                                                         shape["d_ff"])
    assert tiny.model.vocab_size == default.model.vocab_size == 8192 != shape["vocab_size"]
    assert tiny.optim == default.optim and tiny.train.dataset == "shakespeare" and tiny.train.out_dir == "out-tiny"
    assert parse_args(["tiny", "--vocab_size=512"]).model.vocab_size == 512
    cfg, notes = run_config(["tiny"])
    assert cfg == tiny and notes == ["model shape tiny on the default run (shakespeare): its data and recipe, "
                                     "vocab_size=8192, into out_dir=out-tiny"]


def test_min_lr_follows_the_learning_rate_unless_given():
    """README's finetune line gives only --learning_rate=3e-5: min_lr (cosine's floor) is derived, not refused."""
    assert parse_args(["--learning_rate=3e-5"]).optim.min_lr == pytest.approx(3e-6)
    assert parse_args(["--learning_rate=3e-5", "--min_lr=1e-6"]).optim.min_lr == 1e-6
    cfg, notes = run_config(["--learning_rate=3e-5", "--lr_schedule=cosine"])
    assert notes == ["min_lr not given: learning_rate / 10 = 3e-06"]
    with pytest.raises(UserError, match=re.escape("min_lr must be in [0, learning_rate=3e-05], got 6e-05")):
        parse_args(["--learning_rate=3e-5", "--min_lr=6e-5"])  # given and impossible: still refused


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no_such_key=1"], "unknown config key 'no_such_key'"),
        (["--max_iters=ten"], "max_iters expects int, got 'ten'"),
        (["--max_iters=2.5"], "max_iters expects int"),
        (["--compile=maybe"], "compile expects auto or True or False, got 'maybe'"),
        (["--dtype=float8"], "dtype='float8' is not one of auto, float32, bfloat16, float16"),
        (["--mlp=relu"], "mlp='relu' is not one of swiglu, gelu"),
        (["--d_model=30", "--n_head=4", "--head_dim=0"], "d_model=30 is not divisible by n_head=4"),
        (["--learning_rate"], "--learning_rate needs a value"),
        (["--resume=perhaps"], "resume expects True or False, got 'perhaps'"),
        (["no_such_preset"], "no preset 'no_such_preset'"),
        (["--batch_size=0"], "batch_size=0 must be a positive integer"),
        (["--resume", "--init_from=out"], "pick one"),
    ],
)
def test_bad_flags_are_one_clear_error(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_args(argv)


def test_a_broken_preset_file_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        parse_args([str(bad)])



@pytest.mark.parametrize("raw, expected", [("True", True), ("False", False), ("true", True), ("FALSE", False),
                                           ("1", True), ("0", False), ("auto", "auto"), ("AUTO", "auto")])
def test_on_off_keys_take_any_spelling_of_true_and_false(raw, expected):
    """The seed's own example, `python train.py config/my_run.json --compile=False`, as nanoGPT users type it."""
    cfg = parse_args([f"--compile={raw}", f"--fsdp={raw if raw.lower() != 'auto' else 'false'}"])
    assert cfg.train.compile is expected or cfg.train.compile == expected
    assert isinstance(cfg.train.fsdp, bool)


def test_the_seeds_command_line_runs_as_written(tmp_path):
    my_run = tmp_path / "my_run.json"
    my_run.write_text(json.dumps({"max_iters": 7, "n_layer": 2}))
    cfg = parse_args([str(my_run), "--compile=False"])
    assert cfg.train.compile is False and cfg.train.max_iters == 7 and cfg.model.n_layer == 2
    assert "on/off keys take True or False (also true/false, 1/0, any case)" in help_text()


def test_the_parsed_config_is_frozen():
    cfg = parse_args([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = None
