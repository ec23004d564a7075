"""Instruction data (nanopalm/instruct.py): the template by hand, the loss on responses alone against torch's own
cross-entropy, padding that no example sees, training, greedy exact match, and malformed input."""

import contextlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN, load_script

from nanopalm.config import build_config
from nanopalm.errors import UserError, run_cli
from nanopalm.instruct import (
    TEMPLATE_FILE,
    ExampleLoader,
    exact_match,
    messages_of,
    prepare_instructions,
    prompt_ids,
    read_examples,
    render,
    score_examples,
)
from nanopalm.model import PaLM, PaLMConfig
from nanopalm.tokenizer import load_tokenizer
from nanopalm.trainer import train

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
        {"role": "assistant", "content": "A friend."}, {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Gone."}]


def test_the_template_renders_by_hand_and_learns_the_answers_alone(char_dataset):
    tokenizer = load_tokenizer(char_dataset)
    ids, learned = render(CHAT, tokenizer)
    text = ("System:\nBe brief.\n\nUser:\nWho art thou?\n\nAssistant:\nA friend.<|endoftext|>\n\nUser:\nAnd then?"
            "\n\nAssistant:\nGone.<|endoftext|>")
    assert tokenizer.decode(ids) == text
    learned_text = "".join(tokenizer.decode([i]) for i, flag in zip(ids, learned, strict=True) if flag)
    assert learned_text == "A friend.<|endoftext|>Gone.<|endoftext|>"
    # the prompt sampling builds for the last turn is the rendered conversation up to that answer
    prompt = prompt_ids(CHAT[:-1], tokenizer)
    assert ids[:len(prompt)] == prompt and tokenizer.decode(ids[len(prompt):]) == "Gone.<|endoftext|>"


def test_the_three_line_shapes_become_one_conversation():
    assert messages_of({"instruction": "Say it", "input": "twice", "output": "it it"}) == [
        {"role": "user", "content": "Say it\n\ntwice"}, {"role": "assistant", "content": "it it"}]
    assert messages_of({"instruction": "Say it", "output": "it"})[0] == {"role": "user", "content": "Say it"}
    assert messages_of({"prompt": "p", "response": "r"}) == [{"role": "user", "content": "p"},
                                                              {"role": "assistant", "content": "r"}]
    assert messages_of({"messages": CHAT}) == CHAT


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_a_malformed_line_is_named_with_its_file_and_line_and_nothing_is_written(tmp_path, char_dataset, capsys):
    good = write_lines(tmp_path / "good.jsonl", [{"prompt": "a", "response": "b"}])
    cases = {"{not json": "Expecting property name", '{"prompt": "a"}': 'give "instruction"/"output"',
             '{"messages": [{"role": "user", "content": "hi"}]}': "needs an assistant message",
             '{"messages": [{"role": "king", "content": "hi"}]}': 'needs a "role"'}
    prepare = load_script("data/instruct/prepare.py").main
    for line, why in cases.items():
        bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, line])
        with pytest.raises(UserError, match=f"bad.jsonl:2: .*{why}"):
            read_examples(bad)
        capsys.readouterr()
        out = tmp_path / "out"
        code = run_cli(prepare, [f"--train_file={good}", f"--val_file={bad}", f"--tokenizer_from={char_dataset}",
                                 f"--out_dir={out}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and "bad.jsonl:2" in err[0] and not out.exists()
    # a character the model's tokenizer lacks, in the val file: refused before train.bin is written
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "€"}])
    code = run_cli(prepare, [f"--train_file={good}", f"--val_file={bad}", f"--tokenizer_from={char_dataset}",
                             f"--out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "'€' is not in this char vocabulary" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def instructions(tmp_path, char_dataset):
    """A dataset of 4 chat examples of different lengths (train and val alike)."""
    rows = [{"prompt": "Who speaks?", "response": "ROMEO"}, {"instruction": "Name a queen", "output": "Mab"},
            {"prompt": "Count to three, slowly and surely now", "response": "one, two, three"}, {"messages": CHAT}]
    path = write_lines(tmp_path / "examples.jsonl", rows)
    out = tmp_path / "data"
    prepare_instructions({"train": path, "val": path}, load_tokenizer(char_dataset), out)
    return out, [messages_of(r) for r in rows]


def test_a_batch_holds_each_example_padded_with_only_its_answers_as_targets(instructions, char_dataset):
    data, examples = instructions
    tokenizer = load_tokenizer(char_dataset)
    x, y = ExampleLoader(data, "train", 4, 128, 0, "cpu").rows(np.arange(4))
    longest = max(len(render(m, tokenizer)[0]) for m in examples) - 1
    assert longest == 96 and x.shape == (4, 128)  # the longest example's inputs rounded up to 64
    for row, m in enumerate(examples):
        ids, learned = render(m, tokenizer)
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1] and (x[row, n:] == tokenizer.eot_id).all()
        expected = [t if flag else -1 for t, flag in zip(ids[1:], learned[1:], strict=True)]
        assert y[row, :n].tolist() == expected and (y[row, n:] == -1).all()


def test_the_masked_loss_is_torchs_cross_entropy_over_the_answers_and_padding_changes_nothing(instructions):
    data, _ = instructions
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(vocab_size=80, block_size=128, n_layer=2, n_head=2, d_model=32, z_loss=0.0)).eval()
    loader = ExampleLoader(data, "train", 4, 128, 0, "cpu")
    x, y = loader.rows(np.arange(4))
    counted = y != -1
    reference = F.cross_entropy(model(x).logits[counted], y[counted])  # torch's own, on the answers alone
    ce = model(x, y).ce
    torch.testing.assert_close(ce, reference, rtol=1e-6, atol=1e-6)
    # each example scored alone, unpadded: the batch's loss is their token-weighted mean
    alone = []
    for e in range(4):
        xe, ye = loader.rows(np.array([e]))
        alone.append((model(xe, ye).ce * (ye != -1).sum(), (ye != -1).sum()))
    torch.testing.assert_close(ce, sum(a for a, _ in alone) / sum(n for _, n in alone), rtol=1e-5, atol=1e-6)


def test_an_example_longer_than_the_block_is_cut_and_one_without_an_answer_in_it_left_out(instructions, char_dataset):
    data, _ = instructions
    loader = ExampleLoader(data, "train", 4, 52, 0, "cpu")
    # 36, 35, 72 and 97 tokens, the first answer token at 30, 31, 56 and 51: the last two are cut at 53 tokens, and
    # the counting one (3rd) has no answer token left in its window
    assert loader.cut == 2 and loader.skipped == 1 and loader.examples.tolist() == [0, 1, 3]
    x, y = loader.get_batch(0, 0)
    assert x.shape[1] <= 52 and (y != -1).any(dim=1).all()
    # the whole-split score counts what is scored: ROMEO and Mab with their end-of-text, and the conversation's
    # first two answer characters "A " (tokens 51 and 52): 6 + 4 + 2 tokens, 5 + 3 + 2 bytes
    model = PaLM(PaLMConfig(vocab_size=80, block_size=52, n_layer=1, n_head=2, d_model=16))
    nats, tokens, size = score_examples(model, loader, load_tokenizer(char_dataset), contextlib.nullcontext)
    assert (tokens, size) == (12, 10) and nats > 0


def test_finetuning_on_instructions_learns_the_answers_and_counts_learned_tokens(instructions, tmp_path, capsys):
    data, examples = instructions
    values = {**TINY_RUN, "block_size": 128, "dataset": str(data), "out_dir": str(tmp_path / "run"),
              "max_iters": 150, "eval_interval": 150, "batch_size": 4, "learning_rate": 1e-2,
              "full_val_tokens": 1000}
    train(build_config(values))
    run = tmp_path / "run"
    assert json.loads((run / TEMPLATE_FILE).read_text())["assistant"] == "Assistant:\n"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((data / "meta.json").read_text())
    full = next(r for r in rows if "val_bpb_full" in r)
    # by hand: the answers' characters and an end-of-text each, ROMEO 5 + 1, Mab 3 + 1, one, two, three 15 + 1,
    # A friend. 9 + 1, Gone. 5 + 1; their bytes without the end-of-text
    assert full["val_tokens_full"] == meta["val_tokens"] == 42
    assert full["val_bytes_full"] == meta["val_bytes"] == 37
    first_step = next(r for r in rows if "train_loss" in r)
    _, y = ExampleLoader(data, "train", 4, 128, 1337, "cpu").get_batch(0, 0)  # step 0's batch (seed 1337)
    assert first_step["tokens"] == int((y != -1).sum())  # the learned tokens, not every position
    # a small model learns four answers by heart: greedy exact match 1.0, and 0.0 against wrong answers
    path = tmp_path / "examples.jsonl"
    assert exact_match(run, path, "cpu")["exact_match"] == 1.0
    wrong = write_lines(tmp_path / "wrong.jsonl", [{"prompt": "Who speaks?", "response": "JULIET"}])
    assert exact_match(run, wrong, "cpu")["exact_match"] == 0.0
    # sample.py --chat wraps the prompt in the run's template and stops at the answer's end-of-text
    capsys.readouterr()
    assert run_cli(load_script("sample.py").main, [f"--out_dir={run}", "--chat", "--start=Who speaks?",
                                                   "--temperature=0", "--device=cpu"]) == 0
    assert capsys.readouterr().out == "User:\nWho speaks?\n\nAssistant:\nROMEO<|endoftext|>\n" + "-" * 15 + "\n"
