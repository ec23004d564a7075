"""Every command line in README.md and docs/*.md still works as written: a documented command cannot break silently.

Each command (in a code block or in `inline code`, `&&`-chained parts apart) is checked one of three ways:
- RUN: run as written, in a fresh copy of this checkout, in the order of a user's session, with flags appended
  that make it tiny (a 1-layer model, 2 steps); the documented flags come first, so each is exercised;
- parsed: what cannot run here (a GPU, 8 ranks, the Hub, a long benchmark) has its flags parsed by its own
  script's parser, the code path that would reject a renamed or mistyped flag;
- NOT_CHECKED: the few that neither fits, each with its reason (installs, the suite itself, a GPU script).
A command in the docs that none of these knows fails the test: add it to one of them.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, load_script

from nanopalm import convert
from nanopalm.config import help_text, parse_args
from nanopalm.shakespeare import load_passages
from nanopalm.tools import ablate, recipes

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
STARTS = ("python ", "torchrun ", "pip ", "scripts/", "bash ")
# Placeholders the docs use for "your run", "your data", ...: what they stand for in the check.
PLACEHOLDERS = {"RUN": "out-shakespeare", "DATA": "shakespeare", "OUT": "out-finetune", "PRESET": "palm_8b",
                "N": "8", "GiB": "80", "<name>": "book", "OUTDIR": "gpu-results", "FILE": "book.txt"}
TINY_MODEL = ["--n_layer=1", "--d_model=32", "--n_head=2", "--head_dim=16"]
TINY_TRAINING = ["--batch_size=2", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--sample_tokens=8",
                 "--full_val_tokens=0", "--max_minutes=0"]
TINY_BENCH = ["--preset", "tiny", "--steps", "1", "--repeats", "1", "--warmup", "0"]
# (documented command with its placeholders filled, flags appended), in the order a user would run them.
RUN = [
    ("python data/shakespeare/prepare.py", []),
    ("python train.py", TINY_MODEL + TINY_TRAINING),
    ("python -m nanopalm.convert export out-shakespeare hf-shakespeare", []),
    ("python scripts/hf_check.py --out_dir=out-shakespeare", []),
    ("python -m nanopalm.convert import hf-shakespeare out-imported", []),
    ("python sample.py --out_dir=out-imported", ["--max_new_tokens=8"]),
    ("python data/text/prepare.py --data_files=book.txt --tokenizer_from=out-imported --out_dir=data/imported", []),
    ("python train.py --init_from=out-imported --dataset=imported --out_dir=out-finetune-imported --dropout=0.1 "
     "--learning_rate=3e-5", TINY_TRAINING),
    ("python train.py --init_from=out-imported --dataset=imported --out_dir=out-lora-imported --lora_rank=8 "
     "--learning_rate=1e-3", TINY_TRAINING),
    ("python train.py --help", []),
    ("python sample.py", ["--max_new_tokens=8"]),
    ("python train.py --resume --out_dir=out-shakespeare", ["--max_iters=3"]),
    ("python train.py --init_from=out-shakespeare --dataset=shakespeare --out_dir=out-finetune --dropout=0.1 "
     "--learning_rate=3e-5", TINY_TRAINING),
    ("python -m nanopalm.shakespeare_tasks data/speaker --instructions", []),
    ("python data/instruct/prepare.py --train_file=data/speaker/speaker.train.jsonl "
     "--val_file=data/speaker/speaker.val.jsonl --tokenizer_from=out-shakespeare --out_dir=data/speaker", []),
    ("python train.py finetune_speaker_lora", TINY_TRAINING),
    ("python sample.py --out_dir=out-speaker-lora --chat '--start=Who art thou?' --temperature=0",
     ["--max_new_tokens=8"]),
    ("python eval.py --out_dir=out-speaker-lora --instructions=data/speaker/speaker.val.jsonl", []),
    ("python -m nanopalm.convert merge out-speaker-lora out-speaker-merged", []),
    ("python eval.py", []),
    ("python eval.py --out_dir=out-shakespeare", []),
    ("python eval.py --out_dir=out-shakespeare --stride=128", []),
    ("python -m nanopalm.shakespeare_tasks tasks/ --docs 500", []),
    ("python eval.py --out_dir=out-shakespeare --tasks=shakespeare_next_line,shakespeare_speaker --include_path=tasks/",
     ["--limit", "2"]),
    ("python scripts/baselines.py", []),
    ("python data/text/prepare.py --data_files book.txt --out_dir data/book", []),
    ("python train.py --dataset=book", TINY_MODEL + TINY_TRAINING + ["--out_dir=out-book"]),
    ("python bench.py", TINY_BENCH),
    ("python bench.py --compare", TINY_BENCH),
    ("python bench.py generation --threads=1", ["--preset", "tiny", "--new_tokens", "2", "--repeats", "1",
                                                "--contexts", "8", "--block_size", "64"]),
    ("python bench.py logits", ["--vocab_sizes", "256", "--block_size", "64"]),
    ("python bench.py memory --preset=palm_8b --world_size=8 --gpu_memory=80", []),
    ("python -m nanopalm.tools.ablate --doc docs/ABLATIONS.md", ["--dry_run"]),
]
NOT_CHECKED = {
    "pip install": "installs packages; .ci/run installs them on a fresh machine",
    "pip download": "fetches llama.cpp's source (llama-cpp-python's sdist, minutes to build); docs/HF.md keeps the "
                    "output of the check it feeds",
    "python -m pytest": "the test suite itself",
    "scripts/gpu_check.sh": "needs CUDA (it runs tests/gpu/ and the GPU benchmarks)",
    "python scripts/mutation_check.py": "mutates the working tree in place, minutes (docs/RELIABILITY.md keeps its "
                                        "result)",
    "scripts/default_run.sh": "trains the default run, 10 minutes, in a fresh clone; docs/results/default_run*/ keep "
                              "its output",
    "scripts/finetune_speaker.sh": "trains two 8-minute finetunes (docs/FINETUNE.md keeps its logs); its commands are "
                                   "each checked here",
    "scripts/eval_shakespeare.sh": "runs the eval.py commands of docs/EVAL.md, each checked here; it rewrites "
                                   "docs/results/",
    "python -c": "calls tests/test_memory.py's own measured_and_estimated on its CASES, which that file tests",
    "python -m nanopalm.harness run": "hellaswag's data is on the Hub; tests/test_eval_harness.py runs this command "
                                      "line on local tasks",
}
# Names in prose, not commands to run as they stand: the module or file must exist.
MENTIONS = {"python -m nanopalm.plot": "nanopalm/plot.py", "python -m nanopalm.harness": "nanopalm/harness.py",
            "python -m nanopalm.convert consolidate": "nanopalm/convert.py", "python bench.py memory": "bench.py",
            "torchrun --standalone": "train.py", "scripts/fused_before_after.py": "scripts/fused_before_after.py",
            "scripts/hf_check.py": "scripts/hf_check.py",
            "python -m nanopalm.convert export_adapter": "nanopalm/convert.py"}


def documented_commands() -> list[tuple[str, str]]:
    """(file name, command) for every command line of the docs, comments cut, `&&`-parts apart."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        lines = []
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
            if lang != "python":
                lines += re.sub(r"\\\n\s*", " ", body).splitlines()  # a continued line is one command
        lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for line in lines:
            for part in re.sub(r"\s+#.*$", "", line.strip()).split(" && "):
                if part.startswith(STARTS):
                    found.append((doc.name, fill_placeholders(part)))
    return found


def fill_placeholders(command: str) -> str:
    command = re.sub(r"\s*\[[^\]]*\]", "", command)  # optional flags in brackets: the command without them
    def fill(word: str) -> str:  # a placeholder is a whole word, or a flag's value: --out_dir=RUN
        flag, eq, value = word.rpartition("=")
        return flag + eq + PLACEHOLDERS.get(value, value).replace("<name>", PLACEHOLDERS["<name>"])

    return shlex.join([fill(w) for w in shlex.split(command) if w != "..."])


def how_checked(command: str) -> str:
    if command in MENTIONS:
        return "mention"
    if command in {documented for documented, _ in RUN}:
        return "run"
    if any(command.startswith(prefix) for prefix in NOT_CHECKED):
        return "not checked"
    return "parse"


def parse_only(command: str, monkeypatch) -> None:
    """The command's flags through its own script's parser, stopping before any work."""
    words = shlex.split(command)
    if words[0] == "torchrun":
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        words = ["python", *words[script:]]
    script, args = (" ".join(words[1:3]), words[3:]) if words[1] == "-m" else (words[1], words[2:])
    if script == "train.py":
        help_text(args) if "--help" in args else parse_args(args)
    elif script in ("bench.py", "sample.py"):
        load_script(script).parse_args(args)
    elif script == "eval.py":
        module = load_script(script)
        module.check_args(module.parse_args(args))
    elif script.startswith("data/") and script.endswith("/prepare.py"):
        module = load_script(script)
        calls = []
        monkeypatch.setattr(module, "prepare", lambda *a, **k: calls.append(a))
        module.main(args)
        assert calls, command
    elif script == "-m nanopalm.convert":
        calls = []
        for name in ("consolidate", "export", "import_model", "merge", "export_adapter"):
            monkeypatch.setattr(convert, name, lambda *a: calls.append(a) or Path("run/checkpoints/step_1"))
        convert.main(args)
        assert calls, command
    elif script == "scripts/hf_check.py":
        module, calls = load_script(script), []
        monkeypatch.setattr(module, "check", lambda *a: calls.append(a))
        module.main(args)
        assert calls, command
    elif script == "-m nanopalm.tools.ablate":
        ablate.parse_args(args)
    elif script == "-m nanopalm.tools.recipes":
        recipes.parse_args(args)
    elif script == "tests/helpers/memory_of_ranks.py":
        assert (REPO / script).is_file()
    else:
        raise AssertionError(f"no parser known for {command!r}: run it in RUN, or say in NOT_CHECKED why not")


def test_every_documented_command_is_known_and_parses(monkeypatch, capsys):
    commands = documented_commands()
    assert len(commands) > 60 and ("README.md", "python train.py") in commands
    documented = {command for _, command in commands}
    stale = [command for command, _ in RUN if command not in documented]
    assert not stale, f"RUN has commands the docs no longer give: {stale}"
    for doc, command in commands:
        kind = how_checked(command)
        if kind == "mention":
            assert (REPO / MENTIONS[command]).is_file()
        elif kind == "parse":
            try:
                parse_only(command, monkeypatch)
            except BaseException as e:  # noqa: BLE001 (SystemExit too: a parser's exit is a finding)
                raise AssertionError(f"{doc}: `{command}` does not parse: {type(e).__name__}: {e}") from None
    capsys.readouterr()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A fresh copy of this checkout's files (tracked and new, not ignored): the commands run in it as a user runs
    them in a clone, writing out-*/ and data/ there, never into the working tree."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    root = tmp_path_factory.mktemp("checkout")
    for name in listed:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "book.txt").write_text("\n\n".join(load_passages()[:150]))  # DATA.md's book: a few plays
    return root


@pytest.mark.slow
def test_every_documented_command_that_can_run_here_runs(checkout):
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    for command, extra in RUN:
        argv = [sys.executable if w == "python" else w for w in shlex.split(command)] + extra
        result = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"`{command}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, result.stderr
    assert (checkout / "out-finetune" / "config.json").is_file() and (checkout / "out-book" / "config.json").is_file()
