"""The model's properties, each checked so that the test fails if the property breaks."""

import itertools
import math

import pytest
import torch

from nanopalm.config import model_config, model_presets
from nanopalm.fused import linear_cross_entropy
from nanopalm.model import PaLM, PaLMConfig, apply_rope, lm_losses, rope_tables
from nanopalm.variants import gpt2_config, param_count

MODEL_PRESETS = model_presets()


def tiny(**overrides) -> PaLMConfig:
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, d_model=32, d_ff=64)
    return PaLMConfig(**{**base, **overrides})


@pytest.mark.parametrize("overrides", [{}, {"parallel_block": False}, {"pos_emb": "learned"}, {"n_kv_head": 4}])
def test_causality(overrides):
    torch.manual_seed(0)
    model = PaLM(tiny(**overrides)).eval()
    idx = torch.randint(0, 64, (2, 20))
    changed = idx.clone()
    t = 11
    changed[:, t] = (changed[:, t] + 1) % 64
    a, b = model(idx).logits, model(changed).logits
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])  # and the change is seen from t on


def test_rope_preserves_norm_and_is_relative():
    torch.manual_seed(0)
    cos, sin = rope_tables(64, 128, 10000.0)
    x = torch.randn(128, 64, dtype=torch.float32)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rotated[1:], x[1:])  # it does rotate

    q, k = torch.randn(64), torch.randn(64)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q[None], cos[m:m + 1], sin[m:m + 1])[0]
        kn = apply_rope(k[None], cos[n:n + 1], sin[n:n + 1])[0]
        return float(qm @ kn)

    for m, n in [(5, 2), (40, 3), (100, 100)]:
        for shift in (1, 17):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-4, abs=1e-4)
    assert score(5, 2) != pytest.approx(score(6, 2), rel=1e-3)


def test_rope_is_the_complex_rotation_of_each_pair():
    """Pair i = (x_i, x_{i+D/2}) as the complex number x_i + i x_{i+D/2}, multiplied by e^{i p theta_i} with
    theta_i = 10000^(-2i/D) (Su et al. 2021): an independent statement of what apply_rope computes."""
    torch.manual_seed(0)
    D, T = 8, 5
    x = torch.randn(2, 3, T, D, dtype=torch.float64)
    cos, sin = rope_tables(D, T, 10000.0)
    theta = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * theta
    turn = torch.polar(torch.ones_like(angles), angles)
    expected = torch.complex(x[..., :D // 2], x[..., D // 2:]) * turn
    got = apply_rope(x, cos.double(), sin.double())
    torch.testing.assert_close(got, torch.cat([expected.real, expected.imag], dim=-1), rtol=1e-6, atol=1e-6)


def test_mqa_has_one_kv_head_and_equals_mha_with_copied_heads():
    torch.manual_seed(0)
    mqa = PaLM(tiny(n_kv_head=1)).eval()
    cfg = mqa.config
    q_dim, hd = cfg.n_head * cfg.head_dim, cfg.head_dim
    # One key head and one value head in the fused input projection.
    assert mqa.blocks[0].in_proj.weight.shape[0] == q_dim + 2 * hd + 2 * cfg.d_ff
    assert mqa.blocks[0].in_proj.splits == {"q": q_dim, "k": hd, "v": hd, "gate": cfg.d_ff, "up": cfg.d_ff}
    mha = PaLM(tiny(n_kv_head=cfg.n_head)).eval()
    state = mqa.state_dict()
    for i in range(cfg.n_layer):
        w = state[f"blocks.{i}.in_proj.weight"]
        q, k, v, u = w.split([q_dim, hd, hd, 2 * cfg.d_ff])
        state[f"blocks.{i}.in_proj.weight"] = torch.cat([q, k.repeat(cfg.n_head, 1), v.repeat(cfg.n_head, 1), u])
    mha.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(mha(idx).logits, mqa(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(),
        tiny(parallel_block=False, mlp="gelu", bias=True, tie_embeddings=False),
        tiny(n_kv_head=2, head_dim=12, pos_emb="learned"),
        gpt2_config(n_layer=12, n_head=12, d_model=768, vocab_size=50257, block_size=1024),
    ],
)
def test_param_count_matches_formula(cfg):
    assert PaLM(cfg).num_params() == param_count(cfg)


def test_param_count_of_the_seed_model():
    seed = model_config("seed_213m")
    assert param_count(seed) == 214_011_648  # one shared LayerNorm per block (PaLM)
    assert param_count(model_config("seed_213m", {"parallel_block": False})) == 214_014_720
    # GPT-2 small from the same code has GPT-2's well-known 124,439,808 parameters (tied, vocab 50257).
    gpt2 = gpt2_config(n_layer=12, n_head=12, d_model=768, vocab_size=50257, block_size=1024)
    assert param_count(gpt2) == 124_439_808


def test_init_statistics():
    torch.manual_seed(0)
    model = PaLM(tiny(d_model=256, d_ff=1024, n_head=4, vocab_size=512))
    assert model.wte.weight.std().item() == pytest.approx(1.0, rel=0.02)
    for name, p in model.named_parameters():
        if p.dim() == 2 and "wte" not in name:
            assert p.std().item() == pytest.approx(p.shape[1] ** -0.5, rel=0.05), name
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if p.dim() == 1)


def test_logits_are_scaled_by_inverse_sqrt_d_model():
    torch.manual_seed(0)
    scaled = PaLM(tiny(logit_scale=True)).eval()
    unscaled = PaLM(tiny(logit_scale=False)).eval()
    unscaled.load_state_dict(scaled.state_dict())
    idx = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(scaled(idx).logits, unscaled(idx).logits / math.sqrt(32))


@pytest.mark.parametrize("losses", [lambda x, w, t, z_loss: lm_losses(x @ w.T, t, z_loss), linear_cross_entropy],
                         ids=["model.lm_losses", "fused.linear_cross_entropy"])
def test_z_loss_on_a_hand_computed_case(losses):
    # logits = x @ eye: [0, ln 3] and [1, 1], so Z = 4 and Z = 2e
    x = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    total, ce = losses(x, eye, torch.tensor([0, 1]), z_loss=1e-4)
    ce_expected = (math.log(4.0) + math.log(2.0)) / 2  # -log(1/4), -log(1/2)
    z_expected = 1e-4 * (math.log(4.0) ** 2 + (1 + math.log(2.0)) ** 2) / 2
    assert ce.item() == pytest.approx(ce_expected, rel=1e-6)
    assert (total - ce).item() == pytest.approx(z_expected, rel=1e-4)
    # Ignored targets (-1) count in neither term.
    total_ign, ce_ign = losses(x, eye, torch.tensor([0, -1]), z_loss=1e-4)
    assert ce_ign.item() == pytest.approx(math.log(4.0), rel=1e-6)
    assert (total_ign - ce_ign).item() == pytest.approx(1e-4 * math.log(4.0) ** 2, rel=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_the_models_loss_is_torchs_cross_entropy_plus_the_z_loss(fused):
    """PaLM.forward's loss against torch's own ops on its logits: F.cross_entropy, and z_loss * mean log^2 Z
    over the counted targets (PaLM Section 5); ce is the cross-entropy alone."""
    torch.manual_seed(0)
    model = PaLM(tiny(z_loss=0.1, fused=fused)).eval()
    idx, targets = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    targets[:, :3] = -1
    out, logits = model(idx, targets), model(idx).logits.flatten(0, 1)
    counted = targets.flatten() != -1
    ce = torch.nn.functional.cross_entropy(logits, targets.flatten(), ignore_index=-1)
    torch.testing.assert_close(out.ce, ce, rtol=1e-5, atol=1e-6)
    z = 0.1 * logits.logsumexp(dim=-1)[counted].square().mean()
    torch.testing.assert_close(out.loss - out.ce, z, rtol=1e-4, atol=1e-6)
    assert z > 1e-3  # the z-loss term is really there


@pytest.mark.parametrize("overrides", [{}, {"parallel_block": False, "mlp": "gelu", "pos_emb": "learned",
                                            "bias": True, "tie_embeddings": False, "n_kv_head": 2}])
def test_gradients_match_finite_differences_in_float64(overrides):
    torch.manual_seed(0)
    model = PaLM(tiny(n_layer=1, d_model=16, d_ff=32, n_head=2, vocab_size=16, **overrides)).double()
    idx = torch.randint(0, 16, (2, 8))
    targets = torch.randint(0, 16, (2, 8))
    model(idx, targets).loss.backward()
    gen = torch.Generator().manual_seed(1)
    eps = 1e-6
    for name, p in model.named_parameters():
        flat, grad = p.data.view(-1), p.grad.view(-1)
        for i in torch.randint(0, flat.numel(), (3,), generator=gen).tolist():
            orig = flat[i].item()
            flat[i] = orig + eps
            up = model(idx, targets).loss.item()
            flat[i] = orig - eps
            down = model(idx, targets).loss.item()
            flat[i] = orig
            assert grad[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8), name


def test_eval_mode_turns_dropout_off():
    torch.manual_seed(0)
    model = PaLM(tiny(dropout=0.3))
    idx = torch.randint(0, 64, (2, 16))
    model.train()
    assert not torch.equal(model(idx).logits, model(idx).logits)
    model.eval()
    assert torch.equal(model(idx).logits, model(idx).logits)


SWITCHES = dict(
    parallel_block=[True, False], n_kv_head=[1, 2, 4], mlp=["swiglu", "gelu"], pos_emb=["rope", "learned"],
    logit_scale=[True, False], z_loss=[1e-4, 0.0], bias=[False, True], tie_embeddings=[True, False],
    init=["palm", "gpt2"],
)


def covering_rows(switches: dict, strength: int = 3) -> list[tuple]:
    """Rows of switch values such that any `strength` switches take every combination of their values in some
    row (a covering array, built greedily from the full product in its order: deterministic)."""
    columns = list(itertools.combinations(range(len(switches)), strength))
    options = list(switches.values())
    needed = {(cols, values) for cols in columns for values in itertools.product(*(options[c] for c in cols))}
    rows, chosen = list(itertools.product(*options)), []
    while needed:
        best = max(rows, key=lambda row: sum((cols, tuple(row[c] for c in cols)) in needed for cols in columns))
        chosen.append(best)
        needed -= {(cols, tuple(best[c] for c in cols)) for cols in columns}
    return chosen


def test_every_three_switches_in_every_combination_overfit_one_batch():
    """Each switch is one line of model.py; a bug in how switches combine (a serial block with learned positions
    and untied embeddings, ...) shows as a model that cannot overfit one batch. Every combination of the values
    of any three switches, in 24 models (a covering array) instead of all 768 (which took 40 s): an interaction
    of up to three switches is still covered; and each switch flipped alone from PaLM's setting."""
    rows = covering_rows(SWITCHES)
    palm = tuple(values[0] for values in SWITCHES.values())
    flips = [palm[:i] + (value,) + palm[i + 1:] for i, values in enumerate(SWITCHES.values()) for value in values[1:]]
    assert len(rows) == 24
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is faster than two for ops this small
    try:
        failures = overfit_failures(dict.fromkeys(rows + flips))
    finally:
        torch.set_num_threads(threads)
    assert not failures, failures


def overfit_failures(rows) -> list:
    failures = []
    for values in rows:
        switches = dict(zip(SWITCHES, values, strict=True))
        torch.manual_seed(0)
        cfg = PaLMConfig(vocab_size=32, block_size=16, n_layer=1, n_head=4, d_model=32, d_ff=64, **switches)
        model = PaLM(cfg)
        x, y = torch.randint(0, 32, (2, 16)), torch.randint(0, 32, (2, 16))
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        for step in range(30):
            loss = model(x, y).loss
            if step == 0:
                first = loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not loss.item() < 0.25 * first:
            failures.append((switches, first, loss.item()))
    return failures


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_layer=0), "n_layer=0 must be a positive integer"),
        (dict(d_model=30, n_head=4), "not divisible by n_head"),
        (dict(n_head=6, head_dim=8, n_kv_head=4), "multiple of n_kv_head"),
        (dict(head_dim=7), "must be even"),
        (dict(dropout=1.5), "dropout=1.5"),
    ],
)
def test_bad_config_is_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_presets_build_and_palm_shapes_follow_the_paper():
    for name in MODEL_PRESETS:
        cfg = model_config(name)
        if name == "command_r_35b":  # Cohere's Command-R v01 (transformers' CohereConfig defaults): PaLM's block, MHA
            assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff) == (40, 8192, 64, 64, 22528)
            assert param_count(cfg) == 34_980_831_232  # 35B, as Cohere names it
            continue
        assert cfg.n_kv_head == 1 and cfg.parallel_block  # all presets are PaLM-shaped
        if name.startswith("palm_") and name not in ("palm_6m", "palm_20m"):  # those two: heads of 64, CPU-sized
            assert cfg.d_ff == 4 * cfg.d_model and cfg.head_dim in (128, 256)
    # palm_6m: the tied 8192 x 256 embedding, 4 x (LayerNorm gain 256, fused input 256 x (256 + 2 x 64 + 2 x 1024),
    # attention out 256 x 256, MLP out 1024 x 256), the final gain
    assert param_count(model_config("palm_6m")) == 8192 * 256 + 4 * (256 + 256 * 2432 + 256 * 256 + 1024 * 256) + 256
    assert param_count(model_config("palm_20m")) == pytest.approx(20e6, rel=0.15)
    assert param_count(model_config("palm_125m")) == pytest.approx(125e6, rel=0.15)
    assert param_count(model_config("palm_350m")) == pytest.approx(350e6, rel=0.15)
    assert param_count(model_config("palm_1b")) == pytest.approx(1e9, rel=0.15)
    # PaLM-8B with the paper's 256k vocabulary: Table 1's 8.63B parameters, 32 layers of 16 heads of 256.
    palm_8b = model_config("palm_8b", {"vocab_size": 256000})
    assert param_count(palm_8b) == pytest.approx(8.63e9, abs=0.005e9)
    assert (palm_8b.n_layer, palm_8b.d_model, palm_8b.n_head, palm_8b.head_dim, palm_8b.block_size) == \
        (32, 4096, 16, 256, 2048)


def test_flops_per_token_follows_appendix_b():
    """6N + 12 L H Q T for tiny(), counted by hand: N = embedding 64 x 32 = 2048, per block LayerNorm 32,
    in_proj 32 x (32 + 8 + 8 + 2 x 64) = 5632, attention out 32 x 32 = 1024, MLP out 64 x 32 = 2048 (8736 a
    block, 2 blocks), final LayerNorm 32: N = 19552; 12 x 2 layers x 4 heads x 8 x 32 tokens = 24576."""
    model = PaLM(tiny())
    assert model.num_params() == 19552
    assert model.flops_per_token(32) == 6 * 19552 + 24576 == 141888


@pytest.mark.parametrize("tie, scale", [(True, True), (False, True), (False, False)])
def test_initial_logits_are_order_one_tied_or_not_scaled_once(tie, scale):
    """Tied N(0,1) embeddings need the 1/sqrt(d) logit scale (Section 5); an untied output layer is
    initialised so that the scale, when on, is applied once: std(logits) ~ 1 in every case, not 1/sqrt(d)."""
    torch.manual_seed(0)
    model = PaLM(tiny(d_model=256, d_ff=1024, n_head=4, vocab_size=512, tie_embeddings=tie, logit_scale=scale))
    logits = model(torch.randint(0, 512, (4, 32))).logits
    assert logits.std().item() == pytest.approx(1.0, rel=0.15)
