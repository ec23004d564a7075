"""A run in other layouts: one file, transformers, and back. Each command writes its output whole or not at all.

    python -m nanopalm.convert consolidate RUN [--out=DIR]    # a sharded (FSDP2) checkpoint as one file
    python -m nanopalm.convert export RUN HF_DIR [--dtype=bfloat16] [--force]   # a transformers model
    python -m nanopalm.convert import HF_DIR RUN [--force]     # a transformers 'cohere' model as a run
    python -m nanopalm.convert merge LORA_RUN RUN [--force]    # a LoRA run's adapters merged: a plain run
    python -m nanopalm.convert export_adapter LORA_RUN DIR      # its adapters for peft, on the base's export

export and import need the `[hf]` extra (pip install -e ".[hf]"); docs/HF.md shows what to do with the result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nanopalm import atomic
from nanopalm import distributed as D
from nanopalm.checkpoint import (
    MODEL_FILE,
    Checkpoint,
    TrainState,
    check_weights_fit,
    checkpoint_dir,
    find_checkpoint,
    load_model,
    read_trainer_state,
    write_checkpoint,
)
from nanopalm.config import RUN_CONFIG_FILE, RunConfig, build_config
from nanopalm.errors import ArgumentParser, UserError, run_cli, warn
from nanopalm.instruct import TEMPLATE_FILE
from nanopalm.lora import parse_targets
from nanopalm.metrics import read_metrics
from nanopalm.model import PaLM
from nanopalm.tokenizer import HfTokenizer, load_tokenizer, tokenizer_fingerprint

GIB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MANIFEST = "nanopalm_export.json"  # an export's source, command and files' SHA-256, written last


# ---- consolidate --------------------------------------------------------------------------------------------
def consolidate(source: str | Path, out: str | Path | None = None) -> Path:
    """Write the newest good checkpoint of run `source` (or the checkpoint directory `source`), sharded, as
    a single-file checkpoint (model.safetensors, trainer.pt with the whole optimizer state) in run directory
    `out` (default: SOURCE-consolidated), with the run's tokenizer and config: what sample.py, eval.py and
    --init_from read on any machine, and one process resumes. Holds the whole state in CPU memory."""
    found = find_checkpoint(source)
    if not found.sharded:
        raise UserError(f"{found.path} is already a single-file checkpoint: sample.py, eval.py and --init_from "
                        "read it as it is")
    out_dir = Path(out) if out else found.run_dir.with_name(found.run_dir.name + "-consolidated")
    if (out_dir / "checkpoints").exists():
        raise UserError(f"{out_dir} already holds checkpoints: give another --out (or remove it)")
    from nanopalm import sharded

    tokenizer = load_tokenizer(found.run_dir)  # sample.py reads it from the run directory: first, or nothing
    size = sum(f.stat().st_size for f in found.path.iterdir() if f.is_file())
    print(f"reading {found.path} ({size / 2**30:.2f} GiB, every rank's shards) into memory...", flush=True)
    weights, optimizer_state = sharded.read_whole(found.path)
    trainer_state = read_trainer_state(found.path)
    groups = trainer_state["param_groups"]
    numbers = {name: i for i, name in enumerate(name for group in groups for name in group["params"])}
    optimizer = D.renumber_optimizer_state({"state": optimizer_state, "param_groups": groups}, numbers)
    meta = {k: v for k, v in found.meta.items() if k not in ("sha256", "format", "format_version", "step")}
    print(f"writing {checkpoint_dir(out_dir, found.step)}...", flush=True)
    write_checkpoint(out_dir, found.step, weights, {"optimizer": optimizer, "scaler": trainer_state["scaler"]},
                     meta, keep_last=1)
    tokenizer.save(out_dir)
    if (found.run_dir / RUN_CONFIG_FILE).is_file():
        shutil.copyfile(found.run_dir / RUN_CONFIG_FILE, out_dir / RUN_CONFIG_FILE)
    return checkpoint_dir(out_dir, found.step)


# ---- export -------------------------------------------------------------------------------------------------
def tensor_reader(found: Checkpoint) -> tuple[dict[str, torch.Size], Callable[[str], torch.Tensor]]:
    """(name -> shape, read(name) -> the tensor) of a checkpoint of either format, one tensor at a time."""
    if found.sharded:
        from nanopalm import sharded

        return sharded.tensor_shapes(found.path), lambda name: sharded.read_tensor(found.path, name)
    try:
        handle = safe_open(found.path / MODEL_FILE, "pt")
        return {k: torch.Size(handle.get_slice(k).get_shape()) for k in handle.keys()}, handle.get_tensor
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read weights in {found.path}: {e}") from None


def _shard_plan(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """The tensors' names in files of at most max_bytes each (a larger tensor alone in its file), in order."""
    files, used = [[]], 0
    for name, size in sizes.items():
        if files[-1] and used + size > max_bytes:
            files.append([])
            used = 0
        files[-1].append(name)
        used += size
    return files


def _model_card(found: Checkpoint, params: int, dtype: str, command: str) -> str:
    c, cfg = found.config().model, found.config()
    scores = [row for row in read_metrics(found.run_dir) if "val_bpb_full" in row]
    bpb = (f"{scores[-1]['val_bpb_full']:.4f} (the final model, step {scores[-1]['step']}; this export is step "
           f"{found.step})" if scores else "not measured (the run ended before its whole-val score)")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [nanopalm, palm]
---
# {found.run_dir.name}

A PaLM-architecture language model (Chowdhery et al. 2022) trained with nanoPALM, written in transformers'
`CohereForCausalLM` layout, which is PaLM's block: one LayerNorm feeding attention and a SwiGLU MLP in
parallel, rotary embeddings, {"multi-query" if c.n_kv_head == 1 else "grouped-query"} attention, no biases.

| | |
|---|---|
| parameters | {params:,} |
| shape | {c.n_layer} layers, d_model {c.d_model}, {c.n_head} query heads of {c.head_dim}, {c.n_kv_head} key/value \
head(s), d_ff {c.d_ff}, vocabulary {c.vocab_size:,}, context {c.block_size} tokens |
| data | `{cfg.train.dataset}` |
| trained | {found.train_state().step:,} steps, {found.train_state().tokens:,} tokens |
| whole-val bits per byte | {bpb} |
| weights | {dtype} |
| made by | `{command}` |

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model, tokenizer = AutoModelForCausalLM.from_pretrained(PATH), AutoTokenizer.from_pretrained(PATH)
print(tokenizer.decode(model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=50)[0]))
```
"""


def export(run: str | Path, out: str | Path, dtype: str = "float32", max_shard_gib: float = 5.0,
           force: bool = False, command: str = "") -> Path:
    """Write run `run`'s best checkpoint as a transformers model directory `out`: config.json,
    generation_config.json, safetensors weights (above max_shard_gib, in files of at most that size with
    transformers' index), the tokenizer (tokenizer.json and its config), a README model card. Reads and
    writes one tensor at a time: never two copies of the model in memory."""
    from transformers import CohereConfig, GenerationConfig

    from nanopalm.hf import check_exportable, cohere_config, hf_tokenizer, save_hf_tokenizer, to_cohere

    out = Path(out)
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype}: choose one of {', '.join(DTYPES)}")
    if max_shard_gib <= 0:
        raise UserError(f"--max_shard_gib={max_shard_gib} must be > 0")
    if out.exists() and not force:
        raise UserError(f"{out} exists: give a new directory, or --force to replace it")
    found = find_checkpoint(run, prefer_best=True)
    c = found.config().model
    if c.lora_rank:
        raise UserError(f"{found.run_dir} is a LoRA run: merge its adapters first (python -m nanopalm.convert merge "
                        f"{found.run_dir} MERGED_RUN), then export MERGED_RUN")
    check_exportable(c)
    if not c.tie_embeddings:
        warn(f"{found.run_dir} does not tie its embeddings: transformers reads its lm_head, but vLLM's and "
             "llama.cpp's Command-R take the output matrix from the input embedding (docs/HF.md)")
    tokenizer = load_tokenizer(found.run_dir)
    backend = hf_tokenizer(tokenizer)
    shapes, read = tensor_reader(found)
    with torch.device("meta"):
        check_weights_fit(PaLM(c), {k: torch.empty(v) for k, v in shapes.items()}, found.path)
        converted = {n: t.shape for name, shape in shapes.items() for n, t in to_cohere(name, torch.empty(shape), c)}
    itemsize = DTYPES[dtype].itemsize
    plan = _shard_plan({n: s.numel() * itemsize for n, s in converted.items()}, int(max_shard_gib * GIB))
    files = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i:05d}-of-{len(plan):05d}.safetensors" for i in range(1, len(plan) + 1)])
    home = {n: file for file, names in zip(files, plan, strict=True) for n in names}
    params = sum(s.numel() for s in shapes.values())

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in shapes:
            yield from to_cohere(name, read(name), c)

    def write(tmp: Path) -> None:
        stream, pending = tensors(), {}
        for file, names in zip(files, plan, strict=True):
            while not set(names) <= pending.keys():
                n, t = next(stream)
                pending[n] = t.to(DTYPES[dtype]).contiguous()
            save_file({n: pending.pop(n) for n in names}, tmp / file, metadata={"format": "pt"})
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(s.numel() for s in converted.values()) * itemsize},
                     "weight_map": dict(sorted(home.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        CohereConfig(**cohere_config(c, tokenizer.eot_id, dtype)).save_pretrained(tmp)
        GenerationConfig(bos_token_id=None, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.eot_id
                         ).save_pretrained(tmp)
        save_hf_tokenizer(backend, tokenizer.eot_id, tmp, c.block_size)
        (tmp / "README.md").write_text(_model_card(found, params, dtype, command))

    def manifest(checksums: dict[str, str]) -> bytes:
        record = {"source": str(found.path), "step": found.step, "command": command, "sha256": checksums}
        return (json.dumps(record, indent=2) + "\n").encode()

    try:
        atomic.write_directory(out, write, manifest, MANIFEST, (OSError, RuntimeError, SafetensorError))
    except atomic.WriteFailed as e:
        raise UserError(f"cannot write {out} ({e}); nothing was written there") from None
    return out


# ---- import -------------------------------------------------------------------------------------------------
def export_adapter(run: str | Path, out: str | Path, force: bool = False) -> Path:
    """LoRA run `run`'s adapters (its best checkpoint) in peft's format: adapter_config.json and
    adapter_model.safetensors, which peft's PeftModel.from_pretrained loads onto the export of the run's base
    (python -m nanopalm.convert export BASE_RUN HF_DIR)."""
    from nanopalm.hf import PEFT_MODULES, adapter_to_peft, check_exportable

    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists: give a new directory, or --force to replace it")
    found = find_checkpoint(run, prefer_best=True)
    c = found.config().model
    if not c.lora_rank:
        raise UserError(f"{found.run_dir} is not a LoRA run (lora_rank=0): export it whole with export")
    check_exportable(c)
    adapters = dict(adapter_to_peft(name, t, c) for name, t in load_file(found.path / MODEL_FILE).items())
    targets = [PEFT_MODULES[t].split(".")[1] for t in parse_targets(c.lora_targets)]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c.lora_rank, "lora_alpha": c.lora_alpha,
              "lora_dropout": c.lora_dropout, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": found.meta["lora_base"]["checkpoint"]}

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in adapters.items()}, tmp / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def manifest(checksums: dict[str, str]) -> bytes:
        return (json.dumps({"source": str(found.path), "sha256": checksums}, indent=2) + "\n").encode()
    try:
        atomic.write_directory(out, write, manifest, MANIFEST, (OSError, SafetensorError))
    except atomic.WriteFailed as e:
        raise UserError(f"cannot write {out} ({e}); nothing was written there") from None
    return out


def _hf_reader(source: Path) -> Callable[[str], torch.Tensor]:
    """read(name) of a transformers directory's safetensors weights, one file or an index of several."""
    index = source / "model.safetensors.index.json"
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(source / "model.safetensors", "pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
        handles = {file: safe_open(source / file, "pt") for file in set(weight_map.values())}
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise UserError(f"cannot read the weights in {source} ({e}): give a transformers directory whose "
                        "model.safetensors (or index and shards) is whole") from None

    def read(name: str) -> torch.Tensor:
        if name not in weight_map:
            raise UserError(f"{source} has no tensor {name}: it is not a complete CohereForCausalLM")
        try:
            return handles[weight_map[name]].get_tensor(name).float()
        except SafetensorError as e:
            raise UserError(f"cannot read {name} in {source} ({e}): the file is damaged") from None
    return read


def import_model(source: str | Path, run: str | Path, force: bool = False) -> Path:
    """A transformers directory of model_type 'cohere' as run directory `run` (its config.json, the tokenizer,
    a step-0 checkpoint of fp32 weights), which sample.py, eval.py and train.py --init_from read."""
    from nanopalm.hf import from_cohere, palm_config

    source, run = Path(source), Path(run)
    if not (source / "config.json").is_file():
        raise UserError(f"{source} has no config.json: give a transformers model directory")
    if run.exists() and not force:
        raise UserError(f"{run} exists: give a new run directory, or --force to replace it")
    try:
        hf = json.loads((source / "config.json").read_text())
        tokenizer_json = (source / "tokenizer.json").read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {source}'s config.json and tokenizer.json ({e}): nanoPALM needs both "
                        "(the fast tokenizer)") from None
    model_config, logit_factor = palm_config(hf)
    eot = hf.get("eos_token_id")
    eot = eot[0] if isinstance(eot, list) else eot
    if not isinstance(eot, int):
        raise UserError(f"{source}/config.json has no eos_token_id: nanoPALM needs an end-of-text token")
    tokenizer = HfTokenizer(tokenizer_json, eot)
    state = from_cohere(_hf_reader(source), model_config, logit_factor)
    with torch.device("meta"):
        check_weights_fit(PaLM(model_config), state, source)
    config = build_config({**model_config.to_dict(), "out_dir": str(run), "dataset": "",
                           "init_from": ""})
    return _write_run(run, config, tokenizer, state, 0, {"imported_from": str(source), "tokenizer": "hf"})


def merge(source: str | Path, run: str | Path, force: bool = False) -> Path:
    """LoRA run `source`'s best checkpoint, its adapters merged into its base (W + (alpha / r) B A), as plain
    run directory `run`: what export, consolidate and every other tool take."""
    source, run = Path(source), Path(run)
    if run.exists() and not force:
        raise UserError(f"{run} exists: give a new run directory, or --force to replace it")
    found = find_checkpoint(source, prefer_best=True)
    saved = found.config()
    if not saved.model.lora_rank:
        raise UserError(f"{found.run_dir} is not a LoRA run (lora_rank=0): its weights are plain already")
    model, _ = load_model(found.path)  # merged on loading
    config = dataclasses.replace(saved, model=model.config, train=dataclasses.replace(saved.train, out_dir=str(run)))
    template = found.run_dir / TEMPLATE_FILE  # an instruction-tuned run's prompt template goes with it
    return _write_run(run, config, load_tokenizer(found.run_dir), model.state_dict(), found.step,
                      {"merged_from": str(found.path.resolve()), "tokenizer": found.meta.get("tokenizer")},
                      template if template.is_file() else None)


def _write_run(run: Path, config: RunConfig, tokenizer, state: dict[str, torch.Tensor], step: int, meta: dict,
               template: Path | None = None) -> Path:
    """A run directory of weights alone (config.json, the tokenizer, checkpoint `step` with no optimizer
    state), written beside `run` and renamed into place: nothing half-written under its name."""
    tmp = atomic.temporary_path(run)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        tokenizer.save(tmp)
        if template is not None:
            shutil.copyfile(template, tmp / TEMPLATE_FILE)
        atomic.write_atomic(tmp / RUN_CONFIG_FILE, (json.dumps(config.to_dict(), indent=2) + "\n").encode())
        meta = {"config": config.to_dict(), "tokenizer_sha256": tokenizer_fingerprint(tmp),
                "train_state": dataclasses.asdict(TrainState(step=step)), "val_loss": None, **meta}
        write_checkpoint(tmp, step, state, {"optimizer": None, "scaler": None}, meta, keep_last=1)
        if run.exists():
            shutil.rmtree(run)
        os.replace(tmp, run)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {run} ({e}); nothing was written there") from None
    return run


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="python -m nanopalm.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("consolidate", help="a sharded checkpoint as one single-file checkpoint")
    one.add_argument("source", help="a run directory (its newest good checkpoint) or a checkpoint directory")
    one.add_argument("--out", default=None, help="the run directory to write (default: SOURCE-consolidated)")
    out = sub.add_parser("export", help="a run's best checkpoint as a transformers model directory")
    out.add_argument("run", help="a run directory (its best checkpoint) or a checkpoint directory")
    out.add_argument("hf_dir", help="the transformers directory to write")
    out.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="the weights' dtype")
    out.add_argument("--max_shard_gib", type=float, default=5.0, help="larger models go in files of this size")
    out.add_argument("--force", action="store_true", help="replace HF_DIR if it exists")
    back = sub.add_parser("import", help="a transformers 'cohere' model directory as a run directory")
    back.add_argument("hf_dir", help="a transformers model directory (config.json, safetensors, tokenizer.json)")
    back.add_argument("run", help="the run directory to write")
    back.add_argument("--force", action="store_true", help="replace RUN if it exists")
    peft = sub.add_parser("export_adapter", help="a LoRA run's adapters in peft's format, for the export of its base")
    peft.add_argument("run", help="a LoRA run directory (its best checkpoint) or a checkpoint directory")
    peft.add_argument("adapter_dir", help="the directory to write (adapter_config.json, adapter_model.safetensors)")
    peft.add_argument("--force", action="store_true", help="replace ADAPTER_DIR if it exists")
    lora = sub.add_parser("merge", help="a LoRA run's adapters merged into its base, as a plain run directory")
    lora.add_argument("source", help="a LoRA run directory (its best checkpoint) or a checkpoint directory")
    lora.add_argument("run", help="the run directory to write")
    lora.add_argument("--force", action="store_true", help="replace RUN if it exists")
    args = parser.parse_args(argv)
    if args.command == "consolidate":
        written = consolidate(args.source, args.out)
        print(f"wrote {written}; to sample from it: python sample.py --out_dir={written.parent.parent}")
    elif args.command == "export":
        command = shlex.join(["python", "-m", "nanopalm.convert", *argv])
        written = export(args.run, args.hf_dir, args.dtype, args.max_shard_gib, args.force, command)
        print(f"wrote {written}: AutoModelForCausalLM.from_pretrained({str(written)!r}) loads it")
    elif args.command == "export_adapter":
        written = export_adapter(args.run, args.adapter_dir, args.force)
        print(f"wrote {written}: PeftModel.from_pretrained(<the export of its base>, {str(written)!r}) loads it")
    elif args.command == "merge":
        written = merge(args.source, args.run, args.force)
        print(f"wrote {written}: python sample.py --out_dir={written}; python -m nanopalm.convert export {written} "
              "HF_DIR")
    else:
        written = import_model(args.hf_dir, args.run, args.force)
        print(f"wrote {written}: python sample.py --out_dir={written}; finetune with --init_from={written}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
