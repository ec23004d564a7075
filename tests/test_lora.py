"""LoRA (nanopalm/lora.py): the adapted layer's math by hand, a finetune that trains the adapters alone, checkpoints
of adapters that name their base, merging, resume, and the refusals."""

import json
import shutil

import pytest
import torch
from conftest import TINY_RUN, load_script
from safetensors.torch import load_file
from test_trainer import spike_at

from nanopalm import checkpoint as ckpt
from nanopalm import convert
from nanopalm.config import build_config
from nanopalm.errors import run_cli
from nanopalm.lora import is_adapter
from nanopalm.model import PaLM, PaLMConfig
from nanopalm.trainer import Trainer, train

SHAPE = dict(vocab_size=80, block_size=32, n_layer=2, n_head=4, n_kv_head=2, head_dim=8, d_model=32, d_ff=48)


def test_an_adapted_layer_computes_w_x_plus_scaled_b_a_x_in_each_targeted_matrix():
    """By hand, matrix by matrix: the fused input projection's q and up rows get x W^T + (alpha/r) x A^T B^T, the
    others (k, v, gate: not targeted) x W^T alone; gradients reach A and B only."""
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(**SHAPE, lora_rank=3, lora_alpha=6.0, lora_targets="q,up"))
    layer = model.blocks[0].in_proj
    for name in ("q", "up"):
        torch.nn.init.normal_(layer.adapter.B[name])  # B starts at zero: give it values to see
    x = torch.randn(2, 5, 32)
    out = layer(x)
    start = 0
    for name, rows in layer.splits.items():
        expected = x @ layer.weight[start:start + rows].T
        if name in ("q", "up"):
            expected = expected + 2.0 * (x @ layer.adapter.A[name].T) @ layer.adapter.B[name].T
        torch.testing.assert_close(out[..., start:start + rows], expected, rtol=1e-5, atol=1e-6)
        start += rows
    assert sorted(layer.adapter.A) == ["q", "up"] and model.blocks[0].attn.out.adapter is None
    out.square().sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in model.named_parameters() if is_adapter(n)} & {
        "blocks.0.in_proj.adapter.A.q", "blocks.0.in_proj.adapter.B.q", "blocks.0.in_proj.adapter.A.up",
        "blocks.0.in_proj.adapter.B.up"}


def make_runs(root, dataset) -> tuple:
    """In `root`: a base run of 20 steps, and a LoRA finetune of it (rank 4, every target, 20 steps, dropout 0.1)."""
    def run(name: str, **overrides) -> None:
        train(build_config({**TINY_RUN, "dataset": str(dataset), "out_dir": str(root / name), **overrides}))
    run("base", max_iters=20, eval_interval=10)
    lora = dict(init_from=str(root / "base"), lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, max_iters=20,
                eval_interval=10, learning_rate=1e-2)
    run("lora", **lora)
    return root / "base", root / "lora", lora


@pytest.fixture(scope="module")
def runs(char_dataset, tmp_path_factory):
    """make_runs once for the module's tests, which read them (test_lora_refusals_are_one_line makes its own)."""
    return make_runs(tmp_path_factory.mktemp("lora"), char_dataset)


def test_a_lora_finetune_trains_the_adapters_alone_and_saves_them_with_its_base(runs):
    base, lora, _ = runs
    found = ckpt.find_checkpoint(lora)
    saved = load_file(found.path / ckpt.MODEL_FILE)
    c = PaLMConfig(**SHAPE | dict(n_head=2, n_kv_head=1, head_dim=16, d_ff=0))
    # 7 matrices a block (q, k, v, gate, up in the fused projection; o; down), an A and a B each, 2 blocks
    assert len(saved) == 2 * 7 * 2 and all(is_adapter(k) for k in saved)
    assert saved["blocks.0.in_proj.adapter.A.q"].shape == (4, c.d_model)
    assert saved["blocks.1.mlp.out.adapter.B.down"].shape == (c.d_model, 4)
    assert any(saved[k].abs().max() > 0 for k in saved if ".B." in k)  # B left zero: it learned
    optimizer = ckpt.read_trainer_state(found.path)["optimizer"]
    assert len(optimizer["state"]) == len(saved)  # only adapter tensors have optimizer state
    base_found = ckpt.find_checkpoint(base, prefer_best=True)
    assert found.meta["lora_base"]["checkpoint"] == str(base_found.path.resolve())
    # the base weights under the adapters are bitwise the base run's
    model = PaLM(found.config().model)
    ckpt.load_weights(found, model)
    base_weights = load_file(base_found.path / ckpt.MODEL_FILE)
    own = {k: v for k, v in model.state_dict().items() if not is_adapter(k)}
    assert own.keys() == base_weights.keys() and all(torch.equal(own[k], base_weights[k]) for k in own)
    rows = [json.loads(line) for line in (lora / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0]


def test_step_zero_of_a_lora_run_gives_the_base_models_logits_exactly(runs, tiny_run, tmp_path):
    base, _, lora = runs
    train(tiny_run("step0", **{**lora, "max_iters": 1, "eval_interval": 1}))
    found = ckpt.find_checkpoint(tmp_path / "step0", prefer_best=False)
    found = ckpt.verify_checkpoint(found.path.parent / "step_00000000")
    model = PaLM(found.config().model)
    ckpt.load_weights(found, model)
    plain, _ = ckpt.load_model(base)
    x = torch.randint(0, 77, (2, 32))
    assert torch.equal(model.eval()(x).logits, plain(x).logits)


def test_merged_weights_give_the_unmerged_models_logits(runs, tmp_path):
    _, lora, _ = runs
    found = ckpt.find_checkpoint(lora, prefer_best=True)
    unmerged = PaLM(found.config().model)
    ckpt.load_weights(found, unmerged)
    merged, _ = ckpt.load_model(lora)  # what sample.py and eval.py get
    assert merged.config.lora_rank == 0 and not any(is_adapter(n) for n, _ in merged.named_parameters())
    x = torch.randint(0, 77, (4, 32))
    reference = unmerged.eval()(x).logits
    assert (merged(x).logits - reference).abs().max() <= 1e-5
    assert (reference - ckpt.load_model(found.meta["lora_base"]["checkpoint"])[0](x).logits).abs().max() > 1e-3
    # python -m nanopalm.convert merge writes it as a plain run, which everything else takes
    assert run_cli(convert.main, ["merge", str(lora), str(tmp_path / "merged")]) == 0
    written, found_merged = ckpt.load_model(tmp_path / "merged")
    assert found_merged.config().model.lora_rank == 0 and found_merged.step == found.step
    assert torch.equal(written(x).logits, merged(x).logits)


def test_a_lora_run_resumes_bitwise(runs, tiny_run, tmp_path):
    _, lora, values = runs
    train(tiny_run("stopped", **{**values, "max_iters": 10}))
    train(tiny_run("stopped", **{**values, "resume": True}))
    a, b = (load_file(ckpt.find_checkpoint(r).path / ckpt.MODEL_FILE) for r in (lora, tmp_path / "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_under_activation_checkpointing_follows_the_same_trajectory(runs, tiny_run, tmp_path):
    """Recomputed blocks (dropout masks replayed) train the adapters as the plain run does."""
    _, lora, values = runs
    train(tiny_run("recomputed", **{**values, "activation_checkpointing": "full"}))
    a, b = (load_file(ckpt.find_checkpoint(r).path / ckpt.MODEL_FILE) for r in (lora, tmp_path / "recomputed"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_lora_accumulation_gives_the_same_adapter_gradient(runs, tiny_run):
    """One micro-batch of 8 and two of 4 over the same 8 sequences: one gradient, on the adapters alone."""
    _, _, values = runs
    values = {**values, "lora_dropout": 0.0, "grad_clip": 0.0}  # unclipped: a norm would hide a scale
    batch = Trainer(tiny_run("a", **values)).train_loader.get_batch(0, 0)
    grads = []
    for name, micro, size in (("one", 1, 8), ("two", 2, 4)):
        trainer = Trainer(tiny_run(name, **values, batch_size=size, gradient_accumulation_steps=micro))
        trainer.train_loader.get_batch = lambda step, m, s=size: (batch[0][m * s:(m + 1) * s],
                                                                    batch[1][m * s:(m + 1) * s])
        captured = {}
        trainer.scaler.step = lambda opt, c=captured, t=trainer: c.update(
            {n: p.grad.clone() for n, p in t.raw_model.named_parameters() if p.grad is not None})
        trainer.train_step()
        grads.append(captured)
    assert grads[0].keys() == {n for n, _ in trainer.raw_model.named_parameters() if is_adapter(n)}
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)
    assert any(g.abs().max() > 1e-3 for g in grads[0].values())


def one_line(argv: list[str], capsys, main) -> str:
    capsys.readouterr()
    assert run_cli(main, argv) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_lora_refusals_are_one_line(tmp_path, capsys, char_dataset):
    base, lora, _ = make_runs(tmp_path, char_dataset)  # its own: it damages the base
    main = load_script("train.py").main
    flags = [f"--dataset={char_dataset}", "--device=cpu", "--compile=False", "--max_iters=2"]
    assert "--init_from" in one_line([*flags, "--lora_rank=4", f"--out_dir={tmp_path / 'a'}"], capsys, main)
    assert "merge it" in one_line([*flags, "--lora_rank=4", f"--init_from={lora}", f"--out_dir={tmp_path / 'b'}"],
                                  capsys, main)
    assert "lora_targets" in one_line([*flags, "--lora_rank=4", "--lora_targets=q,w"], capsys, main)
    assert "LoRA run" in one_line(["export", str(lora), str(tmp_path / "hf")], capsys, convert.main)
    assert "not a LoRA run" in one_line(["merge", str(base), str(tmp_path / "m")], capsys, convert.main)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m").exists()
    # the base changed under the adapters, or went: sampling refuses in one line
    base_ckpt = ckpt.find_checkpoint(lora).meta["lora_base"]["checkpoint"]
    sample = load_script("sample.py").main
    weights = load_file(f"{base_ckpt}/{ckpt.MODEL_FILE}")
    weights["wte.weight"][0, 0] += 1.0
    meta = json.loads((f := ckpt.Path(base_ckpt) / ckpt.META_FILE).read_text())
    from safetensors.torch import save_file
    save_file(weights, f"{base_ckpt}/{ckpt.MODEL_FILE}")
    meta["sha256"][ckpt.MODEL_FILE] = ckpt.atomic.sha256(ckpt.Path(base_ckpt) / ckpt.MODEL_FILE)
    f.write_text(json.dumps(meta))
    assert "changed since" in one_line([f"--out_dir={lora}", "--device=cpu"], capsys, sample)
    shutil.rmtree(base)
    assert "is gone" in one_line([f"--out_dir={lora}", "--device=cpu"], capsys, sample)


@pytest.mark.parametrize("points, back_to", [({}, 10), ({"rollback_interval": 4, "rollback_distance": 5}, 8)],
                         ids=["disk", "memory"])
def test_a_lora_run_rolls_back_a_loss_spike_from_its_adapter_checkpoint_or_memory(points, back_to, runs, tiny_run,
                                                                                   tmp_path):
    """PaLM's spike remedy (Section 5.1) on a LoRA run: back to step 10 (its checkpoint: adapters and base) or to the
    in-memory point of step 8 (the newest at least 5 steps before 15), and the base bitwise the base run's after."""
    base, _, values = runs
    trainer = Trainer(tiny_run("spiked", **{**values, "spike_factor": 3.0, "spike_skip": 7, **points}))
    spike_at(trainer, 15)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "spiked" / "metrics.jsonl").read_text().splitlines()]
    (event,) = [r for r in rows if r.get("event") == "loss_spike"]
    assert event["spike_step"] == 15 and event["step"] == back_to and trainer.state.step == 20
    own = {k: v for k, v in trainer.raw_model.state_dict().items() if not is_adapter(k)}
    base_weights = load_file(ckpt.find_checkpoint(base, prefer_best=True).path / ckpt.MODEL_FILE)
    assert all(torch.equal(own[k], base_weights[k]) for k in base_weights)


def test_a_lora_run_trains_with_palms_adafactor_each_adapter_its_own_matrix(runs, tiny_run, tmp_path):
    """The default run's optimizer on a LoRA finetune: Adafactor's state and statistics for the adapters alone,
    each A and B one matrix (the base's fused layout is not theirs), and B leaves zero."""
    _, _, values = runs
    trainer = Trainer(tiny_run("adafactor", **{**values, "optimizer": "adafactor", "lr_schedule": "constant",
                                               "weight_decay_mode": "lr_squared", "max_iters": 5}))
    a_q = trainer.raw_model.blocks[0].in_proj.adapter.A["q"]
    assert trainer.optimizer.layouts[a_q].splits == (4,)
    trainer.train()
    assert {id(p) for p in trainer.optimizer.state} == {id(p) for n, p in trainer.raw_model.named_parameters()
                                                        if is_adapter(n)}
    assert trainer.raw_model.blocks[0].in_proj.adapter.B["q"].abs().max() > 0
