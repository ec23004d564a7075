"""Bad input to the real command lines: one line `error: <problem>: <fix>` on stderr, exit code 2, no
traceback, and nothing written. One table across config, data, checkpoints and generation.

Most cases run `main(argv)` of train.py / sample.py / data/text/prepare.py in this process through
`run_cli` (what `python X.py` runs); the `subprocess=True` ones run the very command in a fresh
interpreter, two at a time, to show the same holds end to end (no traceback from anywhere).
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, load_script
from safetensors.torch import save_file

from nanopalm import checkpoint as ckpt
from nanopalm import convert
from nanopalm import distributed as D
from nanopalm.atomic import sha256
from nanopalm.config import build_config
from nanopalm.data import HEADER, SplitStats, write_meta, write_token_file
from nanopalm.errors import run_cli
from nanopalm.model import PaLM, PaLMConfig
from nanopalm.tokenizer import CharTokenizer
from nanopalm.trainer import Trainer

SCRIPTS = {"train": "train.py", "sample": "sample.py", "prepare": "data/text/prepare.py", "plot": "nanopalm/plot.py",
           "prepare_shakespeare": "data/shakespeare/prepare.py",
           "eval": "eval.py", "consolidate": "-m nanopalm.convert consolidate"}
READ_ONLY = "/sys/nanopalm_bad_input"  # sysfs refuses new directories, even to root
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True)
class Case:
    id: str
    cli: str  # a key of SCRIPTS
    args: tuple[str, ...]  # {name} is replaced by a path of the `world` fixture
    message: str  # the start of the problem and a piece of the fix, both in the one line
    subprocess: bool = False
    out: str = "{out}"  # train/prepare: the output directory that must stay as it was
    others_log: bool = False  # `datasets` logs its own complaint first: only the last line is ours
    slow: bool = False  # tens of seconds (the harness indexes its ~15k task files)


CASES = [
    # config and command line
    Case("unknown key", "train", ("--n_layers=2",), "unknown config key 'n_layers'; `python train.py --help`",
         subprocess=True),
    Case("wrong type", "train", ("--batch_size=eight",), "batch_size expects int, got 'eight'"),
    Case("zero size", "train", ("--n_layer=0",), "n_layer=0 must be a positive integer"),
    Case("negative size", "train", ("--batch_size=-4",), "batch_size=-4 must be a positive integer"),
    Case("n_head does not divide d_model", "train", ("--d_model=30", "--n_head=4", "--head_dim=0"),
         "d_model=30 is not divisible by n_head=4; change one of them or set head_dim"),
    Case("odd head_dim", "train", ("--head_dim=15",), "RoPE rotates pairs of dimensions: head_dim=15 must be even"),
    Case("n_head and n_kv_head", "train", ("--n_head=4", "--n_kv_head=3"),
         "n_head=4 must be a multiple of n_kv_head=3"),
    Case("batch not divisible by ranks", "train", ("--gradient_accumulation_steps=3",),
         "gradient_accumulation_steps=3 must be a multiple of the number of ranks (2)"),
    Case("unknown preset", "train", ("no_such_preset",), "no preset 'no_such_preset'"),
    Case("preset not JSON", "train", ("{broken_preset}",), "is not valid JSON"),
    Case("flag without value", "train", ("--max_iters",), "--max_iters needs a value: write --max_iters=VALUE"),
    Case("bad choice", "train", ("--dtype=float8",), "dtype='float8' is not one of auto, float32"),
    Case("resume and init_from", "train", ("--resume", "--init_from={run}"), "pick one"),
    # data
    Case("missing dataset", "train", ("--dataset=/no/such/dataset",), "no dataset '/no/such/dataset'",
         subprocess=True),
    Case("dataset not prepared", "train", ("--dataset={unprepared}",), "is not prepared"),
    Case("wrong magic", "train", ("--dataset={wrong_magic}",), "is not a nanoPALM token file"),
    Case("truncated token file", "train", ("--dataset={truncated}",), "train.bin is truncated"),
    Case("vocabulary larger than the model's", "train", ("--vocab_size=50",),
         "was tokenized with a 77-token vocabulary (char) but the model has 50: set --vocab_size to at least 77"),
    Case("block longer than the val split", "train", ("--dataset={short_val}",),
         "--block_size 32 needs 33 tokens but"),
    Case("a block of 10^8 tokens", "train", ("--block_size=100000000",),  # checked before the model is built
         "--block_size 100000000 needs 100000001 tokens but"),
    Case("non-UTF-8 text", "prepare", ("--data_files={latin1}",),
         "latin1.txt is not UTF-8 text (byte 14: invalid continuation byte): convert it first", subprocess=True),
    Case("malformed JSON lines", "prepare", ("--data_files={broken_jsonl}",),
         "broken.jsonl line 2 is not valid JSON (Invalid control character at, column 20): fix or remove that line"),
    Case("a JSON line without text", "prepare", ("--data_files={no_text_jsonl}",),
         "no_text.jsonl line 2 has no 'text' key (it has id, body): give every line one, or set --text_column"),
    Case("a JSON line whose text is no string", "prepare", ("--data_files={number_jsonl}",),
         "number.jsonl line 3: 'text' is a JSON number, not a string: each document's text must be a string",
         subprocess=True),
    Case("an empty text file", "prepare", ("--data_files={empty}",),
         "--data_files {empty}: the file is empty (or only whitespace): nothing to prepare"),
    Case("shakespeare: vocabulary of 0", "prepare_shakespeare", ("--vocab_size=0",),
         "--vocab_size must be positive, got 0"),
    Case("prepare: unknown flag", "prepare", ("--data_files={latin1}", "--bogus"),
         "unrecognized arguments: --bogus (see --help)"),
    # checkpoints
    Case("init_from nothing", "train", ("--init_from=/no/such/run",), "no checkpoint in /no/such/run"),
    Case("resume a corrupt run", "train", ("--resume",),
         "no usable checkpoint in {corrupt_run}: 1 corrupt or incomplete", subprocess=True, out="{corrupt_run}"),
    Case("run exists without --resume", "train", (), "already holds a run: add --resume", out="{run}"),
    Case("another model's shape", "train", ("--init_from={other_shape}",),
         "has shape (48, 32) but the model expects (32, 32); use the model settings it was trained with"),
    Case("tokenizer mismatch", "train", ("--init_from={run}", "--dataset={other_tokenizer}"),
         "the checkpoint's tokenizer (char ", subprocess=True),
    Case("sample a corrupt run", "sample", ("--out_dir={corrupt_run}",), "no usable checkpoint in"),
    Case("consolidate a single-file run", "consolidate", ("{run}", "--out={root}/out/consolidated"),
         "is already a single-file checkpoint: sample.py, eval.py and --init_from read it as it is",
         subprocess=True, out="{root}/out/consolidated"),
    Case("consolidate into a run", "consolidate", ("{sharded_run}", "--out={run}"),
         "already holds checkpoints: give another --out", out="{run}"),
    Case("consolidate nothing", "consolidate", ("/no/such/run",), "no checkpoint in /no/such/run",
         out="/no/such/run"),
    # paths: a file where a directory is expected and the reverse, missing, in a read-only place
    Case("out_dir is a file", "train", (), "--out_dir={a_file} is a file, not a directory: give a directory",
         out="{a_file}"),
    Case("out_dir under a file", "train", (), "cannot create --out_dir={a_file}/run (Not a directory)",
         out="{a_file}/run"),
    Case("out_dir in a read-only place", "train", (), f"cannot create --out_dir={READ_ONLY} (", out=READ_ONLY),
    Case("dataset is a file", "train", ("--dataset={a_file}",), "--dataset={a_file} is a file: give a prepared"),
    Case("init_from is a file", "train", ("--init_from={a_file}",), "{a_file} is a file: give a run directory"),
    Case("sample: out_dir is a file", "sample", ("--out_dir={a_file}",),
         "--out_dir={a_file} is a file: give the directory of a training run"),
    Case("prompt file is a directory", "sample", ("--start=FILE:{root}",),
         "cannot read the prompt file {root} (Is a directory)"),
    Case("data_files is a directory", "prepare", ("--data_files={root}",), "--data_files {root} is a directory: "
         "give files, or a glob such as"),
    Case("tokenizer_from missing", "prepare", ("--data_files={latin1}", "--tokenizer_from=/no/such/dir"),
         "--tokenizer_from=/no/such/dir does not exist: give a dataset name"),
    Case("tokenizer_from is a file", "prepare", ("--data_files={latin1}", "--tokenizer_from={a_file}"),
         "--tokenizer_from={a_file} is a file"),
    Case("prepare: out_dir is a file", "prepare", ("--data_files={latin1}",), "--out_dir={a_file} is a file",
         out="{a_file}"),
    Case("prepare: out_dir in a read-only place", "prepare", ("--data_files={latin1}",),
         f"cannot create --out_dir={READ_ONLY} (", out=READ_ONLY),
    Case("plot: missing run", "plot", ("{root}/no_run",), "{root}/no_run/metrics.jsonl not found: is"),
    Case("plot: output in a missing directory", "plot", ("{run}", "--output=/no/such/dir/loss.png"),
         "cannot write /no/such/dir/loss.png (No such file or directory)", out="/no/such/dir"),
    Case("plot: output is a directory", "plot", ("{run}", "--output={root}/out"),
         "cannot write {root}/out (Is a directory)", out="{root}/out"),
    # generation
    Case("empty prompt", "sample", ("--start=FILE:{empty}",), "the prompt is empty: give --start=TEXT"),
    Case("missing prompt file", "sample", ("--start=FILE:{run}/no_prompt.txt",), "cannot read the prompt file"),
    Case("top_p zero", "sample", ("--top_p=0",), "top_p=0.0 must be in (0, 1]", subprocess=True),
    Case("top_p above one", "sample", ("--top_p=1.01",), "top_p=1.01 must be in (0, 1]"),
    Case("max_new_tokens negative", "sample", ("--max_new_tokens=-5",), "--max_new_tokens=-5 must be a positive"),
    Case("max_new_tokens not a number", "sample", ("--max_new_tokens=ten",),
         "argument --max_new_tokens: invalid int value: 'ten' (see --help)"),
    # evaluation (eval.py)
    Case("eval a run without a checkpoint", "eval", ("--out_dir={no_checkpoint}",),
         "no checkpoint in {no_checkpoint}: train first", out="{no_checkpoint}"),
    Case("eval an unknown task", "eval", ("--out_dir={run}", "--tasks=no_such_task"),
         "unknown task(s) no_such_task: `lm-eval ls tasks` lists the harness's tasks", out="{run}", slow=True),
    Case("eval a non-UTF-8 file", "eval", ("--out_dir={run}", "--data_files={latin1}"),
         "latin1.txt is not UTF-8 text (byte 14: invalid continuation byte)", subprocess=True, out="{run}"),
    Case("eval an empty file", "eval", ("--out_dir={run}", "--data_files={empty}"),
         "--data_files {empty} is empty (or only whitespace): there is nothing to score", out="{run}"),
    Case("eval a task whose data is on the Hub, offline", "eval",
         ("--out_dir={run}", "--tasks=lambada_openai", "--limit=2"),
         "a task's data is on the Hugging Face Hub, which cannot be reached from here", out="{run}", slow=True,
         subprocess=True, others_log=True),
    Case("eval stride zero", "eval", ("--out_dir={run}", "--stride=0"), "--stride=0 must be at least 1", out="{run}"),
    Case("eval stride of block_size", "eval", ("--out_dir={run}", "--stride=32"),
         "--stride 32 must be between 1 and block_size - 1 = 31", out="{run}"),
    Case("eval limit zero", "eval", ("--out_dir={run}", "--tasks=hellaswag", "--limit=0"),
         "--limit=0 must be at least 1", out="{run}"),
]


@pytest.fixture(scope="module")
def world(char_dataset, tmp_path_factory) -> dict[str, str]:
    """The paths the cases name: datasets with one thing wrong each, runs and broken checkpoints."""
    root = tmp_path_factory.mktemp("bad_input")
    paths = {"data": char_dataset, "root": root}

    def dataset(name: str, **files: bytes | None) -> Path:
        """A copy of char_dataset by symlinks, with `files` replaced (bytes) or left out (None)."""
        directory = root / name
        directory.mkdir()
        for f in ("meta.json", "tokenizer.json", "train.bin", "val.bin"):
            if f not in files:
                (directory / f).symlink_to(char_dataset / f)
            elif files[f] is not None:
                (directory / f).write_bytes(files[f])
        return directory

    train_bin = (char_dataset / "train.bin").read_bytes()
    paths["wrong_magic"] = dataset("wrong_magic", **{"train.bin": b"\0" * 4096})
    paths["truncated"] = dataset("truncated", **{"train.bin": train_bin[:HEADER.size + 1001]})
    paths["unprepared"] = dataset("unprepared", **{"meta.json": None})
    paths["short_val"] = dataset("short_val", **{"val.bin": None})
    write_token_file(paths["short_val"] / "val.bin", list(range(20)), 77, "char")

    other = paths["other_tokenizer"] = root / "other_tokenizer"  # a dataset of another char tokenizer
    other.mkdir()
    tok = CharTokenizer.from_texts(["the quick brown fox jumps over the lazy dog\n"])
    tokens = tok.encode("the quick brown fox jumps over the lazy dog\n" * 40)
    for split in ("train", "val"):
        write_token_file(other / f"{split}.bin", tokens, tok.vocab_size, tok.name)
    tok.save(other)
    stats = SplitStats(1, len(tokens), len(tokens))
    write_meta(other, tok, "test", stats, stats)

    def run(name: str, **overrides) -> Path:
        values = {**TINY_RUN, "dataset": str(char_dataset), "out_dir": str(root / name), **overrides}
        Trainer(build_config(values)).save(val_loss=4.0)
        return ckpt.checkpoint_dir(root / name, 0)

    run("run")
    paths["run"] = root / "run"
    run("sharded_run", checkpoint_format="sharded")
    paths["sharded_run"] = root / "sharded_run"
    corrupt = run("corrupt_run")
    paths["corrupt_run"] = root / "corrupt_run"
    (corrupt / ckpt.MODEL_FILE).write_bytes((corrupt / ckpt.MODEL_FILE).read_bytes()[:-10])
    other_shape = run("other_shape")  # a checkpoint whose weights are of a wider model than its config says
    paths["other_shape"] = root / "other_shape"
    wider = PaLM(PaLMConfig(**{**build_config({**TINY_RUN}).model.to_dict(), "d_model": 48}))
    save_file(wider.state_dict(), other_shape / ckpt.MODEL_FILE)
    meta = json.loads((other_shape / ckpt.META_FILE).read_text())
    meta["sha256"][ckpt.MODEL_FILE] = sha256(other_shape / ckpt.MODEL_FILE)
    (other_shape / ckpt.META_FILE).write_text(json.dumps(meta))

    paths["broken_preset"] = root / "broken.json"
    paths["broken_preset"].write_text('{"n_layer": 2,')
    paths["latin1"] = root / "latin1.txt"
    paths["latin1"].write_bytes("Some text\n\nCafé crème\n".encode("latin-1"))
    paths["broken_jsonl"] = root / "broken.jsonl"
    paths["broken_jsonl"].write_text('{"text": "fine"}\n{"text": "cut short\n')
    paths["no_text_jsonl"] = root / "no_text.jsonl"
    paths["no_text_jsonl"].write_text('{"text": "fine"}\n{"id": 2, "body": "misnamed"}\n')
    paths["number_jsonl"] = root / "number.jsonl"
    paths["number_jsonl"].write_text('{"text": "fine"}\n\n{"text": 5}\n')
    paths["empty"] = root / "empty.txt"
    paths["no_checkpoint"] = root / "no_checkpoint"
    paths["no_checkpoint"].mkdir()
    paths["empty"].write_text("")
    paths["a_file"] = root / "a_file.txt"
    paths["a_file"].write_text("not a directory\n")
    (root / "out").mkdir()
    return {k: str(v) for k, v in paths.items()}


def argv(case: Case, world: dict[str, str]) -> tuple[list[str], Path]:
    """The case's arguments after the usual ones for its command line, and its output directory."""
    out = case.out.format(out=f"{world['root']}/out/{case.id.replace(' ', '_')}", **world)
    base = {
        "train": [f"--{k}={v}" for k, v in TINY_RUN.items()] + [f"--dataset={world['data']}", f"--out_dir={out}"],
        "sample": [f"--out_dir={world['run']}", "--device=cpu"],
        "prepare": [f"--out_dir={out}", f"--cache_dir={world['root']}/hf_cache",
                    *([] if any(a.startswith("--tokenizer_from") for a in case.args) else ["--tokenizer=char"])],
        "prepare_shakespeare": [f"--out_dir={out}"],
        "plot": [],
        "eval": ["--device=cpu"],
        "consolidate": [],
    }[case.cli]
    return base + [a.format(**world) for a in case.args], Path(out)


def files_under(path: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(scope="module")
def subprocess_results(world) -> dict[str, tuple[int, str, str, bool]]:
    """(exit code, stdout, stderr, output untouched) of every subprocess case, two at a time."""

    def run(case: Case) -> tuple[int, str, str, bool]:
        args, out = argv(case, world)
        before = files_under(out)
        result = subprocess.run([sys.executable, *SCRIPTS[case.cli].split(), *args], cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=300)
        return result.returncode, result.stdout, result.stderr, files_under(out) == before

    cases = [c for c in CASES if c.subprocess]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([c.id for c in cases], pool.map(run, cases), strict=True))


def script_main(cli: str):
    if cli == "consolidate":
        return lambda args: convert.main(["consolidate", *args])
    return load_script(SCRIPTS[cli]).main


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] * c.slow) for c in CASES],
                         ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, world, request, capsys, monkeypatch):
    if case.subprocess:
        code, stdout, stderr, untouched = request.getfixturevalue("subprocess_results")[case.id]
    else:
        if case.id == "batch not divisible by ranks":  # as torchrun with 2 processes would report it
            monkeypatch.setattr(D, "init_distributed", lambda device, fsdp: (D.DistInfo(0, 0, 2), device))
        args, out = argv(case, world)
        before = files_under(out)
        code = run_cli(script_main(case.cli), args)
        stdout, stderr = capsys.readouterr()
        untouched = files_under(out) == before
    message = case.message.format(**world)
    assert code == 2, stderr
    ours = stderr.splitlines()[-1] + "\n" if case.others_log else stderr
    assert ours.count("\n") == 1 and ours.startswith("error: "), stderr
    assert message in ours and "Traceback" not in stderr
    assert untouched, "a failed command must not write its output"
    if case.cli in ("sample", "eval"):
        assert stdout == ""
