"""Run configuration: small typed dataclasses, composed, read from JSON presets and `--key=value` flags.

Each component owns its config (PaLMConfig in model.py, OptimConfig in optim.py, TrainConfig here); the
command line sees one flat namespace of their fields, the nanoGPT habit:

    python train.py                                   # the built-in default (preset "shakespeare")
    python train.py owt_palm_213m --max_iters=2000    # a preset from config/, then overrides
    python train.py config/my_run.json --compile=False

Presets are JSON files of flat `key: value` pairs: data, never code (nanoGPT exec()'d Python files). A
model-shape preset (config/palm_350m.json) holds only model keys. Every value, from a flag, a preset or a
checkpoint's saved config, goes through `parse_value`: the one place where types and `Literal` choices
are checked. Each dataclass checks its own cross-field rules in `__post_init__` (ValueError), which
`build_config` turns into a UserError. A RunConfig is frozen: a resumed or finetuned run derives its
effective config (trainer.effective_config) instead of editing the parsed one.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nanopalm.errors import UserError
from nanopalm.model import PaLMConfig
from nanopalm.optim import OptimConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
DEFAULT_PRESET = "shakespeare"
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")  # any case: True, False, 1, 0, ...


@dataclass
class TrainConfig:
    out_dir: str = field(default="out", metadata={"help": "run directory: checkpoints, metrics, plots"})
    dataset: str = field(default="shakespeare", metadata={"help": "name under data/ or a directory of .bin files"})
    init_from: str = field(default="", metadata={"help": "finetune from this run dir or checkpoint ('' = scratch)"})
    resume: bool = field(
        default=False, metadata={"help": "continue the run in out_dir from its newest checkpoint, as recorded"})
    max_iters: int = field(default=5000, metadata={"help": "optimizer steps to train for"})
    max_minutes: float = field(
        default=0.0, metadata={"help": "stop (and save) after this many minutes of training (resumes too); 0 = off"})
    eval_interval: int = field(default=250, metadata={"help": "evaluate and checkpoint every this many steps"})
    eval_iters: int = field(default=20, metadata={"help": "val batches per evaluation (the same ones each time)"})
    log_interval: int = field(default=10, metadata={"help": "console/metrics line every this many steps"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch, per rank"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step, summed over all ranks"})
    seed: int = field(default=1337, metadata={"help": "seed for init, data order and dropout"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "auto | float32 | bfloat16 | float16 (autocast)"})
    compile: Literal["auto"] | bool = field(
        default="auto", metadata={"help": "torch.compile: auto (on for CUDA) | True | False"})
    tf32: bool = field(default=True, metadata={"help": "CUDA: fp32 matmuls on TF32 tensor cores; False = full fp32"})
    fsdp: bool = field(default=False, metadata={"help": "shard with FSDP2 instead of DDP (under torchrun)"})
    activation_checkpointing: Literal["none", "full", "selective"] = field(
        default="none", metadata={"help": "recompute in the backward: none | full (blocks) | selective (not matmuls)"})
    checkpoint_format: Literal["auto", "single", "sharded"] = field(
        default="auto", metadata={"help": "auto (sharded under FSDP2) | single (safetensors) | sharded (per rank)"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept besides the best one"})
    spike_factor: float = field(
        default=3.0, metadata={"help": "a loss above this x the running median is a spike; 0 = off"})
    spike_window: int = field(default=50, metadata={"help": "steps in the running median for spike detection"})
    spike_skip: int = field(default=20, metadata={"help": "data batches skipped past a spike after rollback"})
    rollback_interval: int = field(
        default=0, metadata={"help": "keep an in-memory rollback point every this many steps; 0 = use checkpoints"})
    rollback_distance: int = field(
        default=100, metadata={"help": "roll back to the newest point at least this many steps before a spike"})
    full_val_tokens: int = field(
        default=1_000_000, metadata={"help": "at the end, score the whole val split (val_bpb_full) if it has at "
                                              "most this many tokens; 0 = off"})
    sample_tokens: int = field(default=200, metadata={"help": "tokens sampled at the end of training; 0 = off"})
    sample_prompt: str = field(default="\n", metadata={"help": "prompt for the end-of-training sample"})
    tensorboard: bool = field(default=False, metadata={"help": "also log to TensorBoard (out_dir/tb)"})
    wandb_project: str = field(default="", metadata={"help": "also log to this wandb project ('' = off)"})
    profile: bool = field(default=False, metadata={"help": "write a torch.profiler trace of a few steps"})

    def __post_init__(self) -> None:
        for name in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size",
                     "gradient_accumulation_steps", "keep_last", "spike_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        for name in ("rollback_interval", "rollback_distance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if min(self.max_minutes, self.spike_factor, self.spike_skip, self.sample_tokens, self.full_val_tokens) < 0:
            raise ValueError("max_minutes, spike_factor, spike_skip, sample_tokens and full_val_tokens must be >= 0")
        if self.spike_factor and self.spike_factor <= 1:
            raise ValueError(f"spike_factor={self.spike_factor} must be > 1 (or 0 to turn spike detection off)")


@dataclass(frozen=True)
class RunConfig:
    model: PaLMConfig
    optim: OptimConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        """Flat {key: value}, the same namespace the command line uses."""
        sections = (self.model, self.optim, self.train)
        return {k: v for section in sections for k, v in dataclasses.asdict(section).items()}


SECTIONS = {"model": PaLMConfig, "optim": OptimConfig, "train": TrainConfig}
FIELDS = {f.name: (section, f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
assert len(FIELDS) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values()), "config keys must be unique"
HINTS = {name: typing.get_type_hints(SECTIONS[section])[name] for name, (section, _) in FIELDS.items()}


def _options(hint: object) -> list[object]:
    """The types and literal values a hint admits: `bool | Literal["auto"]` -> [bool, "auto"]."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return [option for arg in typing.get_args(hint) for option in _options(arg)]
    if typing.get_origin(hint) is Literal:
        return list(typing.get_args(hint))
    return [hint]


def _parse_as(option: object, raw: object) -> object:
    """`raw` as one option (a type or a literal value); ValueError if it is not that."""
    text = str(raw).strip()
    if option is bool:
        if isinstance(raw, bool) or text.lower() in TRUE + FALSE:
            return raw if isinstance(raw, bool) else text.lower() in TRUE
        raise ValueError
    if option is int:
        if isinstance(raw, bool):
            raise ValueError
        return int(float(text)) if float(text).is_integer() else int(text)
    if option is float:
        return float(text)
    if option is str:
        return raw if isinstance(raw, str) else str(raw)  # as given: a prompt may be "\n"
    if option is type(None):
        if raw is None or text.lower() in ("none", "null"):
            return None
        raise ValueError
    if isinstance(option, str) and text.lower() == option.lower():
        return option
    raise ValueError


def parse_value(key: str, raw: object) -> object:
    """A command-line string or JSON value as config field `key` wants it: its type, or one of its
    Literal choices (any case). Anything else is a UserError naming the key and what it takes."""
    if key not in FIELDS:
        raise UserError(f"unknown config key {key!r}; `python train.py --help` lists every key")
    options = _options(HINTS[key])
    for option in options:
        try:
            return _parse_as(option, raw)
        except (ValueError, OverflowError):
            continue
    if all(isinstance(o, str) for o in options):
        raise UserError(f"{key}={raw!r} is not one of {', '.join(options)}")
    names = " or ".join(o if isinstance(o, str) else "True or False" if o is bool else o.__name__ for o in options
                        if o is not type(None))
    raise UserError(f"{key} expects {names}, got {raw!r}")


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`--key=value` (or a bare `--flag` for an on/off key) -> {key: raw value}. The one flag parser."""
    overrides = {}
    for arg in args:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: keys are given as --key=value")
        key, sep, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not sep:
            if key in FIELDS and bool in _options(HINTS[key]):
                raw = "true"  # a bare --resume means --resume=True
            else:
                raise UserError(f"--{key} needs a value: write --{key}=VALUE")
        overrides[key] = raw
    return overrides


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def is_model_shape(preset: str) -> bool:
    """A preset that is a model shape only (palm_350m, ...): every key a model key."""
    return all(FIELDS.get(k, ("",))[0] == "model" for k in load_preset(preset))


def model_presets() -> list[str]:
    return [name for name in presets() if is_model_shape(name)]


def load_preset(name_or_path: str) -> dict:
    """A preset: a name from config/ (without .json) or the path of a JSON file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        where = f"{path} is a directory" if path.is_dir() else f"looked for {path}"
        raise UserError(f"no preset {name_or_path!r} ({where}); known presets: {', '.join(presets())}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"preset {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read preset {path} ({e.strerror}): check its permissions") from None
    if not isinstance(data, dict):
        raise UserError(f"preset {path} must hold a JSON object of key: value pairs")
    return {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys document the file


def build_config(values: dict) -> RunConfig:
    """RunConfig from flat values: unknown keys, wrong types and impossible settings are UserErrors."""
    per_section: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, raw in values.items():
        value = parse_value(key, raw)  # an unknown key is a UserError here
        per_section[FIELDS[key][0]][key] = value
    try:
        return RunConfig(**{name: cls(**per_section[name]) for name, cls in SECTIONS.items()})
    except ValueError as e:  # a section's own rule (n_head must divide d_model, ...)
        raise UserError(str(e)) from None


def model_config(preset: str, overrides: dict | None = None) -> PaLMConfig:
    """The model of a preset (a model-shape preset, a run preset or a JSON file) with model-key overrides."""
    values = {k: v for k, v in load_preset(preset).items() if k in FIELDS and FIELDS[k][0] == "model"}
    for key in overrides or {}:
        if key in FIELDS and FIELDS[key][0] != "model":
            raise UserError(f"--{key} is not a model key; `python train.py --help` lists them under 'model:'")
    return build_config({**values, **(overrides or {})}).model


@dataclass(frozen=True)
class CommandLine:
    """`train.py [PRESET] [--key=value ...]` as given: the preset (named, or the default) and the flags.

    A model-shape preset (tiny, palm_20m, ...) is a shape, not a run: it trains on the default run's data with its
    recipe, into out-<shape>, and with the vocabulary of that data (the shape's vocab_size is the paper's or a test's,
    not the data's), so `python train.py tiny` runs as it is."""

    preset: str
    preset_named: bool
    flags: dict[str, str]

    @property
    def is_shape(self) -> bool:
        return self.preset_named and is_model_shape(self.preset)

    def preset_values(self) -> dict:
        """What the preset sets: a run preset's keys; a shape's model keys but vocab_size, and its out_dir."""
        values = load_preset(self.preset)
        if self.is_shape:
            values = {k: v for k, v in values.items() if k != "vocab_size"}
            values["out_dir"] = f"out-{Path(self.preset).stem}"
        return values

    def values(self) -> dict:
        """Flat raw values of a new run: the default run under a shape, the preset, then the flags."""
        base = load_preset(DEFAULT_PRESET) if self.is_shape else {}
        return {**base, **self.preset_values(), **self.flags}

    def given(self) -> dict[str, tuple[object, str]]:
        """{key: (raw value, where it came from)} for what the user asked for: a named preset's keys and the flags."""
        named = {k: (v, f"preset {self.preset}") for k, v in self.preset_values().items()} if self.preset_named else {}
        return {**named, **{k: (v, f"--{k}") for k, v in self.flags.items()}}

    def notes(self, cfg: RunConfig) -> list[str]:
        """Lines to log about values the run derived rather than was given."""
        notes = []
        if self.is_shape:
            notes.append(f"model shape {self.preset} on the default run ({DEFAULT_PRESET}): its data and recipe, "
                         f"vocab_size={cfg.model.vocab_size}, into out_dir={cfg.train.out_dir}")
        if self.values().get("min_lr") is None and cfg.optim.lr_schedule == "cosine":
            notes.append(f"min_lr not given: learning_rate / 10 = {cfg.optim.min_lr:g}")
        return notes


def read_command_line(argv: list[str]) -> CommandLine:
    positional = [a for a in argv if not a.startswith("--")]
    if len(positional) > 1:
        raise UserError(f"one preset at a time, got {', '.join(positional)}: give the rest as --key=value")
    flags = parse_overrides([a for a in argv if a.startswith("--")])
    preset = flags.pop("config", positional[0] if positional else None)
    if "resume" in flags and "init_from" in flags and parse_value("resume", flags["resume"]):
        raise UserError("--resume continues a run and --init_from starts a new one from weights: pick one")
    return CommandLine(preset or DEFAULT_PRESET, preset is not None, flags)


def parse_args(argv: list[str]) -> RunConfig:
    """`[PRESET] [--key=value ...]` -> the RunConfig of a new run. PRESET defaults to the CPU-sized shakespeare run."""
    return build_config(read_command_line(argv).values())


# What `--resume` may change: when the run stops, how often it evaluates, logs and keeps checkpoints, what it does
# at the end, and where it runs. Nothing that changes what a step computes, so a resumed run stays bitwise the run
# never stopped.
RESUME_MAY_CHANGE = frozenset({
    "max_iters", "max_minutes", "eval_interval", "log_interval", "keep_last", "full_val_tokens", "sample_tokens",
    "sample_prompt", "tensorboard", "wandb_project", "profile", "device", "compile", "fsdp",
    "activation_checkpointing", "checkpoint_format"})
RUN_CONFIG_FILE = "config.json"  # the run's configuration, written into out_dir when it starts


def read_run_config(run_dir: Path) -> dict | None:
    """The flat values a run recorded in RUN/config.json; None where the run has not started yet."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.exists():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the run's configuration {path} ({e}): restore it, or start a new run from "
                        f"its weights with --init_from={run_dir}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} is not a JSON object: restore it, or start a new run with --init_from={run_dir}")
    return {k: v for k, v in values.items() if k in FIELDS}  # keys of older versions are ignored


def resumed_config(run_dir: Path, recorded: dict, given: dict[str, tuple[object, str]]) -> tuple[RunConfig, str]:
    """The run as RUN/config.json recorded it, with the changes RESUME_MAY_CHANGE allows; anything else given that
    differs from the record is a UserError naming the key and both values. Returns the config and a line to log."""
    values, changes = dict(recorded), []
    for key, (raw, source) in given.items():
        if key in ("out_dir", "resume"):
            continue
        value = parse_value(key, raw)
        was = parse_value(key, recorded[key]) if key in recorded else FIELDS[key][1].default
        if value == was:
            continue
        if key not in RESUME_MAY_CHANGE:
            setting = f"--{key}={value!r}" if source.startswith("--") else f"{source} sets {key}={value!r}"
            raise UserError(f"{setting}: the run in {run_dir} was trained with {key}={was!r}; --resume continues a "
                            f"run as recorded in its {RUN_CONFIG_FILE}: drop {source}, or start a new run from its "
                            f"weights with --init_from={run_dir} --out_dir=NEW_DIR")
        values[key] = raw
        changes.append(f"{key} {was!r} -> {value!r}")
    cfg = build_config({**values, "out_dir": str(run_dir), "resume": True})
    return cfg, f"resuming {run_dir} as recorded in its {RUN_CONFIG_FILE}" + \
        (f", with {'; '.join(changes)}" if changes else "")


def run_config(argv: list[str]) -> tuple[RunConfig, list[str]]:
    """What `python train.py ARGV` trains, and the lines to log about how it was decided: a new run from the preset
    and flags, or, with --resume, the run in out_dir as it recorded itself (resumed_config)."""
    line = read_command_line(argv)
    values = line.values()
    resume = parse_value("resume", values.get("resume", False))
    out_dir = Path(str(values.get("out_dir", FIELDS["out_dir"][1].default)))
    recorded = read_run_config(out_dir) if resume else None
    if recorded is not None:
        cfg, note = resumed_config(out_dir, recorded, line.given())
        return cfg, [note]
    cfg = build_config(values)
    return cfg, line.notes(cfg)


def _shown(value: object) -> str:
    """A value as --key=VALUE would take it; quoted where it holds spaces or control characters."""
    if isinstance(value, str) and (not value or not value.isprintable() or " " in value):
        return repr(value)
    return str(value)


def help_text(argv: list[str] = ()) -> str:
    """`train.py --help`: every key with the value `python train.py [PRESET]` would use (the default preset's
    when no preset is named), so the listing is the run you would get."""
    line = read_command_line([a for a in argv if a not in ("-h", "--help")])
    values = build_config(line.values()).to_dict()
    lines = ["usage: python train.py [PRESET | path/to/preset.json] [--key=value ...]", "",
             f"presets (config/): {', '.join(presets())}",
             f"the values below are those of `python train.py {line.preset}`" if line.preset_named else
             f"the values below are those of `python train.py` (the default preset: {DEFAULT_PRESET})",
             "on/off keys take True or False (also true/false, 1/0, any case); a bare --key means True",
             "--resume continues the run in out_dir as its config.json recorded it; of the flags it may change only "
             + ", ".join(sorted(RESUME_MAY_CHANGE)), ""]
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            flag = f"--{f.name}={_shown(values[f.name])}"
            lines.append(f"  {flag:<34} {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


def config_from_dict(values: dict) -> RunConfig:
    """Rebuild a RunConfig saved as JSON (checkpoints, config.json): keys of older versions are ignored."""
    return build_config({k: v for k, v in values.items() if k in FIELDS})
