"""Whole-split evaluation (nanopalm/evaluate.py, eval.py): every token scored exactly once, the same numbers as
the model's log-probabilities, bytes counted exactly, and val_bpb_full at the end of training."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import EVAL_RUN, load_script

from nanopalm import checkpoint as ckpt
from nanopalm.config import build_config
from nanopalm.data import load_meta, read_token_file
from nanopalm.device import Precision
from nanopalm.errors import UserError
from nanopalm.evaluate import Scorer, count_windows, document_bytes, window
from nanopalm.model import PaLM, PaLMConfig
from nanopalm.shakespeare import load_passages, split_passages
from nanopalm.tokenizer import load_tokenizer
from nanopalm.trainer import train

CPU, FP32 = torch.device("cpu"), Precision(torch.float32)


def eval_main():
    return load_script("eval.py").main


def tiny_model(block_size: int = 16) -> PaLM:
    torch.manual_seed(0)
    config = PaLMConfig(vocab_size=40, block_size=block_size, n_layer=2, n_head=2, d_model=32, tie_embeddings=False)
    return PaLM(config).eval()


@pytest.mark.parametrize("block_size", [4, 16])
def test_every_token_is_scored_once_with_at_least_block_size_minus_stride_plus_one_of_context(block_size):
    for n in (1, 3, block_size - 1, block_size, block_size + 1, 5 * block_size + 3, 97):
        for stride in sorted({1, 3, block_size // 2, block_size - 1, block_size} - {0}):
            scored = []
            for k in range(count_windows(n, block_size, stride)):
                start, end, count = window(k, n, block_size, stride)
                assert 0 < count <= end - start <= block_size  # a window never exceeds the model's context
                predicted = list(range(end - count + 1, end + 1))  # stream positions: 1..n are the tokens
                assert k == 0 or min(p - start for p in predicted) >= block_size - stride + 1
                scored += predicted
            assert scored == list(range(1, n + 1)), (n, stride)  # each token once, in order
            assert end == n and end - start == min(n, block_size)  # the last window: all the context that fits


def test_the_scorer_equals_the_log_probabilities_of_the_logits():
    """The fused loss path, batched and padded, against log_softmax of the logits window by window."""
    model, eot = tiny_model(), 39
    tokens = np.random.default_rng(0).integers(0, 39, size=50)
    stream = np.concatenate([[eot], tokens])
    for stride in (None, 5):
        expected = 0.0
        for k in range(count_windows(50, 16, stride or 16)):
            start, end, count = window(k, 50, 16, stride or 16)
            x = torch.tensor(stream[start:end])[None]
            logp = model(x).logits[0].log_softmax(-1)
            targets = torch.tensor(stream[start + 1:end + 1])
            expected -= logp[-count:].gather(-1, targets[-count:, None]).sum().item()
        for batch_size in (1, 3):
            nats, n = Scorer(model, 16, batch_size, CPU, FP32, stride).score(tokens, eot)
            assert n == 50 and nats == pytest.approx(expected, rel=1e-5)


def test_stride_and_disjoint_windows_agree_where_they_must():
    model, eot = tiny_model(), 39
    short = np.arange(16) % 39  # fits one window: every stride scores it the same way
    reference = Scorer(model, 16, 4, CPU, FP32).score(short, eot)
    for stride in (1, 7, 15):
        assert Scorer(model, 16, 4, CPU, FP32, stride).score(short, eot) == pytest.approx(reference, rel=1e-6)
    with pytest.raises(UserError, match="--stride 16 must be between 1 and block_size - 1 = 15"):
        Scorer(model, 16, 4, CPU, FP32, 16)


def test_the_bytes_are_those_of_the_documents_text(char_dataset):
    tokens, _ = read_token_file(char_dataset / "val.bin")
    meta = load_meta(char_dataset)
    assert len(tokens) == meta["val_tokens"]
    assert document_bytes(tokens, load_tokenizer(char_dataset)) == meta["val_bytes"]  # what prepare counted


def test_eval_py_scores_the_whole_val_split(eval_run, small_val_dataset, tmp_path):
    meta = load_meta(small_val_dataset)
    eval_main()([f"--out_dir={eval_run}", "--batch_size=8"])
    result = json.loads((eval_run / "eval" / "val.json").read_text())
    # every token predicted once (the scorer's count of its targets), and the bytes of the raw text: the char
    # stream is each val scene then an end-of-text, cut after 3,000 tokens (small_val_dataset)
    scenes = split_passages(load_passages())[1]
    raw = "".join(scene + "\0" for scene in scenes)[:3000].replace("\0", "")
    assert result["tokens"] == meta["val_tokens"] == 3000 and result["bytes"] == len(raw.encode())
    # training's formula, val_loss / ln 2 / bytes_per_token_val, over the whole split
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2) / meta["bytes_per_token_val"])
    final_val_loss = ckpt.find_checkpoint(eval_run).meta["val_loss"]  # 4 random batches of 128 tokens
    assert abs(result["loss"] - final_val_loss) < 0.25, (result["loss"], final_val_loss)
    assert result["step"] == EVAL_RUN["max_iters"] and result["dtype"] == "float32" and result["stride"] == 128

    out = tmp_path / "stride.json"
    eval_main()([f"--out_dir={eval_run}", "--stride=32", f"--output={out}"])
    sliding = json.loads(out.read_text())
    assert (sliding["tokens"], sliding["bytes"]) == (result["tokens"], result["bytes"])
    assert sliding["loss"] < result["loss"]  # at least 97 tokens of context for every token after the first 128


def test_eval_py_scores_text_files_with_the_runs_tokenizer(eval_run, tmp_path):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("ROMEO:\nBut, soft! what light through yonder window breaks?\n")
    files[1].write_text("JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n")
    out = tmp_path / "files.json"
    eval_main()([f"--out_dir={eval_run}", "--data_files", *map(str, files), f"--output={out}"])
    result = json.loads(out.read_text())
    per_file = result["data_files"]
    assert [per_file[str(f)]["bytes"] for f in files] == [len(f.read_bytes()) for f in files]
    assert result["tokens"] == sum(len(f.read_text()) for f in files)  # char tokenizer: one token a character
    assert result["nats"] == pytest.approx(sum(p["nats"] for p in per_file.values()))
    eval_main()([f"--out_dir={eval_run}", "--data_files", str(files[1])])  # by default named after the files it scored
    eval_main()([f"--out_dir={eval_run}", "--data_files", *map(str, files)])
    written = {name: json.loads((eval_run / "eval" / name).read_text())["data_files"].keys()
               for name in ("b.json", "a+b.json")}
    assert written["b.json"] == {str(files[1])} and written["a+b.json"] == set(map(str, files))


def test_training_records_the_whole_val_bits_per_byte(tiny_run, small_val_dataset, tmp_path, capsys, monkeypatch):
    bars = []  # the whole-val pass takes tens of seconds at the default run's size: announced, with a bar
    monkeypatch.setattr("nanopalm.evaluate.tqdm", lambda iterable, **kwargs: bars.append(kwargs) or iterable)
    result = train(tiny_run("run", dataset=str(small_val_dataset), max_iters=20, full_val_tokens=10_000))
    assert "step     20 | val loss" in capsys.readouterr().out.split("scoring the whole val split (3,000 tokens) "
                                                                 "for val_bpb_full...")[0]
    assert [(b["desc"], b["disable"], b["delay"]) for b in bars] == [("val split", False, 2)]
    monkeypatch.undo()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    full = [r for r in rows if "val_bpb_full" in r]
    assert len(full) == 1 and full[0]["step"] == 20
    model, _ = ckpt.load_model(tmp_path / "run", prefer_best=False)  # the final model
    tokenizer = load_tokenizer(small_val_dataset)
    score = Scorer(model, 32, 8, CPU, FP32).split(tokenizer, small_val_dataset, "val")
    meta = load_meta(small_val_dataset)
    assert full[0]["val_bpb_full"] == pytest.approx(score.bits_per_byte, rel=1e-6)
    assert (full[0]["val_tokens_full"], full[0]["val_bytes_full"]) == (meta["val_tokens"], meta["val_bytes"])
    assert abs(full[0]["val_loss_full"] - result["val_loss"]) < 0.2  # the 4-batch estimate of the same loss

    capsys.readouterr()
    train(tiny_run("skipped", dataset=str(small_val_dataset), max_iters=1, full_val_tokens=100))
    rows = (tmp_path / "skipped" / "metrics.jsonl").read_text()
    assert "val_bpb_full" not in rows
    assert "whole-val evaluation skipped: the val split has 3,000 tokens, more than full_val_tokens=100" in \
        capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_ranks_record_the_same_val_bpb_full_as_one_process(fsdp, small_val_dataset, tmp_path):
    """Under torchrun every rank scores its share of the windows (FSDP2: every forward needs every rank);
    rank 0 alone writes the row."""
    from test_distributed import torchrun

    values = {**EVAL_RUN, "block_size": 32, "max_iters": 4, "eval_interval": 4, "gradient_accumulation_steps": 2,
              "dataset": str(small_val_dataset), "full_val_tokens": 10_000}
    train(build_config({**values, "out_dir": str(tmp_path / "one")}))
    result = torchrun({**values, "out_dir": tmp_path / "two", "fsdp": fsdp})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| whole val split: ") == 1 and result.stdout.count("scoring the whole val") == 1

    def row(run: str) -> dict:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if "val_bpb_full" in line]

    (one,), (two,) = row("one"), row("two")
    assert two["val_tokens_full"] == one["val_tokens_full"] == 3000
    assert two["val_bpb_full"] == pytest.approx(one["val_bpb_full"], rel=1e-5)
