"""Sample from a trained model, the text streaming to the terminal as it is generated.

    python sample.py --out_dir=out-shakespeare --start="Once upon a time there was"
    python sample.py --out_dir=RUN --start=FILE:prompt.txt --num_samples=3 --top_p=0.9 --seed=7
    python sample.py --out_dir=RUN --no_cache          # recompute the whole context each token
    python sample.py --out_dir=RUN --chat --start="Who speaks next?" --temperature=0   # an instruction-tuned run

The weights come from the run's best checkpoint (else its newest), read as plain tensors: loading a
checkpoint can never run code. The tokenizer is the one saved in the run directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from nanopalm.checkpoint import load_model_and_tokenizer
from nanopalm.device import inference_precision, pick_device
from nanopalm.errors import ArgumentParser, UserError, run_cli
from nanopalm.instruct import load_template
from nanopalm.instruct import prompt_ids as chat_prompt
from nanopalm.model import PaLM
from nanopalm.sampling import check_sampling_args, generate
from nanopalm.streaming import TextStream
from nanopalm.tokenizer import Tokenizer

SEPARATOR = "\n---------------\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out-shakespeare",
                   help="run directory (or one checkpoint directory in it); default: the default run's")
    p.add_argument("--start", default="\n", help='the prompt: text, or "FILE:path" to read it from a file')
    p.add_argument("--num_samples", type=int, default=1, help="samples to draw, one after the other")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens generated per sample at most")
    p.add_argument("--temperature", type=float, default=0.8, help="< 1 sharper, > 1 more random, 0 greedy")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens only")
    p.add_argument("--top_p", type=float, default=None, help="nucleus: the fewest tokens holding this mass")
    p.add_argument("--seed", type=int, default=1337, help="the same seed gives the same text")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="autocast precision; auto: bf16 (or fp16) on CUDA, float32 elsewhere")
    p.add_argument("--no_cache", action="store_true", help="no KV cache: recompute the context every token")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the run's instruction template as the "
                                                         "user's turn; the answer ends at end-of-text")
    return p.parse_args(argv)


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        path = Path(start[len("FILE:"):])
        try:
            start = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read the prompt file {path} ({e.strerror}): fix the path after FILE:") from None
        except UnicodeDecodeError:
            raise UserError(f"the prompt file {path} is not UTF-8 text: save it as UTF-8") from None
    if not start:
        raise UserError("the prompt is empty: give --start=TEXT or --start=FILE:path (the default is a newline)")
    return start


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    # Every flag is checked before the (possibly slow) model load.
    if args.max_new_tokens <= 0:
        raise UserError(f"--max_new_tokens={args.max_new_tokens} must be a positive integer")
    if args.num_samples <= 0:
        raise UserError(f"--num_samples={args.num_samples} must be a positive integer")
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    prompt = read_prompt(args.start)
    device = pick_device(args.device)

    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        what = "is a file" if out_dir.exists() else "does not exist"
        raise UserError(f"--out_dir={out_dir} {what}: give the directory of a training run")
    model, tokenizer, found = load_model_and_tokenizer(out_dir, device)
    template = load_template(found.run_dir) if args.chat else None
    prompt_ids = (chat_prompt([{"role": "user", "content": prompt}], tokenizer, template) if args.chat
                  else tokenizer.encode(prompt))
    precision = inference_precision(args.dtype, device)  # bf16 autocast on CUDA; the weights stay fp32

    c, dtype = model.config, precision.dtype
    print(f"{model.num_params():,} parameters on {device} ({str(dtype).removeprefix('torch.')}); KV cache"
          f"{' (unused: --no_cache)' if args.no_cache else ''}: {c.kv_cache_bytes(1, dtype):,} bytes a sequence "
          f"({c.n_layer} layers x {c.n_kv_head} K/V head(s) x {c.block_size} positions x {c.head_dim} x 2); "
          f"prompt {len(prompt_ids)} tokens", file=sys.stderr)
    if len(prompt_ids) > c.block_size:  # generate() crops the context to the model's window (sampling.py)
        print(f"note: the prompt is {len(prompt_ids)} tokens, longer than block_size={c.block_size}: the model sees "
              f"only its last {c.block_size} tokens", file=sys.stderr)

    generator = torch.Generator(device=device).manual_seed(args.seed)
    with precision.autocast(device, for_generation=True):
        for _ in range(args.num_samples):
            stream_sample(model, tokenizer, prompt_ids, args, generator)


def stream_sample(model: PaLM, tokenizer: Tokenizer, prompt_ids: list[int], args: argparse.Namespace,
                  generator: torch.Generator) -> None:
    """Generate one sample, writing the prompt and then each newly completed piece of text."""
    stream = TextStream(tokenizer.decode)
    write(stream.push(prompt_ids))
    x = torch.tensor([prompt_ids], dtype=torch.long, device=generator.device)
    generate(
        model, x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eot_id=tokenizer.eot_id, use_cache=not args.no_cache, generator=generator, vocab_size=tokenizer.vocab_size,
        on_token=lambda t: write(stream.push(t.tolist())),
    )
    write(stream.flush() + SEPARATOR)


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # the point of streaming: show each piece now, not when a buffer fills


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
