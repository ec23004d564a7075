"""Benchmarks, printed as Markdown tables for docs/BENCHMARKS.md.

    python bench.py                                     # training: palm_6m, the CPU figures' model
    python bench.py --compare                           # ... against the GPT-2 architecture of the same size
    python bench.py --preset=palm_350m --block_size=2048 --batch_size=8 --device=cuda --compile false true
    python bench.py generation                          # palm_20m, 256 and 1024 tokens of context
    python bench.py generation --contexts 512 --device=cuda --new_tokens=64
    python bench.py --activation_checkpointing none full selective   # peak memory against step time
    python bench.py logits                              # one training step's peak, vocabulary 8192 and 256k
    python bench.py memory --preset=palm_8b --world_size=8 --gpu_memory=80   # per GPU: what fits
    python bench.py optimizer --preset=seed_213m        # the optimizer step alone: AdamW vs PaLM's Adafactor

Every subcommand takes --preset=NAME (a model-shape or run preset from config/, or a JSON file) and any model
key of `python train.py --help` as --key=value; the flags that take several values (--compile,
--activation_checkpointing, --contexts, --vocab_sizes) take them space-separated.
"""

from __future__ import annotations

import argparse
import shlex

from nanopalm.config import load_preset, model_config, parse_overrides
from nanopalm.errors import ArgumentParser, UserError, run_cli
from nanopalm.tools.bench import CLOCKS
from nanopalm.tools.benchmarks import bench_generation, bench_logits, bench_memory, bench_optimizer, bench_training


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="palm_6m",
                   help="a preset from config/ or a JSON file (palm_6m: the model of docs/BENCHMARKS.md's CPU figures)")
    p.add_argument("--compare", action="store_true", help="also time the GPT-2 architecture of the same size")
    p.add_argument("--batch_size", type=int, default=0, help="sequences per step (0 = the preset's, else 8)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat (their median counts)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the first repeat")
    p.add_argument("--repeats", type=int, default=5, help="rounds over the models; medians are reported")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: float32 on CPU (the targets' precision), bf16/fp16 autocast on CUDA")
    p.add_argument("--compile", nargs="+", default=["false"], choices=("false", "true"),
                   help="torch.compile off and/or on: 'false true' times both")
    p.add_argument("--activation_checkpointing", nargs="+", default=["none"], choices=("none", "full", "selective"),
                   help="activation checkpointing modes to time (and measure the peak memory of)")
    p.add_argument("--peak_flops", type=float, default=0.0,
                   help="peak FLOP/s for MFU (0 = the GPU's datasheet, else a matmul measured here)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS steps of each model (torch.profiler): the top operators' time per step")
    p.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                   help="wall, or (CPU) this process's CPU time: on a shared machine, without the waits for a core")
    sub = p.add_subparsers(dest="what")
    g = sub.add_parser("generation", help="tokens/s with and without the KV cache")
    g.add_argument("--preset", default="palm_20m", help="a preset from config/ or a JSON file")
    g.add_argument("--block_size", type=int, default=2048, help="context window of the benchmarked model")
    g.add_argument("--contexts", type=int, nargs="+", default=[256, 1024], help="prompt lengths to time")
    g.add_argument("--new_tokens", type=int, default=16, help="tokens generated per timing")
    g.add_argument("--repeats", type=int, default=3, help="timings per number; the median is reported")
    g.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="autocast precision; auto: bf16 on CUDA (as sample.py), float32 elsewhere")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    m = sub.add_parser("memory", help="per-GPU memory of a run for DDP and FSDP2 and each activation-checkpointing "
                                      "mode, and the largest micro-batch that fits (an estimate: nanopalm/memory.py)")
    m.add_argument("--preset", default="palm_1b", help="a preset from config/ or a JSON file")
    m.add_argument("--world_size", type=int, default=8, help="GPUs (ranks) in all")
    m.add_argument("--gpu_memory", type=float, default=80.0, help="GiB of one GPU")
    m.add_argument("--reserve", type=float, default=0.1,
                   help="share of it left free for what the estimate does not count: the CUDA context, NCCL's "
                        "buffers, the caching allocator's fragmentation")
    m.add_argument("--optimizer", choices=("adamw", "adafactor"), default=None, help="(default: the preset's)")
    m.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    m.add_argument("--gradient_accumulation_steps", type=int, default=0,
                   help="micro-batches a step, all ranks together (default: the preset's, else 2 a rank)")
    m.add_argument("--measure", type=int, default=0, metavar="BATCH",
                   help="also train a step of BATCH sequences here, one process, in each checkpointing mode, and "
                        "print the estimate against the measured peak (the CPU: PyTorch's MemTracker)")
    m.add_argument("--device", default="auto", help="where --measure runs: auto | cpu | cuda | cuda:N")
    o = sub.add_parser("optimizer", help="the optimizer step alone: AdamW against PaLM's Adafactor")
    o.add_argument("--preset", default="seed_213m", help="a preset from config/ or a JSON file")
    o.add_argument("--steps", type=int, default=5, help="timed steps per optimizer; the median is reported")
    o.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps")
    o.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    lg = sub.add_parser("logits", help="peak memory of one training step, chunked output layer and full logits")
    lg.add_argument("--preset", default="tiny", help="a preset from config/ or a JSON file (its shape)")
    lg.add_argument("--block_size", type=int, default=2048, help="context length of the benchmarked model")
    lg.add_argument("--vocab_sizes", type=int, nargs="+", default=[8192, 262144], help="vocabularies to measure")
    lg.add_argument("--batch_size", type=int, default=1, help="sequences per step")
    lg.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    args, extra = p.parse_known_args(argv)
    overrides = parse_overrides(extra)  # --key=value model keys
    if args.what in ("generation", "logits"):
        overrides.setdefault("block_size", args.block_size)
    elif args.what == "memory":
        if args.world_size < 1 or args.gpu_memory <= 0 or not 0 <= args.reserve < 1:
            raise UserError("--world_size must be >= 1, --gpu_memory > 0 and --reserve in [0, 1)")
    elif args.what == "logits":
        if args.batch_size < 1:
            raise UserError("--batch_size must be >= 1")
    elif args.what is None and (min(args.steps, args.repeats) < 1
                                or min(args.warmup, args.batch_size, args.profile) < 0):
        raise UserError("--steps and --repeats must be >= 1, --warmup, --batch_size and --profile >= 0")
    args.model = model_config(args.preset, overrides)
    preset = load_preset(args.preset)
    args.preset_batch_size = preset.get("batch_size")
    if args.what == "memory":
        args.optimizer = args.optimizer or preset.get("optimizer", "adamw")
        args.gradient_accumulation_steps = (args.gradient_accumulation_steps
                                            or preset.get("gradient_accumulation_steps") or 2 * args.world_size)
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    print(f"$ {shlex.join(['python', 'bench.py', *argv])}\n", flush=True)  # results say how they were made
    if args.what == "generation":
        bench_generation(args)
    elif args.what == "memory":
        bench_memory(args)
    elif args.what == "optimizer":
        bench_optimizer(args)
    elif args.what == "logits":
        bench_logits(args)
    else:
        bench_training(args)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
