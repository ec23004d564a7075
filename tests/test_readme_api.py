"""README.md's "From Python" snippets, run exactly as written (on a tiny run in place of out-shakespeare)."""

import math
import re

import pytest
from conftest import REPO, load_script

from nanopalm.evaluate import read_texts


def readme_snippets() -> list[str]:
    section = (REPO / "README.md").read_text().split("## From Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_shows_two_python_snippets():
    assert len(readme_snippets()) == 2


def test_the_generation_snippet_prints_what_sample_py_streams(eval_run, capsys):
    """The same seed and settings as `sample.py --start=ROMEO: --seed=1337 --max_new_tokens=100 --temperature=0.8
    --top_k=200`, which streams the same tokens: the same text."""
    generation = readme_snippets()[0]
    exec(generation.replace('"out-shakespeare"', repr(str(eval_run))), {})
    snippet = capsys.readouterr().out
    load_script("sample.py").main([f"--out_dir={eval_run}", "--start=ROMEO:", "--seed=1337", "--max_new_tokens=100",
                                   "--temperature=0.8", "--top_k=200", "--device=cpu", "--num_samples=1"])
    streamed = capsys.readouterr().out
    assert snippet.startswith("ROMEO:") and len(snippet) > len("ROMEO:\n")
    assert streamed.startswith(snippet.rstrip("\n")), (snippet, streamed)


def test_the_scoring_snippet_prints_the_loss_and_bits_per_byte(eval_run, tmp_path, capsys):
    scoring = readme_snippets()[1]
    namespace: dict = {}
    exec(scoring.replace('"out-shakespeare"', repr(str(eval_run))), namespace)
    loss, bpb = map(float, capsys.readouterr().out.splitlines()[-1].split())
    text = "To be, or not to be, that is the question:\n"
    assert namespace["result"]["tokens"] == len(text)  # the char tokenizer: one token a character
    assert bpb == pytest.approx(loss * len(text) / math.log(2) / len(text.encode()))
    (tmp_path / "hamlet.txt").write_text(text)  # the same as eval.py's reading of a file
    assert read_texts([str(tmp_path / "hamlet.txt")]) == {str(tmp_path / "hamlet.txt"): text}
