"""Sampling filters keep exactly the right tokens; streamed text never breaks a character."""

import math

import pytest
import torch
from conftest import load_script

from nanopalm.errors import UserError
from nanopalm.sampling import check_sampling_args, filter_logits, sample_next_token
from nanopalm.streaming import REPLACEMENT_CHAR, TextStream

# A crafted distribution over 6 tokens, deliberately out of order: token -> probability.
PROBS = torch.tensor([0.05, 0.40, 0.02, 0.25, 0.20, 0.08])
LOGITS = PROBS.log()[None]


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


@pytest.mark.parametrize("k, expected", [(1, {1}), (2, {1, 3}), (3, {1, 3, 4}), (6, set(range(6))), (9, set(range(6)))])
def test_top_k_keeps_exactly_the_k_most_likely(k, expected):
    assert kept(filter_logits(LOGITS, top_k=k)) == expected


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0]])
    assert len(kept(filter_logits(logits, top_k=2))) == 2
    assert 1 in kept(filter_logits(logits, top_k=2))


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.30, {1}),  # 0.40 alone reaches 0.30
        (0.50, {1, 3}),  # 0.40 < 0.50 <= 0.65
        (0.70, {1, 3, 4}),  # 0.65 < 0.70 <= 0.85
        (0.90, {1, 3, 4, 5}),  # 0.85 < 0.90 <= 0.93
        (0.96, {0, 1, 3, 4, 5}),  # 0.93 < 0.96 <= 0.98
        (1.0, set(range(6))),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(filter_logits(LOGITS, top_p=p)) == expected


def test_top_p_applies_to_what_top_k_kept():
    # After top-k=2 the mass is renormalised: 0.40/0.65 = 0.615 and 0.25/0.65 = 0.385.
    assert kept(filter_logits(LOGITS, top_k=2, top_p=0.6)) == {1}
    assert kept(filter_logits(LOGITS, top_k=2, top_p=0.62)) == {1, 3}


def test_filtering_works_on_a_batch_row_by_row():
    logits = torch.stack([LOGITS[0], LOGITS[0].flip(0)])
    out = filter_logits(logits, top_k=2)
    assert kept(out[:1]) == {1, 3} and kept(out[1:]) == {4, 2}


def test_sampling_follows_the_filtered_distribution():
    gen = torch.Generator().manual_seed(0)
    draws = sample_next_token(LOGITS.expand(20000, -1), 1.0, top_p=0.7, generator=gen)
    counts = torch.bincount(draws, minlength=6).float() / len(draws)
    assert set(torch.nonzero(counts).flatten().tolist()) == {1, 3, 4}
    expected = torch.tensor([0, 0.40, 0, 0.25, 0.20, 0]) / 0.85
    torch.testing.assert_close(counts, expected, atol=0.02, rtol=0)


def test_temperature_zero_is_greedy_and_temperature_sharpens():
    assert sample_next_token(LOGITS, 0.0).tolist() == [1]
    gen = torch.Generator().manual_seed(0)
    cold = sample_next_token(LOGITS.expand(4000, -1), 0.1, generator=gen)
    assert (cold == 1).float().mean() > 0.97  # p^10 renormalised: 0.40 -> 0.99


def test_same_generator_seed_same_draws():
    def draw(seed: int) -> list[int]:
        return sample_next_token(LOGITS.expand(50, -1), 1.0, generator=torch.Generator().manual_seed(seed)).tolist()

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=0), "top_k=0 must be a positive integer"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
        (dict(temperature=math.nan), "temperature=nan must be >= 0"),
    ],
)
def test_bad_sampling_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        check_sampling_args(**kwargs)
    with pytest.raises(UserError, match=message):
        sample_next_token(LOGITS, **{"temperature": 1.0, **kwargs})


class ByteTokenizer:
    """One token per UTF-8 byte, like GPT-2's byte level before merges; 256 ends a document."""

    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        parts = [b"<|endoftext|>" if i == self.eot_id else bytes([i]) for i in ids]
        return b"".join(parts).decode("utf-8", errors="replace")


def stream_pieces(decode, ids: list[int]) -> list[str]:
    stream = TextStream(decode)
    return [stream.push([i]) for i in ids] + [stream.flush()]


def test_stream_never_splits_a_multibyte_character():
    tok = ByteTokenizer()
    text = "Once 🙂 upon é a 你好 time"
    pieces = stream_pieces(tok.decode, tok.encode(text))
    assert "".join(pieces) == text
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    emoji = text.index("🙂")
    assert pieces[emoji:emoji + 4] == ["", "", "", "🙂"]  # held back until its 4th byte arrives


def test_stream_flushes_an_unfinished_character_as_decode_does():
    tok = ByteTokenizer()
    ids = tok.encode("ab🙂")[:-1] + [tok.eot_id] + tok.encode("c")  # a cut emoji, then a new document
    pieces = stream_pieces(tok.decode, ids)
    assert "".join(pieces) == tok.decode(ids)
    truncated = tok.encode("x🙂")[:-2]
    assert "".join(stream_pieces(tok.decode, truncated)) == tok.decode(truncated) == "x" + REPLACEMENT_CHAR


def test_stream_with_the_gpt2_and_palm_tokenizers():
    from nanopalm.tokenizer import get_tokenizer

    text = "Hi 🙂 there, é and 你好!\nbye"
    palm = get_tokenizer("palm", texts=["the quick brown fox jumps over the lazy dog\n"] * 20, vocab_size=300)
    for tok in (get_tokenizer("gpt2"), palm):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        pieces = stream_pieces(tok.decode, ids)
        assert "".join(pieces) == text, tok.name
        assert not any(REPLACEMENT_CHAR in piece for piece in pieces), tok.name


def test_sample_py_says_when_the_prompt_is_cropped_to_the_window(eval_run, capsys):
    """A prompt longer than block_size (128 here) is cropped by generate() to its last 128 tokens: said, not silent;
    the whole prompt is still printed, and a prompt that fits gets no note."""
    sample = load_script("sample.py").main
    long_prompt = "ROMEO:\n" + "But, soft! what light through yonder window breaks?\n" * 6  # char tokens: 7 + 6 * 52
    sample([f"--out_dir={eval_run}", f"--start={long_prompt}", "--max_new_tokens=3", "--device=cpu"])
    out, err = capsys.readouterr()
    assert out.startswith(long_prompt)
    assert "note: the prompt is 319 tokens, longer than block_size=128: the model sees only its last 128 tokens" in err
    sample([f"--out_dir={eval_run}", "--start=ROMEO:", "--max_new_tokens=3", "--device=cpu"])
    assert "note:" not in capsys.readouterr().err
