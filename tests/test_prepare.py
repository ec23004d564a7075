import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before `datasets` is imported: everything here is local
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from conftest import REPO, load_script

import nanopalm.prepare as prepare_module  # noqa: E402
from nanopalm.data import load_meta, read_token_file, resolve_dataset  # noqa: E402
from nanopalm.errors import run_cli  # noqa: E402
from nanopalm.shakespeare import load_passages, prepare, scenes, split_passages  # noqa: E402
from nanopalm.tokenizer import load_tokenizer  # noqa: E402


def script_main(name: str):
    """`main` of data/<name>/prepare.py, to run the real command line in this process."""
    return load_script(f"data/{name}/prepare.py").main


def documents(data_dir: Path, split: str) -> list[str]:
    """The documents of a split, decoded back to text (they are separated by the end-of-document id)."""
    tokens, _ = read_token_file(data_dir / f"{split}.bin")
    tok = load_tokenizer(data_dir)
    ends = np.flatnonzero(tokens == tok.eot_id)
    assert ends[-1] == len(tokens) - 1  # every document, the last included, is followed by the separator
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


MARKDOWN = """# A Play

## ACT I

### SCENE I. A heath.

*Thunder. Enter three
Witches.*

**FIRST WITCH**$
When shall we three meet again$
In thunder, lightning, or in rain?\\--$

_Exit_

**SECOND WITCH**#
When the hurlyburly's done, __\\[Aside]_#
When the battle's lost and won.

### SCENE II. A camp.

**DUNCAN**$
What bloody man is that?
""".replace("$", "  ").replace("#\n", " \n")  # Markdown line breaks: trailing spaces


def test_scenes_keep_only_speakers_and_their_lines():
    assert scenes(MARKDOWN) == [
        "FIRST WITCH:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?--\n\n"
        "SECOND WITCH:\nWhen the hurlyburly's done,\nWhen the battle's lost and won.\n",
        "DUNCAN:\nWhat bloody man is that?\n",
    ]


def test_the_corpus_is_the_plays_as_plain_text():
    passages = load_passages()
    text = "".join(passages)
    assert len(passages) == 781 and 4_700_000 < len(text) < 4_900_000
    assert passages[0].startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    assert not set("*_#\\[]") & set(text)  # no Markdown left
    train, val = split_passages(passages)
    assert len(val) == 78 and len(train) == 703 and not set(train) & set(val)


def test_shakespeare_prepares_losslessly_and_without_overlap(tmp_path):
    out = prepare(tmp_path / "shakespeare")  # (its time is a benchmark's business, not a unit test's)
    meta = load_meta(out)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"], meta["dtype"]) == ("palm", 8192, 1, "uint16")
    train, val = split_passages(load_passages())
    assert documents(out, "train") == train and documents(out, "val") == val  # lossless, scene for scene
    assert (meta["train_documents"], meta["val_documents"]) == (703, 78)
    train_text = "".join(train)
    assert not any(passage in train_text for passage in val)  # held-out scenes appear nowhere in train
    val_tokens, header = read_token_file(out / "val.bin")
    assert meta["val_tokens"] == len(val_tokens) == header.num_tokens
    assert meta["val_bytes"] == sum(len(p.encode()) for p in val)
    assert meta["bytes_per_token_val"] == pytest.approx(meta["val_bytes"] / meta["val_tokens"])
    assert 3.0 < meta["bytes_per_token_val"] < 4.0


def test_shakespeare_command_line(tmp_path):
    out = tmp_path / "chars"
    assert run_cli(script_main("shakespeare"), ["--tokenizer=char", f"--out_dir={out}"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["bytes_per_token_val"] == pytest.approx(1.0, abs=1e-3)
    assert resolve_dataset(str(out)) == out

    bad = tmp_path / "bad"  # the real command, for its exit code and stderr
    done = subprocess.run([sys.executable, REPO / "data/shakespeare/prepare.py", "--tokenizer=gpt2",
                           "--vocab_size=100", f"--out_dir={bad}"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == "error: --vocab_size only applies to --tokenizer palm (gpt2 has a fixed vocabulary)\n"
    assert not bad.exists()


@pytest.fixture
def corpus(tmp_path):
    """60 small documents with unicode, digits and blank lines, as jsonl, parquet and text."""
    docs = [f"Document {i}: {'lorem ipsum ' * (i % 7 + 1)}\n\nnumber {i * 37}, café 🤗\n  indented line"
            for i in range(60)]
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    pq.write_table(pa.table({"content": docs}), src / "docs.parquet")
    (src / "book.txt").write_text("\n\n".join(docs[:20]) + "\n")
    return docs, src


def run_prepare(script: str, out: Path, *args: str) -> int:
    return run_cli(script_main(script), [*args, f"--out_dir={out}", f"--cache_dir={out.parent / 'hf'}"])


def test_openwebtext_pipeline_on_local_jsonl_with_workers(corpus, tmp_path):
    docs, src = corpus
    out = tmp_path / "owt"
    assert run_prepare("openwebtext", out, "--data_files", str(src / "docs.jsonl"), "--num_proc=2",
                       "--val_fraction=0.1") == 0
    meta = load_meta(out)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"]) == ("gpt2", 50257, 50256)
    train, val = documents(out, "train"), documents(out, "val")
    assert len(val) == 6 and sorted(train + val) == sorted(docs)  # every document once, in one split
    assert meta["val_tokens"] == read_token_file(out / "val.bin")[1].num_tokens
    assert meta["val_bytes"] == sum(len(d.encode()) for d in val)
    assert meta["bytes_per_token_val"] == pytest.approx(meta["val_bytes"] / meta["val_tokens"])


def test_text_pipeline_on_parquet_and_txt_and_tokenizer_reuse(corpus, tmp_path):
    docs, src = corpus
    chars = tmp_path / "chars"
    assert run_prepare("text", chars, "--data_files", str(src / "docs.parquet"), "--text_column=content",
                       "--tokenizer=char", "--num_proc=1") == 0
    assert sorted(documents(chars, "train") + documents(chars, "val")) == sorted(docs)

    palm = tmp_path / "palm"
    assert run_prepare("text", palm, "--data_files", str(src / "book.txt"), "--vocab_size=300") == 0
    assert load_meta(palm)["vocab_size"] == 300
    paragraphs = sorted(documents(palm, "train") + documents(palm, "val"))
    assert paragraphs == sorted(src.joinpath("book.txt").read_text().split("\n\n"))  # --sample_by paragraph

    reused = tmp_path / "reused"
    assert run_prepare("text", reused, "--data_files", str(src / "docs.jsonl"), f"--tokenizer_from={palm}") == 0
    assert (reused / "tokenizer.model").read_bytes() == (palm / "tokenizer.model").read_bytes()


@pytest.mark.parametrize(("args", "message"), [
    (["--data_files", "missing/*.jsonl"], "--data_files 'missing/*.jsonl' matches no file"),
    (["--data_files", "{src}/docs.parquet"], "the documents have no column 'text' (they have content)"),
    (["--data_files", "{src}/docs.jsonl", "--tokenizer=char", "--vocab_size=99"], "--vocab_size only applies"),
    (["--data_files", "{src}/docs.jsonl", "--val_fraction=1.5"], "--val_fraction must be between 0 and 1"),
    (["--data_files", "{src}/docs.jsonl", "--vocab_size=100000"], "--vocab_size 100000 is too large"),
    (["--data_files", "{src}/book.txt", "--sample_by=document"], "1 document(s) cannot be split"),
])
def test_user_mistakes_exit_2_and_write_nothing(corpus, tmp_path, capsys, args, message):
    _, src = corpus
    out = tmp_path / "out"
    assert run_prepare("text", out, *(a.format(src=src) for a in args)) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after datasets' progress bars
    assert err.startswith("error: ") and message in err
    assert not out.exists()


def test_an_interrupted_prepare_leaves_no_complete_looking_dataset(corpus, tmp_path, monkeypatch):
    docs, src = corpus
    out = tmp_path / "owt"
    assert run_prepare("openwebtext", out, "--data_files", str(src / "docs.jsonl")) == 0
    real_write = prepare_module.write_split

    def crash_on_val(tokenized, path, tokenizer):
        if path.name == "val.bin":
            raise KeyboardInterrupt
        return real_write(tokenized, path, tokenizer)

    monkeypatch.setattr(prepare_module, "write_split", crash_on_val)
    assert run_prepare("openwebtext", out, "--data_files", str(src / "docs.jsonl")) == 130  # as Ctrl-C exits
    assert not (out / "meta.json").exists() and not list(out.glob("*.tmp"))
    with pytest.raises(Exception, match="is not prepared"):
        resolve_dataset(str(out))
