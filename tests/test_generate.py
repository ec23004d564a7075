"""Generation: the KV cache changes nothing but speed; stopping, seeding, long prompts, sample.py."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, load_script

from nanopalm.errors import UserError
from nanopalm.model import PaLM, PaLMConfig
from nanopalm.sampling import generate


def load_sample_script():
    """sample.py is a script at the repository root, not part of the package: import it by path."""
    return load_script("sample.py")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Ops this small run faster on one thread, and a busy machine cannot stall a second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(**overrides) -> PaLM:
    # Untied: a random model with tied N(0, 1) embeddings greedily repeats its last token forever,
    # which would make "the same tokens with and without the cache" a weak test.
    base = dict(vocab_size=48, block_size=16, n_layer=2, n_head=4, d_model=32, d_ff=64, tie_embeddings=False)
    torch.manual_seed(0)
    return PaLM(PaLMConfig(**{**base, **overrides})).eval()


def prompt(batch: int, length: int, vocab: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("parallel_block", [True, False])
@pytest.mark.parametrize("n_kv_head", [1, 2, 4], ids=["mqa", "gqa", "mha"])
def test_cached_greedy_tokens_equal_uncached(n_kv_head, parallel_block):
    model = tiny_model(n_kv_head=n_kv_head, parallel_block=parallel_block)
    idx = prompt(2, 5)
    # 40 new tokens in a 16-token window: the window jumps (and the cache is rebuilt) several times.
    cached = generate(model, idx, 40, temperature=0.0, use_cache=True)
    uncached = generate(model, idx, 40, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 45)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 5:].tolist())) > 3  # a real continuation, not one token repeated


def test_cached_equals_uncached_with_learned_positions_and_gpt2_blocks():
    model = tiny_model(n_kv_head=4, parallel_block=False, pos_emb="learned", mlp="gelu", bias=True)
    idx = prompt(1, 7)
    assert torch.equal(generate(model, idx, 30, temperature=0.0), generate(model, idx, 30, 0.0, use_cache=False))


def test_cache_fed_in_chunks_gives_the_full_forward_logits():
    model = tiny_model()
    idx = prompt(2, 12)
    full = model(idx).logits
    model.setup_cache(2)
    first = model(idx[:, :5]).logits
    rest = model(idx[:, 5:], pos=5).logits  # several new tokens after cached ones: the offset causal mask
    model.clear_cache()
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)


def test_each_layer_owns_a_preallocated_cache_with_one_kv_head():
    mqa, mha = tiny_model(n_kv_head=1), tiny_model(n_kv_head=4)
    mqa.setup_cache(3)
    caches = [block.attn.cache for block in mqa.blocks]
    assert len({id(c) for c in caches}) == 2 and all(c.k.shape == (3, 1, 16, 8) for c in caches)
    assert caches[0].k.dtype == torch.float32
    cache_bytes = sum(c.k.nbytes + c.v.nbytes for c in caches)
    assert cache_bytes == mqa.config.kv_cache_bytes(3) == 2 * 2 * 3 * 1 * 16 * 8 * 4  # K, V, layers, ..., fp32
    assert mha.config.kv_cache_bytes(3) == 4 * cache_bytes  # n_head times larger without multi-query
    mqa.to(torch.bfloat16).setup_cache(1)
    assert mqa.blocks[0].attn.cache.k.dtype == torch.bfloat16
    mqa.clear_cache()
    assert all(block.attn.cache is None for block in mqa.blocks)


def test_bfloat16_generation_runs_with_a_bfloat16_cache():
    model = tiny_model().to(torch.bfloat16)
    out = generate(model, prompt(1, 4), 6, temperature=0.0)
    assert out.shape == (1, 10)


def test_stops_at_max_new_tokens():
    model = tiny_model()
    calls = []
    out = generate(model, prompt(2, 3), 7, temperature=1.0, on_token=calls.append)
    assert out.shape == (2, 10) and len(calls) == 7
    assert torch.equal(torch.stack(calls, dim=1), out[:, 3:])


def test_stops_at_end_of_document():
    model = tiny_model()
    idx = prompt(2, 4)
    free = generate(model, idx, 20, temperature=0.0)[:, 4:]
    # Declare as end-of-document a token that row 0 first produces at step 5 (and row 1 maybe never).
    step = next(i for i in range(5, 20) if free[0, i] not in free[0, :i])
    eot = int(free[0, step])
    out = generate(model, idx, 20, temperature=0.0, eot_id=eot)[:, 4:]
    ends = [row.tolist().index(eot) if eot in row.tolist() else 19 for row in free]
    assert out.shape[1] == max(ends) + 1  # generation stops once every row has ended
    for row, end in enumerate(ends):
        assert torch.equal(out[row, :end + 1], free[row, :end + 1])
        assert (out[row, end + 1:] == eot).all()  # a finished row is padded with end-of-document
    single = generate(model, idx[:1], 20, temperature=0.0, eot_id=eot)
    assert single.shape[1] == 4 + step + 1 and single[0, -1] == eot


def test_same_seed_same_tokens_other_seed_other_tokens():
    model = tiny_model()

    def run(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return generate(model, prompt(1, 3), 25, temperature=1.0, top_k=20, top_p=0.95, generator=gen)[0].tolist()

    assert run(5) == run(5)
    assert run(5) != run(6)


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_prompt_longer_than_the_context_is_cropped_to_its_last_block(pos_emb):
    model = tiny_model(pos_emb=pos_emb)
    long = prompt(1, 3 * 16 + 5)
    out = generate(model, long, 10, temperature=0.0)
    assert out.shape == (1, 63) and torch.equal(out[:, :53], long)  # the whole prompt is kept in the output
    cropped = generate(model, long[:, -16:], 10, temperature=0.0)
    assert torch.equal(out[:, 53:], cropped[:, 16:])  # the model saw exactly the last 16 tokens
    assert torch.equal(out, generate(model, long, 10, temperature=0.0, use_cache=False))


def test_bad_generate_arguments_are_user_errors():
    model = tiny_model()
    with pytest.raises(UserError, match="max_new_tokens=0 must be positive"):
        generate(model, prompt(1, 3), 0)
    with pytest.raises(UserError, match="prompt is empty"):
        generate(model, prompt(1, 0), 5)
    with pytest.raises(UserError, match="top_p=2.0"):
        generate(model, prompt(1, 3), 5, top_p=2.0)


# ---- sample.py ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained-looking run: one checkpoint and the char tokenizer it was made with."""
    from nanopalm.checkpoint import write_checkpoint
    from nanopalm.tokenizer import CharTokenizer

    run = tmp_path_factory.mktemp("run")
    tok = CharTokenizer.from_texts(["Once upon a time there was a cat é 🙂\n"])
    model = tiny_model(vocab_size=tok.vocab_size)
    write_checkpoint(run, 1, model.state_dict(), {}, {"config": model.config.to_dict(), "val_loss": 1.0}, keep_last=1)
    tok.save(run)
    return run


def naive_greedy(model: PaLM, ids: list[int], new_tokens: int, eot_id: int) -> list[int]:
    """Greedy decoding the slowest, plainest way: the whole sequence through the model for every token (no
    cache, no window: the test's prompt and continuation fit in block_size), up to end-of-document."""
    ids = list(ids)
    for _ in range(new_tokens):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        if ids[-1] == eot_id:
            break
    return ids


def test_sample_streams_the_greedy_text_of_a_plain_reference_loop(run_dir, capsys):
    sample = load_sample_script()
    from nanopalm.checkpoint import load_model
    from nanopalm.tokenizer import load_tokenizer

    model, _ = load_model(run_dir, "cpu")
    tok = load_tokenizer(run_dir)
    expected = tok.decode(naive_greedy(model, tok.encode("Once 🙂"), 10, tok.eot_id)) + sample.SEPARATOR
    args = [f"--out_dir={run_dir}", "--start=Once 🙂", "--max_new_tokens=10", "--device=cpu", "--temperature=0"]
    for flags in ([], ["--no_cache"]):
        sample.main(args + flags)
        out = capsys.readouterr()
        assert out.out == expected
    assert "KV cache (unused: --no_cache): 2,048 bytes a sequence" in out.err  # 2 layers x 1 x 16 x 8 x K,V x fp32


def test_sample_draws_seeded_samples_one_after_the_other(run_dir, capsys):
    sample = load_sample_script()
    args = [f"--out_dir={run_dir}", "--start=Once 🙂", "--max_new_tokens=30", "--device=cpu", "--top_p=0.9"]
    sample.main(args + ["--seed=7", "--num_samples=2"])
    two = capsys.readouterr().out
    first, second, rest = two.split(sample.SEPARATOR)
    assert rest == "" and first.startswith("Once 🙂") and second.startswith("Once 🙂") and first != second
    sample.main(args + ["--seed=7"])
    assert capsys.readouterr().out == first + sample.SEPARATOR  # the same seed, the same first sample
    sample.main(args + ["--seed=8"])
    assert capsys.readouterr().out != first + sample.SEPARATOR


def test_sample_reads_the_prompt_from_a_file(run_dir, tmp_path, capsys):
    sample = load_sample_script()

    (tmp_path / "p.txt").write_text("a cat", encoding="utf-8")
    sample.main([f"--out_dir={run_dir}", f"--start=FILE:{tmp_path / 'p.txt'}", "--max_new_tokens=3", "--device=cpu"])
    assert capsys.readouterr().out.startswith("a cat")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--start="], "the prompt is empty"),
        (["--start=FILE:/no/such/prompt.txt"], "cannot read the prompt file /no/such/prompt.txt"),
        (["--max_new_tokens=0"], "--max_new_tokens=0 must be a positive integer"),
        (["--top_k=0"], "top_k=0 must be a positive integer"),
        (["--temperature=-1"], "temperature=-1.0 must be >= 0"),
        (["--num_samples=0"], "--num_samples=0 must be a positive integer"),
    ],
)
def test_sample_bad_flags_are_user_errors(run_dir, flags, message):
    sample = load_sample_script()

    with pytest.raises(UserError, match=message):
        sample.main([f"--out_dir={run_dir}", "--device=cpu"] + flags)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--out_dir=/no/such/run"], "error: --out_dir=/no/such/run does not exist"),
        (["--top_p=1.5"], r"error: top_p=1.5 must be in (0, 1]"),
    ],
)
def test_sample_cli_errors_are_one_line_and_exit_2(run_dir, flags, message):
    cmd = [sys.executable, "sample.py", f"--out_dir={run_dir}", "--device=cpu"] + flags
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message) and "Traceback" not in result.stderr


class PaddingLovingModel(torch.nn.Module):
    """Logits that put the most weight on ids 77-79: the padding a model's vocabulary (80) has beyond its
    tokenizer's (77), as GPT-2's 50304 has beyond 50257. A trained model gives such ids little but nonzero mass."""

    config = SimpleNamespace(block_size=16)

    def forward(self, idx, pos=0, last_only=False):
        logits = torch.arange(80.0).repeat(idx.shape[0], idx.shape[1], 1)  # id 79 the likeliest, then 78, ...
        return SimpleNamespace(logits=logits)

    def setup_cache(self, *args):
        pass

    def clear_cache(self):
        pass


def test_generation_never_samples_an_id_the_tokenizer_cannot_decode():
    model, prompt = PaddingLovingModel(), torch.zeros(4, 1, dtype=torch.long)
    greedy = generate(model, prompt, 5, temperature=0.0, vocab_size=77)
    assert greedy[:, 1:].eq(76).all()  # the likeliest id the tokenizer has
    sampled = generate(model, prompt, 50, temperature=1.0, generator=torch.Generator().manual_seed(0), vocab_size=77)
    assert sampled.max() < 77 and sampled[:, 1:].unique().numel() > 3
    assert generate(model, prompt, 5, temperature=0.0)[:, 1:].eq(79).all()  # what it did before (no vocab_size)
