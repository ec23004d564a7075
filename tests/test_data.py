import json
import re

import numpy as np
import pytest
import torch

import nanopalm.data as data
from nanopalm.data import (
    HEADER,
    BatchLoader,
    TokenFileWriter,
    load_meta,
    read_token_file,
    resolve_dataset,
    write_token_file,
)
from nanopalm.errors import UserError


@pytest.mark.parametrize(("vocab_size", "dtype"), [(8192, np.uint16), (65536, np.uint16), (256_000, np.uint32)])
def test_token_file_round_trip(tmp_path, vocab_size, dtype):
    tokens = np.array([0, 1, 7, vocab_size // 2, vocab_size - 1] * 3)
    path = tmp_path / "train.bin"
    write_token_file(path, tokens, vocab_size, "palm")
    read, header = read_token_file(path)
    assert read.dtype == dtype and np.array_equal(read, tokens)
    assert (header.vocab_size, header.num_tokens, header.tokenizer) == (vocab_size, 15, "palm")
    assert path.stat().st_size == 64 + 15 * np.dtype(dtype).itemsize
    assert path.read_bytes()[:8] == b"NPALMTOK"
    assert not (tmp_path / "train.bin.tmp").exists()


def _header(magic=b"NPALMTOK", version=1, itemsize=2, vocab=8192, count=4):
    return HEADER.pack(magic, version, itemsize, vocab, count, b"gpt2")


MALFORMED = {
    "raw nanoGPT file": (np.arange(100, dtype=np.uint16).tobytes(), "is not a nanoPALM token file"),
    "truncated header": (_header()[:20], "is truncated (20 bytes, shorter than its 64-byte header)"),
    "truncated tokens": (_header() + b"\0" * 6, "is truncated: its header promises 4 tokens (72 bytes) but the file"),
    "trailing bytes": (_header() + b"\0" * 10, "has trailing bytes"),
    "newer version": (_header(version=2) + b"\0" * 8, "has format version 2, this nanoPALM reads version 1"),
    "wrong width": (_header(itemsize=4) + b"\0" * 16, "corrupt header"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_token_files_give_one_clear_line(tmp_path, case):
    content, message = MALFORMED[case]
    path = tmp_path / "val.bin"
    path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(message)) as err:
        read_token_file(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_token_file(tmp_path):
    with pytest.raises(UserError, match="cannot read .*train.bin"):
        read_token_file(tmp_path / "train.bin")


def test_interrupted_writer_leaves_nothing(tmp_path):
    path = tmp_path / "train.bin"
    with pytest.raises(KeyboardInterrupt), TokenFileWriter(path, 10, 100, "char") as w:
        w.write(np.arange(5))
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="5 tokens written to a file sized for 10"), \
            TokenFileWriter(path, 10, 100, "char") as w:
        w.write(np.arange(5))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        write_token_file(path, [3, 100], 100, "char")
    assert list(tmp_path.iterdir()) == []


def make_dataset(directory, n=5000, vocab_size=8192):
    """A dataset whose tokens are their own positions, so every window is easy to check."""
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        write_token_file(directory / f"{split}.bin", np.arange(n) % vocab_size, vocab_size, "char")
    meta = {"tokenizer": "char", "vocab_size": vocab_size, "eot_id": vocab_size - 1, "bytes_per_token_val": 1.0,
            "train_tokens": n, "val_tokens": n}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def loader(directory, split="train", seed=0, batch_size=8, block_size=16, **kw):
    return BatchLoader(directory, split, batch_size, block_size, seed, "cpu", **kw)


def test_batches_are_windows_with_shifted_targets(tmp_path):
    d = make_dataset(tmp_path / "ds")
    bl = loader(d)
    x, y = bl.get_batch(step=3, micro_step=1)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # the next token
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # contiguous windows
    assert torch.equal(x[:, 0], torch.from_numpy(bl.offsets(3, 1).astype(np.int64)))
    assert int(x[:, 0].max()) <= 5000 - 17 and int(x[:, 0].min()) >= 0


def test_batch_is_a_pure_function_of_seed_split_step_micro_step(tmp_path):
    d = make_dataset(tmp_path / "ds")
    x, y = loader(d).get_batch(7, 2)
    again = loader(d)  # a fresh process after a resume knows nothing but the step
    again.get_batch(0, 0)
    x2, y2 = again.get_batch(7, 2)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    for other in (loader(d).get_batch(7, 3), loader(d).get_batch(8, 2), loader(d, seed=1).get_batch(7, 2),
                  loader(d, split="val").get_batch(7, 2)):
        assert not torch.equal(x, other[0])


def test_ranks_draw_different_rows_and_together_make_the_one_process_batch(tmp_path):
    d = make_dataset(tmp_path / "ds", n=100_000)
    world, accum = 2, 3
    one_process = [loader(d).get_batch(5, m)[0] for m in range(world * accum)]
    per_rank = {r: [loader(d).get_batch(5, local * world + r)[0] for local in range(accum)] for r in range(world)}
    assert not torch.equal(per_rank[0][0], per_rank[1][0])
    rows = lambda batches: sorted(map(tuple, torch.cat(batches).tolist()))  # noqa: E731
    assert rows(per_rank[0] + per_rank[1]) == rows(one_process)
    starts = [set(b[:, 0].tolist()) for b in per_rank[0] + per_rank[1]]
    assert sum(len(s) for s in starts) == len(set().union(*starts))  # disjoint samples across ranks


def test_smallest_split_and_model_vocabulary_checks(tmp_path):
    d = make_dataset(tmp_path / "ds", n=17)
    x, _ = loader(d, block_size=16).get_batch(0, 0)  # exactly one window: the whole split
    assert torch.equal(x, torch.arange(16).expand(8, 16))
    with pytest.raises(UserError, match="--block_size 17 needs 18 tokens but .*train.bin has 17"):
        loader(d, block_size=17)
    assert loader(d, model_vocab_size=8192 + 64).header.vocab_size == 8192  # a padded model vocabulary is fine
    with pytest.raises(UserError, match="8192-token vocabulary .* the model has 4096"):
        loader(d, model_vocab_size=4096)


def test_resolve_dataset_by_name_or_path(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_ROOT", tmp_path / "data")
    d = make_dataset(tmp_path / "data" / "tiny")
    assert resolve_dataset("tiny") == d
    assert resolve_dataset(str(d)) == d
    assert load_meta(d)["vocab_size"] == 8192
    with pytest.raises(UserError, match="no dataset 'nope'.*data/text/prepare.py"):
        resolve_dataset("nope")
    (d / "prepare.py").write_text("")
    (d / "meta.json").unlink()  # what an interrupted prepare leaves
    with pytest.raises(UserError, match=r"dataset 'tiny' is not prepared \(.*meta.json is missing\): run `python "):
        resolve_dataset("tiny")
    with pytest.raises(UserError, match="meta.json is missing"):
        load_meta(d)


def test_the_header_bytes_are_the_documented_layout(tmp_path):
    """docs/DATA.md: magic, version, bytes per token, vocabulary, token count, tokenizer name (64 bytes,
    little-endian), assembled here by hand."""
    write_token_file(tmp_path / "t.bin", [1, 2, 3], 8192, "char")
    expected = (b"NPALMTOK" + (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + (8192).to_bytes(8, "little")
                + (3).to_bytes(8, "little") + b"char" + bytes(28))
    assert (tmp_path / "t.bin").read_bytes() == expected + bytes([1, 0, 2, 0, 3, 0])


def test_the_batches_of_a_fixed_seed_are_pinned(tmp_path):
    """Raw Philox draws, stable across NumPy versions: a change in data order shows up here, not silently."""
    write_token_file(tmp_path / "train.bin", np.arange(100_000) % 77, 77, "char")
    loader = BatchLoader(tmp_path, "train", 4, 32, 1337, "cpu")
    assert loader.offsets(0, 0).tolist() == [58395, 32107, 70093, 96145]
    assert loader.offsets(7, 3).tolist() == [92328, 91985, 56840, 81489]
