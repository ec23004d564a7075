"""Run configuration: small typed dataclasses, composed, overridden by `--key=value` flags.

Each component owns its config (PaLMConfig in model.py, OptimConfig in optim.py, TrainConfig here);
the command line sees one flat namespace of their fields, the nanoGPT habit:

    python train.py                                   # the built-in default (preset "shakespeare")
    python train.py owt_palm_213m --max_iters=2000    # a preset from config/, then overrides
    python train.py config/my_run.json --compile=False

Presets are JSON files of flat `key: value` pairs: data, never code (nanoGPT exec()'d Python files).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from nanopalm.errors import UserError
from nanopalm.model import PaLMConfig
from nanopalm.optim import OptimConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
DEFAULT_PRESET = "shakespeare"


@dataclass
class TrainConfig:
    out_dir: str = field(default="out", metadata={"help": "run directory: checkpoints, metrics, plots"})
    dataset: str = field(default="shakespeare", metadata={"help": "name under data/ or a directory of .bin files"})
    init_from: str = field(default="", metadata={"help": "finetune from this run dir or checkpoint ('' = scratch)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in out_dir from its newest checkpoint"})
    max_iters: int = field(default=5000, metadata={"help": "optimizer steps to train for"})
    max_minutes: float = field(default=0.0, metadata={"help": "stop (and save) after this many minutes; 0 = off"})
    eval_interval: int = field(default=250, metadata={"help": "evaluate and checkpoint every this many steps"})
    eval_iters: int = field(default=20, metadata={"help": "val batches per evaluation (the same ones each time)"})
    log_interval: int = field(default=10, metadata={"help": "console/metrics line every this many steps"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch, per rank"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step, summed over all ranks"})
    seed: int = field(default=1337, metadata={"help": "seed for init, data order and dropout"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16 (autocast)"})
    compile: str = field(default="auto", metadata={"help": "torch.compile: auto (on for CUDA) | true | false"})
    fsdp: bool = field(default=False, metadata={"help": "shard with FSDP2 instead of DDP (under torchrun)"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept besides the best one"})
    spike_factor: float = field(
        default=3.0, metadata={"help": "a loss above this x the running median is a spike; 0 = off"})
    spike_window: int = field(default=50, metadata={"help": "steps in the running median for spike detection"})
    spike_skip: int = field(default=20, metadata={"help": "batches skipped past a spike after rollback"})
    sample_tokens: int = field(default=200, metadata={"help": "tokens sampled at the end of training; 0 = off"})
    sample_prompt: str = field(default="\n", metadata={"help": "prompt for the end-of-training sample"})
    tensorboard: bool = field(default=False, metadata={"help": "also log to TensorBoard (out_dir/tb)"})
    wandb_project: str = field(default="", metadata={"help": "also log to this wandb project ('' = off)"})
    profile: bool = field(default=False, metadata={"help": "write a torch.profiler trace of a few steps"})

    def validate(self) -> None:
        for name in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size",
                     "gradient_accumulation_steps", "keep_last", "spike_window"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.max_minutes < 0 or self.spike_factor < 0 or self.spike_skip < 0 or self.sample_tokens < 0:
            raise UserError("max_minutes, spike_factor, spike_skip and sample_tokens must be >= 0")
        if self.spike_factor and self.spike_factor <= 1:
            raise UserError(f"spike_factor={self.spike_factor} must be > 1 (or 0 to turn spike detection off)")
        choices = {"dtype": ("auto", "float32", "bfloat16", "float16"), "compile": ("auto", "true", "false")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.resume and self.init_from:
            raise UserError("--resume continues a run and --init_from starts a new one from weights: pick one")


@dataclass
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


def _field_type(key: str) -> type:
    hint = typing.get_type_hints(SECTIONS[FIELDS[key][0]])[key]
    if isinstance(hint, types.UnionType):  # only `X | None` is used
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def parse_value(key: str, raw: object) -> object:
    """Convert a command-line string (or a JSON value) to the type of config field `key`."""
    if key not in FIELDS:
        raise UserError(f"unknown config key {key!r}; `python train.py --help` lists every key")
    kind = _field_type(key)
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(float(text)) if float(text).is_integer() else int(text)
        if kind is float:
            return float(text)
        return text
    except ValueError:
        raise UserError(f"{key} expects {kind.__name__}, got {raw!r}") from None


def load_preset(name_or_path: str) -> dict:
    """A preset: a name from config/ (without .json) or the path of a JSON file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise UserError(f"no preset {name_or_path!r} (looked for {path}); known presets: {known}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"preset {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"preset {path} must hold a JSON object of key: value pairs")
    return {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys document the file


def build_config(values: dict) -> RunConfig:
    """RunConfig from flat values (unknown keys and wrong types are UserErrors); validated."""
    per_section: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, raw in values.items():
        value = parse_value(key, raw)  # an unknown key is a UserError here
        per_section[FIELDS[key][0]][key] = value
    cfg = RunConfig(**{name: cls(**per_section[name]) for name, cls in SECTIONS.items()})
    cfg.optim.validate()
    cfg.train.validate()
    return cfg


def parse_args(argv: list[str]) -> RunConfig:
    """`[PRESET] [--key=value ...]` -> RunConfig. PRESET defaults to the CPU-sized shakespeare run."""
    preset, overrides = DEFAULT_PRESET, {}
    for arg in argv:
        if arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            if key == "config" and sep:
                preset = raw
                continue
            if not sep:  # a bare --flag means True for a bool, like --resume
                if key in FIELDS and _field_type(key) is bool:
                    raw = "true"
                else:
                    raise UserError(f"--{key} needs a value: write --{key}=VALUE")
            overrides[key.replace("-", "_")] = raw
        else:
            preset = arg
    return build_config({**load_preset(preset), **overrides})


def help_text() -> str:
    lines = ["usage: python train.py [PRESET | path/to/preset.json] [--key=value ...]", "",
             f"presets (config/): {', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.json')))}", ""]
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            flag = f"--{f.name}={f.default}"
            lines.append(f"  {flag:<34} {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


def config_from_dict(values: dict) -> RunConfig:
    """Rebuild a RunConfig saved as JSON (checkpoints, config.json): keys of older versions are ignored."""
    return build_config({k: v for k, v in values.items() if k in FIELDS})
