"""Hugging Face interop (nanopalm/hf.py, nanopalm/convert.py export and import): transformers' own
CohereForCausalLM reproduces nanoPALM's logits and greedy text, its tokenizer nanoPALM's ids, the harness's own
`hf` model our adapter's log-likelihoods and accuracy; import brings a transformers model in, and a round trip
gives the weights back bitwise. Offline: every model and tokenizer is built here."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, load_script
from safetensors import safe_open

from nanopalm import convert, hf
from nanopalm.checkpoint import find_checkpoint, load_model_and_tokenizer, read_weights
from nanopalm.config import build_config, model_config
from nanopalm.errors import UserError, run_cli
from nanopalm.model import PaLM, PaLMConfig
from nanopalm.sampling import generate
from nanopalm.shakespeare import load_passages, prepare, split_passages
from nanopalm.tokenizer import Gpt2Tokenizer, load_tokenizer
from nanopalm.trainer import train

transformers = pytest.importorskip("transformers")
TOLERANCE = 1e-4  # max |logit difference|, fp32; measured 2e-6 to 2e-5 (docs/HF.md)
HARD_STRINGS = ["12345 + 0.0625 = 3.14159", "a   b\t\tc\n\n\n   d  ", "emoji 🙂👍🏽 and CJK 日本語の文章",
                "byte fallback: ʤ ᚠ 𝔘 ﷺ", "SentencePiece's own space: ▁▁x ▁", "<|endoftext|></s><unk> <pad>",
                "", " ", "\n"]


@pytest.fixture(scope="module")
def palm_data(tmp_path_factory) -> Path:
    """The built-in corpus with the default run's tokenizer (SentencePiece, 8192 pieces)."""
    return prepare(tmp_path_factory.mktemp("palm_data"), tokenizer="palm")


@pytest.fixture(scope="module")
def palm_run(palm_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "run"
    train(build_config({**TINY_RUN, "vocab_size": 8192, "block_size": 64, "n_head": 4, "head_dim": 8,
                        "dataset": str(palm_data), "out_dir": str(out), "max_iters": 30, "eval_interval": 30}))
    return out


@pytest.fixture(scope="module")
def exported(palm_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    assert run_cli(convert.main, ["export", str(palm_run), str(out)]) == 0
    return out


def cohere_twin(model: PaLM, logit_scale: float | None = None):
    """transformers' CohereForCausalLM holding `model`'s weights, mapped by hf.to_cohere."""
    c = model.config
    config = hf.cohere_config(c, eot_id=1, dtype="float32")
    if logit_scale is not None:
        config["logit_scale"] = logit_scale
    twin = transformers.CohereForCausalLM(transformers.CohereConfig(**config)).eval()
    state = {n: t for name, w in model.state_dict().items() for n, t in hf.to_cohere(name, w, c)}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: transformers ties it to the embedding
    return twin


def max_logit_difference(model: PaLM, twin, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(tokens).logits - twin(tokens).logits).abs().max().item()


SHAPES = {"default run": {}, "multi-query": {"n_kv_head": 1}, "grouped": {"n_kv_head": 2},
          "multi-head": {"n_kv_head": 4}, "head_dim != d_model / n_head": {"head_dim": 48},
          "no logit scaling": {"logit_scale": False}, "untied": {"tie_embeddings": False},
          "rope_base 500": {"rope_base": 500.0}}


@pytest.mark.parametrize("shape", SHAPES)
def test_cohere_reproduces_the_logits_of_every_shape(shape):
    base = model_config("shakespeare") if shape == "default run" else \
        PaLMConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, d_model=128)
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(**{**base.to_dict(), **SHAPES[shape]})).eval()
    tokens = torch.randint(base.vocab_size, (2, 64))
    assert max_logit_difference(model, cohere_twin(model), tokens) <= TOLERANCE


@pytest.mark.parametrize("left_out", ["the rope reordering", "the logit scale"])
def test_leaving_out_a_step_of_the_mapping_breaks_the_parity(left_out, monkeypatch):
    """Negative controls: the parity test sees each of the two non-obvious steps of the mapping."""
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, d_model=128)).eval()
    if left_out == "the rope reordering":
        monkeypatch.setattr(hf, "rope_order", torch.arange)
    twin = cohere_twin(model, logit_scale=1.0 if left_out == "the logit scale" else None)
    assert max_logit_difference(model, twin, torch.randint(512, (2, 64))) > 0.1


def test_an_export_loads_in_transformers_and_gives_the_runs_logits_and_greedy_text(palm_run, exported):
    files = {p.name for p in exported.iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "README.md", convert.MANIFEST}
    twin = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()  # no trust_remote_code
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    model, tokenizer, _ = load_model_and_tokenizer(palm_run)
    tokens = torch.tensor([tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 3)[:64]])
    assert max_logit_difference(model, twin, tokens) <= TOLERANCE
    prompt = hf_tokenizer("JULIET:\n", return_tensors="pt").input_ids
    assert prompt.tolist() == [tokenizer.encode("JULIET:\n")]
    with torch.no_grad():
        theirs = twin.generate(prompt, max_new_tokens=32, do_sample=False)[0, prompt.shape[1]:]
        ours = generate(model, prompt, 32, temperature=0.0)[0, prompt.shape[1]:]
    assert len(ours) == 32 and ours.tolist() == theirs.tolist()
    card = (exported / "README.md").read_text()
    assert f"`python -m nanopalm.convert export {palm_run} {exported}`" in card
    assert f"| parameters | {model.num_params():,} |" in card


def tokenizer_files(tokenizer, directory: Path):
    hf.save_hf_tokenizer(hf.hf_tokenizer(tokenizer), tokenizer.eot_id, directory, 2048)
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("name", ["palm", "gpt2"])
def test_the_exported_tokenizer_gives_the_same_ids_on_the_val_split_and_hard_strings(name, palm_data, tmp_path):
    tokenizer = load_tokenizer(palm_data) if name == "palm" else Gpt2Tokenizer()
    theirs = tokenizer_files(tokenizer, tmp_path)
    val = split_passages(load_passages())[1]  # the whole val split, as prepare cuts it
    texts = val + HARD_STRINGS
    expected = tokenizer.encode_batch(texts)
    got = theirs(texts, add_special_tokens=False).input_ids
    mismatched = [t[:60] for t, a, b in zip(texts, expected, got, strict=True) if a != b]
    assert not mismatched and sum(map(len, got)) > 100_000
    for text, ids in zip(HARD_STRINGS, expected[len(val):], strict=True):
        assert theirs.decode(ids) == tokenizer.decode(ids) == text
    assert theirs.decode([tokenizer.eot_id]) == tokenizer.decode([tokenizer.eot_id]) == "<|endoftext|>"


def test_the_char_tokenizer_is_refused_at_export(char_dataset):
    with pytest.raises(UserError, match="the char tokenizer has no Hugging Face equivalent"):
        hf.hf_tokenizer(load_tokenizer(char_dataset))


def test_the_harness_hf_model_scores_the_export_as_our_adapter_scores_the_run(palm_run, exported, tmp_path,
                                                                              monkeypatch):
    import lm_eval.evaluator
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from nanopalm.harness import NanoPalmLM
    from nanopalm.shakespeare_tasks import NEXT_LINE, write_tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    theirs = HFLM(pretrained=str(exported), device="cpu", dtype="float32", batch_size=4)
    ours = NanoPalmLM(run=str(palm_run), device="cpu", batch_size=4)
    pairs = [("ROMEO: But soft, what light", " through yonder window"), ("JULIET:", " O Romeo, Romeo!"),
             ("", "To be, or not to be"), ("HAMLET:\n", "Alas, poor Yorick!")]
    requests = [Instance("loglikelihood", {}, pair, 0) for pair in pairs]
    scores = [(ll, ours_ll) for (ll, _), (ours_ll, _) in zip(theirs.loglikelihood(requests, disable_tqdm=True),
                                                             ours.loglikelihood(requests, disable_tqdm=True),
                                                             strict=True)]
    assert all(abs(a - b) <= TOLERANCE for a, b in scores), scores
    names = write_tasks(tmp_path / "tasks", docs=40)
    accuracy = {}
    for who, lm in (("hf", theirs), ("nanopalm", ours)):
        results = lm_eval.evaluator.simple_evaluate(model=lm, tasks=[NEXT_LINE], limit=40,
                                                    task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
        accuracy[who] = {k: v for k, v in results["results"][NEXT_LINE].items() if k.startswith("acc")}
    assert accuracy["hf"] == accuracy["nanopalm"] and names


def test_import_brings_a_transformers_model_in(exported, tmp_path):
    """A random CohereForCausalLM as transformers builds and saves it (grouped attention, Command-R's logit
    scale 0.0625, head_dim from hidden_size), with the export's tokenizer: the imported run gives its logits."""
    config = transformers.CohereConfig(vocab_size=8192, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, logit_scale=0.0625,
                                       max_position_embeddings=64, eos_token_id=1, pad_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    source = tmp_path / "cohere"
    transformers.CohereForCausalLM(config).save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(exported / name, source / name)
    assert run_cli(convert.main, ["import", str(source), str(tmp_path / "run")]) == 0
    model, tokenizer, found = load_model_and_tokenizer(tmp_path / "run")
    twin = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    tokens = torch.tensor([tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks?")])
    assert max_logit_difference(model, twin, tokens) <= TOLERANCE
    assert (model.config.n_kv_head, model.config.head_dim, found.step) == (2, 16, 0)
    assert tokenizer.encode("JULIET: O Romeo!") == transformers.AutoTokenizer.from_pretrained(source)(
        "JULIET: O Romeo!", add_special_tokens=False).input_ids


def test_a_round_trip_gives_the_weights_back_bitwise(palm_run, exported, tmp_path):
    assert run_cli(convert.main, ["import", str(exported), str(tmp_path / "back")]) == 0
    original, back = (read_weights(find_checkpoint(run, prefer_best=True)) for run in (palm_run, tmp_path / "back"))
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    assert find_checkpoint(tmp_path / "back").config().model == dataclasses.replace(
        find_checkpoint(palm_run).config().model, z_loss=0.0, dropout=0.0)


def test_a_large_model_is_written_in_shards_with_transformers_index(palm_run, tmp_path):
    out = tmp_path / "sharded"
    assert run_cli(convert.main, ["export", str(palm_run), str(out), "--max_shard_gib=0.0005"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    twin = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    model, tokenizer, _ = load_model_and_tokenizer(palm_run)
    assert max_logit_difference(model, twin, torch.tensor([tokenizer.encode("ROMEO: what light")])) <= TOLERANCE


def test_an_untied_run_exports_with_a_warning_for_vllm_and_llama_cpp(palm_data, tiny_run, tmp_path, capsys):
    run = tiny_run("untied", dataset=str(palm_data), vocab_size=8192, tie_embeddings=False, max_iters=1,
                   eval_interval=1)
    train(run)
    capsys.readouterr()
    assert run_cli(convert.main, ["export", run.train.out_dir, str(tmp_path / "hf")]) == 0
    assert "does not tie its embeddings: transformers reads its lm_head, but vLLM's and llama.cpp's" in \
        capsys.readouterr().err
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" in weights.keys()  # transformers reads it (tie_word_embeddings false)


def one_line_refusal(argv: list[str], capsys, main=convert.main) -> str:
    assert run_cli(main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(palm_run, exported, tmp_path, tiny_run, capsys):
    out = tmp_path / "out"
    assert "no checkpoint in" in one_line_refusal(["export", str(tmp_path), str(out)], capsys)
    gpt2_run = tiny_run("gpt2", parallel_block=False, mlp="gelu", pos_emb="learned", max_iters=1, eval_interval=1)
    train(gpt2_run)
    assert "parallel_block=False has no equivalent" in one_line_refusal(
        ["export", gpt2_run.train.out_dir, str(out)], capsys)
    assert "exists: give a new directory, or --force" in one_line_refusal(["export", str(palm_run), str(exported)],
                                                                            capsys)
    qk_norm = tmp_path / "qk_norm"
    shutil.copytree(exported, qk_norm)
    config = json.loads((qk_norm / "config.json").read_text())
    (qk_norm / "config.json").write_text(json.dumps({**config, "use_qk_norm": True}))
    assert "use_qk_norm=True is not representable in nanoPALM" in one_line_refusal(
        ["import", str(qk_norm), str(out)], capsys)
    truncated = tmp_path / "truncated"
    shutil.copytree(exported, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "cannot read" in one_line_refusal(["import", str(truncated), str(out)], capsys)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    imported = tmp_path / "imported"
    assert run_cli(convert.main, ["import", str(exported), str(imported)]) == 0
    capsys.readouterr()
    assert "was imported by python -m nanopalm.convert: there is no run to resume" in one_line_refusal(
        ["--resume", f"--out_dir={imported}"], capsys, load_script("train.py").main)


def test_a_lora_runs_adapters_load_in_peft_on_the_export_of_its_base(palm_run, exported, tmp_path):
    """export_adapter writes peft's format; peft puts it on the exported base and gives the LoRA run's logits
    (the adapters trained, B nonzero, q and k included, whose rows follow the base's RoPE reordering)."""
    peft = pytest.importorskip("peft")
    lora = tmp_path / "lora"
    train(build_config({**json.loads((palm_run / "config.json").read_text()), "out_dir": str(lora),
                        "init_from": str(palm_run), "lora_rank": 4, "lora_alpha": 8.0, "max_iters": 10,
                        "eval_interval": 10, "learning_rate": 1e-2, "resume": False}))
    adapter = tmp_path / "adapter"
    assert run_cli(convert.main, ["export_adapter", str(lora), str(adapter)]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(exported)
    adapted = peft.PeftModel.from_pretrained(base, adapter).eval()
    ours, _, _ = load_model_and_tokenizer(lora)  # merged on loading: equal to the unmerged (tests/test_lora.py)
    tokens = torch.randint(0, 8192, (2, 64))
    with torch.no_grad():
        assert (adapted(tokens).logits - ours(tokens).logits).abs().max() <= TOLERANCE
        with adapted.disable_adapter():  # the base alone: the adapters matter
            assert (adapted(tokens).logits - ours(tokens).logits).abs().max() > 10 * TOLERANCE
