"""An export checked end to end against the run it came from: the figures of docs/HF.md.

    python scripts/hf_check.py --out_dir=out-shakespeare                 # transformers, tokenizer, lm-eval
    python scripts/hf_check.py --out_dir=RUN --gguf=LLAMA_CPP_DIR        # and llama.cpp, through GGUF

It exports the run (python -m nanopalm.convert export) into a temporary directory, then prints: the largest
logit difference between nanoPALM and transformers' CohereForCausalLM on val windows (fp32); 32 greedy tokens
from each; the tokenizers' agreement on every document of the val split; the lm-evaluation-harness's own `hf`
model against our adapter on log-likelihoods of val lines; peft's LoRA trained a few steps on the export and
merged. With --gguf (a llama.cpp source tree, e.g. the one
llama-cpp-python's sdist vendors): llama.cpp's converter writes an f32 GGUF, and llama-cpp-python's greedy
tokens are compared too. Needs the [hf] extra, accelerate (the harness's model) and peft.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from nanopalm import convert
from nanopalm.checkpoint import load_model_and_tokenizer
from nanopalm.data import read_token_file, resolve_dataset
from nanopalm.errors import ArgumentParser, run_cli
from nanopalm.sampling import generate

PROMPT, NEW_TOKENS, WINDOWS = "ROMEO:\n", 32, 8


def val_documents(dataset: str, eot_id: int) -> list[np.ndarray]:
    tokens = np.asarray(read_token_file(resolve_dataset(dataset) / "val.bin")[0])
    cuts = np.flatnonzero(tokens == eot_id)
    pieces = (piece[piece != eot_id] for piece in np.split(tokens, cuts + 1))
    return [piece for piece in pieces if len(piece)]


def check(run: Path, export_dir: Path, gguf: Path | None) -> None:
    import transformers

    model, tokenizer, found = load_model_and_tokenizer(run)
    c = model.config
    print(f"run {run}, step {found.step}: {model.num_params():,} parameters, tokenizer {tokenizer.name}")
    convert.main(["export", str(run), str(export_dir)])
    twin = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    theirs = transformers.AutoTokenizer.from_pretrained(export_dir)

    documents = val_documents(found.config().train.dataset, tokenizer.eot_id)
    stream = torch.from_numpy(np.concatenate(documents).astype(np.int64))
    windows = stream[: WINDOWS * c.block_size].view(WINDOWS, c.block_size)
    with torch.no_grad():
        difference = (model(windows).logits - twin(windows).logits).abs().max().item()
    print(f"logits: {WINDOWS} val windows of {c.block_size} tokens, max |nanoPALM - transformers| = {difference:.2e}")

    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        ours = generate(model, prompt, NEW_TOKENS, temperature=0.0)[0, prompt.shape[1]:].tolist()
        hf_ids = twin.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                               min_new_tokens=NEW_TOKENS)[0, prompt.shape[1]:].tolist()
    print(f"greedy, {NEW_TOKENS} tokens after {PROMPT!r}: {'identical' if ours == hf_ids else 'DIFFERENT'}")
    print(f"  nanoPALM:     {tokenizer.decode(ours)!r}\n  transformers: {theirs.decode(hf_ids)!r}")

    texts = [tokenizer.decode(d.tolist()) for d in documents]
    expected, got = tokenizer.encode_batch(texts), theirs(texts, add_special_tokens=False).input_ids
    same = sum(a == b for a, b in zip(expected, got, strict=True))
    print(f"tokenizer: {same} of {len(texts)} val documents ({sum(map(len, expected)):,} tokens) encode to the "
          "same ids")

    harness(run, export_dir, texts)
    lora(export_dir, windows)
    if gguf is not None:
        llama_cpp(gguf, export_dir, prompt, ours, tokenizer)


def harness(run: Path, export_dir: Path, texts: list[str]) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from nanopalm.harness import NanoPalmLM

    lines = [line for text in texts[:20] for line in text.splitlines() if len(line) > 20][:64]
    pairs = [(line[: len(line) // 2], line[len(line) // 2:]) for line in lines]
    requests = [Instance("loglikelihood", {}, pair, 0) for pair in pairs]
    theirs = HFLM(pretrained=str(export_dir), device="cpu", dtype="float32", batch_size=8)
    ours = NanoPalmLM(run=str(run), device="cpu", batch_size=8)
    a = [ll for ll, _ in theirs.loglikelihood(requests, disable_tqdm=True)]
    b = [ll for ll, _ in ours.loglikelihood(requests, disable_tqdm=True)]
    gap = max(abs(x - y) for x, y in zip(a, b, strict=True))
    print(f"lm-eval: {len(pairs)} log-likelihoods of val half-lines, max |hf - nanopalm| = {gap:.2e}")


def lora(export_dir: Path, windows: torch.Tensor) -> None:
    """peft's LoRA on the export (docs/HF.md): 20 AdamW steps on val windows, then merged back into the weights."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(20):
        loss = model(windows[:2], labels=windows[:2]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        adapted = model(windows[2:4]).logits
        merged = model.merge_and_unload()(windows[2:4]).logits
    print(f"peft LoRA (r 8, every linear layer: {trainable:,} trainable parameters): train loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f} in 20 steps; merged into the weights, max |logit change| = "
          f"{(adapted - merged).abs().max().item():.2e}")


def llama_cpp(source: Path, export_dir: Path, prompt: torch.Tensor, ours: list[int], tokenizer) -> None:
    from llama_cpp import Llama

    out = export_dir.parent / "model-f32.gguf"
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(export_dir), "--outfile", str(out),
                    "--outtype", "f32"], check=True, env=env, capture_output=True)
    llm = Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False)
    ids = prompt[0].tolist()
    same_ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    print(f"llama.cpp's tokenizer on {PROMPT!r}: {'the same ids' if same_ids else 'DIFFERENT ids'}")
    got = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        got.append(token)
        if len(got) == NEW_TOKENS:
            break
    print(f"llama.cpp (GGUF f32, {out.stat().st_size / 2**20:.1f} MiB), greedy {NEW_TOKENS} tokens: "
          f"{'identical' if got == ours else 'DIFFERENT'}\n  llama.cpp:    {tokenizer.decode(got)!r}")


def main(argv: list[str]) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out-shakespeare", help="the run to export and check")
    p.add_argument("--gguf", default=None, help="a llama.cpp source tree: also convert to GGUF and compare")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        check(Path(args.out_dir), Path(tmp) / "hf", Path(args.gguf) if args.gguf else None)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
