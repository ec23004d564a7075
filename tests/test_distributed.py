"""Two ranks on the CPU (torchrun, gloo): DDP and FSDP2 start from the weights of one process and train
exactly as one process with the same global batch, with activation checkpointing too; no rank holds the
whole model; their checkpoints resume on one process; a killed rank is brought back from the last checkpoint."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanopalm import checkpoint as ckpt
from nanopalm import convert
from nanopalm import distributed as D
from nanopalm.config import build_config
from nanopalm.errors import UserError
from nanopalm.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def torchrun(values: dict, script: tuple[str, ...] = ("train.py",), launcher: tuple[str, ...] = (), nproc: int = 2,
             **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 [launcher] script --key=value ...`, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *launcher,
               *script, *(f"--{k}={v}" for k, v in values.items())]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (train loss, grad norm); a step logged twice (replayed after a restart) keeps its last row."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["train_loss"], r["grad_norm"]) for r in rows if "train_loss" in r}


def weights(run_dir: Path, step: int = 12) -> dict[str, torch.Tensor]:
    """The weights of checkpoint `step`, whichever its format."""
    return ckpt.read_weights(ckpt.verify_checkpoint(ckpt.checkpoint_dir(run_dir, step)))


def max_difference(a: dict[int, tuple], b: dict[int, tuple], column: int = 0) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k][column] - b[k][column]) for k in a)


def launched(values: dict, out: Path, **flags) -> tuple[Path, subprocess.CompletedProcess]:
    result = torchrun({**values, "out_dir": out, **flags})
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


# Activation checkpointing changes no number (tests/test_activation_checkpointing.py): both runs use it, so
# that the comparisons with one process below hold for it under DDP and FSDP2 as well.
FSDP = {"fsdp": True, "activation_checkpointing": "selective"}  # sharded checkpoints: the default under FSDP2


@pytest.fixture(scope="module")
def ddp(reference_values, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    return launched(reference_values, tmp_path_factory.mktemp("ddp"), activation_checkpointing="full")


@pytest.fixture(scope="module")
def fsdp(reference_values, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    return launched(reference_values, tmp_path_factory.mktemp("fsdp"), **FSDP)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_rank_starts_from_the_weights_of_one_process(mode, one_process, request):
    """Built on the meta device and initialised shard by shard (FSDP2): bitwise the init of one process."""
    out, _ = request.getfixturevalue(mode)
    expected = weights(one_process, 0)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in weights(out, 0).items())
    assert (ckpt.checkpoint_dir(out, 0) / ckpt.SHARD_INDEX).is_file() == (mode == "fsdp")


def test_no_rank_holds_the_whole_model():
    """FSDP2 from the meta device: a rank allocates its shards, plus one whole parameter while it draws it."""
    result = torchrun({}, ("tests/helpers/build_sharded.py",))
    assert result.returncode == 0, result.stderr[-3000:]
    # one JSON object a rank; two ranks' lines may arrive joined on one line
    ranks = [json.loads(match) for match in re.findall(r"\{[^{}]*\}", result.stdout)]
    assert len(ranks) == 2
    for rank in ranks:  # 8 blocks: the whole model is 13 times its largest parameter
        assert rank["peak"] <= rank["whole"] / 2 + 2 * rank["largest"] < rank["whole"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_process_with_the_same_global_batch(mode, one_process, request):
    """fp32: DDP's losses and final weights are bitwise those of one process. FSDP2's gradients are too (see
    the next test), but its grad norm sums the squares shard by shard, another order of float additions
    (measured 6e-8 apart), so once gradient clipping scales a step, the weights may drift by float rounding
    (docs/DISTRIBUTED.md: bitwise all the same at commit 2a8de46, 4.8e-7 in the losses before it)."""
    out, result = request.getfixturevalue(mode)
    reference, got = losses(one_process), losses(out)
    assert sorted(got) == list(range(1, 13))  # only rank 0 writes metrics: each step once
    bound = 2e-6 if mode == "fsdp" else 0.0
    assert max_difference(reference, got) <= bound
    assert max_difference(reference, got, column=1) <= bound
    assert result.stdout.count("val loss") == 3  # only rank 0 prints: evaluations at 0, 6, 12
    assert (out / "loss.png").is_file() and "a sample from the model" not in result.stdout  # sample_tokens=0
    mine = weights(one_process)
    assert all((tensor - mine[name]).abs().max() <= bound for name, tensor in weights(out).items())


def test_fsdp2_without_clipping_is_bitwise_one_process(reference_values, tmp_path):
    """With clipping off nothing reads the grad norm: FSDP2's losses and weights are bitwise one process's."""
    values = {**reference_values, "grad_clip": 0, "max_iters": 6}
    train(build_config({**values, "out_dir": str(tmp_path / "one")}))
    out, _ = launched(values, tmp_path / "fsdp", fsdp=True)
    assert max_difference(losses(tmp_path / "one"), losses(out)) == 0.0
    mine = weights(tmp_path / "one", 6)
    assert all(torch.equal(tensor, mine[name]) for name, tensor in weights(out, 6).items())


def test_fsdp_in_bf16_runs_the_gpu_recipe(reference_values, one_process, tmp_path):
    """FSDP2's bf16 policy (bf16 all-gathers and compute, fp32 reduction, no autocast), as on CUDA, and the
    end-of-run sample, which under FSDP2 every rank takes part in."""
    out, result = launched(reference_values, tmp_path / "bf16", fsdp=True, dtype="bfloat16", sample_tokens=20)
    # From fp32: bf16 rounding; docs/DISTRIBUTED.md states the bound this asserts (measured 0.004).
    assert max_difference(losses(one_process), losses(out)) < 0.005
    assert result.stdout.count("a sample from the model") == 1


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_checkpoint_saved_by_two_ranks_resumes_on_one(mode, reference_values, one_process, request, tmp_path):
    """DDP's single-file checkpoint as is; FSDP2's sharded one both as is (DCP reshards 2 -> 1) and as
    consolidated into the single-file layout (python -m nanopalm.convert consolidate)."""
    saved = ckpt.checkpoint_dir(request.getfixturevalue(mode)[0], 6)
    single = convert.consolidate(saved, tmp_path / "consolidated") if mode == "fsdp" else saved
    # The same layout as one process writes: full weights, optimizer state numbered as torch numbers it.
    mine = torch.load(ckpt.checkpoint_dir(one_process, 6) / ckpt.TRAINER_FILE, weights_only=True)["optimizer"]
    theirs = torch.load(single / ckpt.TRAINER_FILE, weights_only=True)["optimizer"]
    assert theirs["param_groups"] == mine["param_groups"]
    bound = 2e-6 if mode == "fsdp" else 0.0  # FSDP2 with clipping: see the test above
    torch.testing.assert_close(theirs["state"], mine["state"], rtol=0, atol=bound)  # DDP: bitwise

    out = tmp_path / "resumed"
    shutil.copytree(saved, ckpt.checkpoint_dir(out, 6))
    train(build_config({**reference_values, "out_dir": str(out), "resume": True}))
    reference = {k: v for k, v in losses(one_process).items() if k > 6}
    assert max_difference(reference, losses(out)) <= bound
    mine = weights(one_process)
    assert all((tensor - mine[name]).abs().max() <= bound for name, tensor in weights(out).items())


def test_a_killed_rank_is_brought_back_from_the_last_checkpoint(reference_values, fsdp, tmp_path):
    """torchrun --max_restarts=1: rank 1 dies at step 9; both ranks restart and resume from step 6."""
    out = tmp_path / "elastic"
    result = torchrun({**reference_values, "out_dir": out, **FSDP}, ("tests/helpers/dying_train.py", "9"),
                      ("--max_restarts=1",),
                      TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # see docs/DISTRIBUTED.md, "Elastic restarts"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exitcode: 13" in result.stderr  # the rank really died
    assert "warning: restarts" not in result.stdout + result.stderr
    assert f"resumed from {ckpt.checkpoint_dir(out, 6)} at step 6" in result.stdout
    assert losses(out) == losses(fsdp[0])
    expected = weights(fsdp[0])
    assert all(torch.equal(tensor, expected[name]) for name, tensor in weights(out).items())  # bitwise


def test_a_restart_continues_only_its_own_job(fsdp, monkeypatch):
    job = json.loads((ckpt.checkpoint_dir(fsdp[0], 12) / ckpt.META_FILE).read_text())["job_id"]
    checkpointer = ckpt.Checkpointer(fsdp[0], keep_last=3, info=D.DistInfo())
    with pytest.raises(UserError, match="already holds a run: add --resume"):
        checkpointer.start_point(resume=False, init_from="")  # not under torchrun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
    start = checkpointer.start_point(resume=False, init_from="")
    assert start.resume and start.checkpoint.path == ckpt.checkpoint_dir(fsdp[0], 12)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another-job")
    with pytest.raises(UserError, match="already holds a run: add --resume"):
        checkpointer.start_point(resume=False, init_from="")  # an earlier run in out_dir still needs --resume


def test_the_ranks_must_divide_the_global_batch(reference_values, tmp_path):
    result = torchrun({**reference_values, "out_dir": tmp_path / "odd", "gradient_accumulation_steps": 3})
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    errors = {line for line in result.stderr.splitlines() if line.startswith("error: ")}
    assert errors == {"error: gradient_accumulation_steps=3 must be a multiple of the number of ranks (2): the "
                      "global batch is split evenly across ranks"}
    assert "[rank0]: Traceback" not in result.stderr


def test_adafactor_statistics_of_unevenly_sharded_matrices_are_those_of_the_whole_matrix(tmp_path):
    """FSDP2 shards rows as torch.chunk does (7 rows: 4 + 3). PaLMAdafactor's per-matrix RMS sums the local
    rows' squares over the ranks, so two ranks step exactly as one process (to float rounding)."""
    result = torchrun({"out": tmp_path / "result.json"}, ("tests/helpers/sharded_adafactor.py",))
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads((tmp_path / "result.json").read_text())
    assert found["rank0_rows"] == {"proj.weight": 4, "scale": 3}  # uneven shards indeed (7 = 4 + 3, 5 = 3 + 2)
    assert max(found["max_abs_diff"].values()) < 1e-6, found  # measured: 0.0


def test_restarts_without_the_rendezvous_workaround_are_warned_about(reference_values, tmp_path, monkeypatch):
    """torchrun --max_restarts under the shared rendezvous store (pytorch#135712): rank 0 says how to avoid it."""
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    result = torchrun({**reference_values, "out_dir": tmp_path / "warned", "max_iters": 1, "eval_interval": 1},
                      launcher=("--max_restarts=1",))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: restarts")]
    assert warnings == ["warning: restarts under torchrun's shared rendezvous store can fail on stale addresses; "
                        "launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/DISTRIBUTED.md)"]


@pytest.mark.parametrize("flags", [{}, FSDP], ids=["ddp", "fsdp"])
def test_two_ranks_train_lora_adapters_like_one_process(flags, reference_values, one_process, tmp_path):
    """LoRA on REFERENCE_RUN's weights (frozen; only the adapters are gradients, all-reduced or sharded) trains
    the same adapters on two ranks as in one process, and saves them alone, naming the same base."""
    lora = {**reference_values, "init_from": str(one_process), "lora_rank": 4, "lora_dropout": 0.1, "dropout": 0.0}
    train(build_config({**lora, "out_dir": str(tmp_path / "one")}))
    out, _ = launched(lora, tmp_path / "two", **flags)
    bound = 2e-6 if flags else 0.0
    assert max_difference(losses(tmp_path / "one"), losses(out)) <= bound
    mine, theirs = weights(tmp_path / "one"), weights(out)
    assert mine.keys() == theirs.keys() and all(".adapter." in k for k in mine)
    assert all((theirs[k] - mine[k]).abs().max() <= bound for k in mine)
    metas = [ckpt.verify_checkpoint(ckpt.checkpoint_dir(run, 12)).meta for run in (tmp_path / "one", out)]
    assert metas[0]["lora_base"] == metas[1]["lora_base"] and metas[1]["format"] == "single"


def test_a_full_disk_on_one_rank_is_the_same_one_line_on_every_rank(reference_values, tmp_path):
    """Rank 1 alone fails its shard write of step 6 (ENOSPC): both ranks stop with the same one line, and the
    checkpoint of step 0 is all there is, whole."""
    out = tmp_path / "full"
    result = torchrun({**reference_values, "out_dir": out, **FSDP}, NANOPALM_FAULT="checkpoint_write:enospc:2",
                      NANOPALM_FAULT_RANK="1")
    assert result.returncode != 0
    line = (f"error: cannot write checkpoint {ckpt.checkpoint_dir(out, 6)} (No space left on device): the previous "
            "checkpoints are intact; free space on that disk (or fix its permissions), then continue with --resume")
    assert result.stderr.count(line) == 2 and "Traceback" not in result.stderr.split(line)[0], result.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000000"]
    ckpt.verify_checkpoint(ckpt.checkpoint_dir(out, 0))


def two_nodes(values: dict, script: tuple[str, ...] = ("train.py",), launcher: tuple[str, ...] = (), **env: str
              ) -> list[subprocess.CompletedProcess]:
    """Two "nodes" on this machine: two torchrun launchers of one rank each, meeting through the c10d rendezvous
    on localhost, as two machines run `torchrun --nnodes=2 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
               f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes", *launcher, *script,
               *(f"--{k}={v}" for k, v in values.items())]
    nodes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    return [subprocess.CompletedProcess(command, n.returncode, *out) for n, out in zip(nodes, outputs, strict=True)]


def test_two_nodes_train_like_one_process_and_come_back_from_a_lost_rank(reference_values, one_process, tmp_path):
    """Multi-node, simulated: two launchers (DDP, gloo, c10d rendezvous) give one process's losses and weights
    bitwise; then, with --max_restarts=1, the rank that dies at step 9 brings both nodes back through elastic
    restart from the checkpoint of step 6 to the same final weights. (Not tested here: NCCL, a real network.)"""
    out = tmp_path / "nodes"
    nodes = two_nodes({**reference_values, "out_dir": out})
    assert all(n.returncode == 0 for n in nodes), nodes[0].stderr[-2000:] + nodes[1].stderr[-2000:]
    assert losses(out) == losses(one_process)
    expected = weights(one_process)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in weights(out).items())

    out = tmp_path / "elastic"
    nodes = two_nodes({**reference_values, "out_dir": out}, ("tests/helpers/dying_train.py", "9"),
                      ("--max_restarts=1",), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    logs = "".join(n.stdout + n.stderr for n in nodes)
    assert all(n.returncode == 0 for n in nodes), logs[-4000:]
    assert "exitcode: 13" in logs and f"resumed from {ckpt.checkpoint_dir(out, 6)} at step 6" in logs
    assert all(torch.equal(tensor, expected[name]) for name, tensor in weights(out).items())


def test_fsdp2_trains_with_palms_adafactor_like_one_process(reference_values, tmp_path):
    """The paper's optimizer end to end under FSDP2: each rank holds rows of the fused projection, and Adafactor's
    per-matrix statistics (build_optimizer's layouts, all-reduced over the shards) must give one process's steps.
    Sums over shards add in another order: within 1e-5."""
    values = {**reference_values, "optimizer": "adafactor", "learning_rate": 1e-2, "lr_schedule": "palm",
              "weight_decay_mode": "lr_squared", "palm_constant_steps": 5}
    train(build_config({**values, "out_dir": str(tmp_path / "one")}))
    out, _ = launched(values, tmp_path / "two", **FSDP)
    assert max_difference(losses(tmp_path / "one"), losses(out)) <= 1e-5
    mine = weights(tmp_path / "one")
    assert all((tensor - mine[name]).abs().max() <= 1e-5 for name, tensor in weights(out).items())
