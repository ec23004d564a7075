"""The lm-evaluation-harness adapter (nanopalm/harness.py): local tasks through the harness's own
simple_evaluate, log-likelihoods equal to the model's, rolling log-likelihoods equal to eval.py --stride, and
generation that stops at the stop string and matches sample.py. Offline: the tasks are written into tmp_path."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from lm_eval.api.instance import Instance
from test_eval import eval_main
from test_generate import load_sample_script

from nanopalm.errors import UserError
from nanopalm.harness import NanoPalmLM, generation_settings
from nanopalm.shakespeare import load_passages, split_passages
from nanopalm.shakespeare_tasks import NEXT_LINE, SPEAKER, write_tasks

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def lm(eval_run) -> NanoPalmLM:
    return NanoPalmLM(run=str(eval_run), device="cpu", batch_size=3)


def request(kind: str, *args) -> Instance:
    return Instance(kind, {}, args, 0)


def loglikelihoods(lm: NanoPalmLM, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    return lm.loglikelihood([request("loglikelihood", *pair) for pair in pairs], disable_tqdm=True)


def direct_loglikelihood(lm: NanoPalmLM, context: str, continuation: str) -> float:
    """log P(continuation | context) from the model's logits, one sequence at a time, no padding. As the harness
    does (TemplateLM._encode_pair), the context's trailing whitespace moves to the start of the continuation."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    encode = lm.tokenizer.encode
    context_ids, continuation_ids = encode(context) or [lm.tokenizer.eot_id], encode(continuation)
    tokens = (context_ids + continuation_ids)[-(lm.max_length + 1):]
    with torch.no_grad():
        logp = lm.model(torch.tensor([tokens[:-1]])).logits[0].log_softmax(-1)
    positions = range(len(tokens) - 1 - len(continuation_ids), len(tokens) - 1)
    return sum(logp[p, t].item() for p, t in zip(positions, continuation_ids, strict=True))


def test_local_tasks_run_through_simple_evaluate(lm, eval_run, tmp_path, monkeypatch):
    """eval.py --tasks on a multiple-choice and a generation task; the harness's scores are the ones our own
    loglikelihood and generate_until give."""
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)  # `pip list` and more: 2-3 s
    names = write_tasks(tmp_path / "tasks", docs=6)
    out = tmp_path / "tasks.json"
    eval_main()([f"--out_dir={eval_run}", f"--tasks={','.join(names)}", f"--include_path={tmp_path / 'tasks'}",
                 "--batch_size=3", "--device=cpu", f"--output={out}"])
    results = json.loads(out.read_text())["results"]

    docs = [json.loads(line) for line in (tmp_path / "tasks" / f"{NEXT_LINE}.test.jsonl").read_text().splitlines()]
    correct = correct_norm = 0
    for doc in docs:
        scores = [ll for ll, _ in loglikelihoods(lm, [(doc["context"], c) for c in doc["choices"]])]
        correct += max(range(4), key=scores.__getitem__) == doc["label"]
        correct_norm += max(range(4), key=lambda i: scores[i] / len(doc["choices"][i])) == doc["label"]
    assert results[NEXT_LINE]["acc,none"] == pytest.approx(correct / len(docs))
    assert results[NEXT_LINE]["acc_norm,none"] == pytest.approx(correct_norm / len(docs))

    docs = [json.loads(line) for line in (tmp_path / "tasks" / f"{SPEAKER}.test.jsonl").read_text().splitlines()]
    settings = {"until": [":", "\n"], "max_gen_toks": 24, "do_sample": False}
    texts = lm.generate_until([request("generate_until", d["context"], settings) for d in docs], disable_tqdm=True)
    assert results[SPEAKER]["exact_match,none"] == pytest.approx(sum(
        t == d["speaker"] for t, d in zip(texts, docs, strict=True)) / len(docs))
    assert json.loads(out.read_text())["n-shot"] == {NEXT_LINE: 0, SPEAKER: 0}


def test_loglikelihood_is_the_sum_of_the_models_log_probabilities(lm):
    long_context = "KING HENRY V:\nOnce more unto the breach, dear friends, once more;\n" * 4  # > block_size 128
    pairs = [("ROMEO:\nBut, soft", "! what light"), ("", "JULIET:\n"), (long_context, "Or close the wall"),  # \n moves
             ("HAMLET:\nTo be, or not to be", ":"), ("CORIOLANUS:\nYou common cry of curs!", " whose breath")]
    got = loglikelihoods(lm, pairs)  # batches of 3, padded, longest first
    for (context, continuation), (ll, _) in zip(pairs, got, strict=True):
        assert ll == pytest.approx(direct_loglikelihood(lm, context, continuation), rel=1e-5)

    context = "ROMEO:\nBut, soft"
    with torch.no_grad():
        logits = lm.model(torch.tensor([lm.tokenizer.encode(context)])).logits[0, -1]
    best, worst = (lm.tokenizer.decode([int(i)]) for i in (logits.argmax(), logits.argmin()))
    assert [greedy for _, greedy in loglikelihoods(lm, [(context, best), (context, worst)])] == [True, False]


def test_a_continuation_is_greedy_only_if_every_one_of_its_tokens_is(lm):
    """lm-eval's is_greedy: greedy decoding would produce the whole continuation. Two tokens, the first the argmax
    and the second the argmin after it, are not (a check of any token, not all, would say they are)."""
    ids = lm.tokenizer.encode("ROMEO:\nBut, soft")
    with torch.no_grad():
        first = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
        after = lm.model(torch.tensor([ids + [first]])).logits[0, -1]
    assert first != lm.tokenizer.eot_id
    pairs = [("ROMEO:\nBut, soft", lm.tokenizer.decode([first, int(second)])) for second in (after.argmax(),
                                                                                          after.argmin())]
    assert all(lm.tokenizer.encode(continuation) == [first, int(second)]  # the char tokenizer: one token a character
               for (_, continuation), second in zip(pairs, (after.argmax(), after.argmin()), strict=True))
    assert [greedy for _, greedy in loglikelihoods(lm, pairs)] == [True, False]


def test_loglikelihood_rolling_equals_eval_py_stride(lm, eval_run, tmp_path):
    text = ("GLOUCESTER:\nNow is the winter of our discontent\nMade glorious summer by this sun of York;\n"
            "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n")
    path = tmp_path / "text.txt"
    path.write_text(text)
    assert len(text) > lm.max_length  # several windows
    for stride in (None, 32):
        out = tmp_path / f"{stride}.json"
        flags = [f"--stride={stride}"] if stride else []
        eval_main()([f"--out_dir={eval_run}", f"--data_files={path}", f"--output={out}", *flags])
        rolling = NanoPalmLM(model=lm.model, tokenizer=lm.tokenizer, device="cpu", stride=stride)
        (ll,) = rolling.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
        assert ll == pytest.approx(-json.loads(out.read_text())["nats"], rel=1e-9)
        if stride is None:  # by hand, outside the Scorer, as its docstring says: disjoint windows of block_size
            # after an end-of-text, the last one ending the stream with as much context as fits
            ids, block, eot = lm.tokenizer.encode(text), lm.max_length, lm.tokenizer.eot_id
            stream, reference, done = [eot, *ids], 0.0, 0
            while done < len(ids):
                end = min(done + block, len(ids))
                start = max(0, end - block)
                with torch.no_grad():
                    logits = lm.model(torch.tensor([stream[start:end]])).logits[0].double()
                logp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(stream[start + 1:end + 1])[:, None])
                reference += logp[done - start:].sum().item()  # the predictions no earlier window made
                done = end
            assert len(ids) % block and ll == pytest.approx(reference, rel=1e-5)

    short = text[:100]  # one window: the rolling score is log P(text | start of a document), as loglikelihood gives
    (ll,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", short)], disable_tqdm=True)
    assert ll == pytest.approx(loglikelihoods(lm, [("", short)])[0][0], rel=1e-5)


def test_a_continuation_longer_than_the_block_is_an_error_naming_both_lengths(lm):
    """docs/EVAL.md: the context is cut from the left to fit, but a continuation that does not fit cannot be
    scored: one UserError, not a silently shortened score."""
    fits = "a" * lm.max_length  # 128 characters, 128 tokens: the whole block
    (ll, _), = loglikelihoods(lm, [("ROMEO:\n" * 40 + "O", fits)])  # a context far longer than the block: cut
    assert ll < 0
    with pytest.raises(UserError, match=f"continuation of {lm.max_length + 1} tokens is longer than the model's "
                                        f"block_size {lm.max_length}"):
        loglikelihoods(lm, [("ROMEO", fits + "a")])


def test_generate_until_stops_at_the_stop_string_and_matches_sample_py(lm, eval_run, capsys):
    prompt = "ROMEO:\n"
    load_sample_script().main([f"--out_dir={eval_run}", f"--start={prompt}", "--temperature=0",
                               "--max_new_tokens=40", "--device=cpu"])
    sample = capsys.readouterr().out.removeprefix(prompt).split("\n---------------\n")[0]
    assert len(sample) == 40  # char tokenizer: a token a character

    forwards = []
    hook = lm.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        (text,) = lm.generate_until([request("generate_until", prompt, {"max_gen_toks": 40})], disable_tqdm=True)
        assert text == sample and len(forwards) == 40
        stop = sample[12:14]
        forwards.clear()
        (text,) = lm.generate_until([request("generate_until", prompt, {"until": [stop], "max_gen_toks": 40})],
                                    disable_tqdm=True)
    finally:
        hook.remove()
    assert text == sample[:sample.index(stop)]
    assert len(forwards) == sample.index(stop) + len(stop)  # one token a forward (KV cache), none after the stop


def test_generation_settings_are_checked():
    until, settings = generation_settings({"until": "\n\n", "max_gen_toks": 5, "do_sample": True, "top_k": 4})
    assert until == ["\n\n"] and settings == {"max_new_tokens": 5, "temperature": 1.0, "top_k": 4, "top_p": None}
    assert generation_settings({"temperature": 0.7})[1]["temperature"] == 0.0  # greedy unless do_sample
    with pytest.raises(UserError, match="generation setting.s. num_beams are not supported by the nanopalm model"):
        generation_settings({"num_beams": 4})
    with pytest.raises(UserError, match="max_gen_toks=0 must be a positive integer"):
        generation_settings({"max_gen_toks": 0})


def test_the_shakespeare_tasks_come_from_the_val_scenes_and_are_reproducible(tmp_path):
    write_tasks(tmp_path / "a", docs=5)
    write_tasks(tmp_path / "b", docs=5)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 6 and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
                                   for f in files if f.endswith(".jsonl"))
    val = "".join(split_passages(load_passages())[1])

    def docs(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / "a" / f"{name}.test.jsonl").read_text().splitlines()]

    for doc in docs(NEXT_LINE):
        lines = [doc["context"] + choice + "\n" in val for choice in doc["choices"]]
        assert len(doc["choices"]) == 4 and lines == [i == doc["label"] for i in range(4)]  # one true next line
    for doc in docs(SPEAKER):
        assert doc["context"] + doc["speaker"] + ":\n" in val


@pytest.mark.slow
def test_the_harness_cli_runs_the_nanopalm_model(eval_run, tmp_path):
    """`python -m nanopalm.harness run ...`: lm-eval's own command line, every flag of `lm-eval run`."""
    names = write_tasks(tmp_path / "tasks", docs=3)
    command = [sys.executable, "-m", "nanopalm.harness", "run", "--model", "nanopalm", "--model_args",
               f"run={eval_run}", "--device", "cpu", "--batch_size", "4", "--tasks", names[0],
               "--include_path", str(tmp_path / "tasks")]
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"|{NEXT_LINE}|" in result.stdout.replace(" ", "") and "acc_norm" in result.stdout
