"""nanopalm/fused.py, the drop-in for two pieces of model.py, against model.py's own plain lines (the model's
`fused=False` path): the same values and gradients in fp32 (to float rounding), in bf16 autocast (to bf16
rounding) and against finite differences in float64; the output layer never holds all the logits and does no
gradient work in eval. The plain lines themselves are checked against torch's own ops and first principles in
tests/test_model.py."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanopalm.distributed import compile_blocks
from nanopalm.fused import apply_rope, linear_cross_entropy, split_projection
from nanopalm.memory import peak_bytes_of
from nanopalm.model import MLP, Attention, PaLM, PaLMConfig, lm_losses, rope_tables

# ------------------------------------------------------------------------------------- the output layer


def reference_losses(x, weight, targets, z_loss):
    """model.py's plain output layer: all the logits x W^T at once, then lm_losses."""
    return lm_losses(x @ weight.T, targets, z_loss)


def output_layer_inputs(n=37, c=16, v=50, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(v, c, generator=gen, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::5] = -1  # positions not counted (padding)
    return x, weight, targets


def losses_and_grads(fn, x, weight, targets, z_loss, scale=1.0):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    loss, ce = fn(x, weight, targets, z_loss)
    (scale * loss).backward()
    return loss.detach(), ce.detach(), x.grad, weight.grad


@pytest.mark.parametrize("z_loss", [0.0, 1e-4, 0.1])
@pytest.mark.parametrize("chunk_rows", [None, 1, 8])  # one chunk; a row at a time; several, the last one short
@pytest.mark.parametrize("size", [1.0, 8.0])  # logits within +-18: exp needs no shift; up to +-140: it overflows
def test_output_layer_matches_the_full_logits_in_fp32(z_loss, chunk_rows, size):
    x, weight, targets = output_layer_inputs()
    x = (x * size).detach()
    fused = losses_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=chunk_rows), x, weight, targets, z_loss)
    reference = losses_and_grads(reference_losses, x, weight, targets, z_loss)
    for got, want in zip(fused, reference, strict=True):  # (fp32 rounds a logit of size s by s * 6e-8)
        scale = size * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=2e-6 * size, atol=2e-7 * scale)
    assert (fused[0] > fused[1]) == (z_loss > 0)  # the z-loss is in the loss, not in the cross-entropy


def test_output_layer_gradient_is_scaled_by_the_incoming_gradient():
    x, weight, targets = output_layer_inputs()
    once = losses_and_grads(linear_cross_entropy, x, weight, targets, 1e-4)
    thrice = losses_and_grads(linear_cross_entropy, x, weight, targets, 1e-4, scale=3.0)
    torch.testing.assert_close(thrice[2], 3 * once[2])
    torch.testing.assert_close(thrice[3], 3 * once[3])


def test_output_layer_under_bf16_autocast_matches_bf16_logits():
    """Matmuls in bf16 as F.linear's under autocast, softmax statistics in fp32, fp32 gradients out."""
    x, weight, targets = output_layer_inputs(n=64, c=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = losses_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=16), x, weight, targets, 1e-4)
        reference = losses_and_grads(reference_losses, x, weight, targets, 1e-4)
    assert fused[2].dtype == fused[3].dtype == torch.float32
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-3, atol=1e-3)
    for got, want in zip(fused[2:], reference[2:], strict=True):  # bf16 rounding of the logits' gradient
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())
    fp32 = losses_and_grads(reference_losses, x, weight, targets, 1e-4)
    torch.testing.assert_close(fused[0], fp32[0], rtol=0.02, atol=0.02)


def assert_gradients_match_finite_differences(fn, inputs, eps=1e-6, samples=300):
    """fn(*inputs) -> tensors; the gradient of a random weighting of them, from one backward (the fused
    functions support no second backward through a graph, which torch.autograd.gradcheck needs), against
    central differences of (up to `samples` random) elements of each input."""
    gen = torch.Generator().manual_seed(1)
    inputs = [t.detach().requires_grad_() for t in inputs]
    outputs = fn(*inputs)
    weights = [torch.randn(out.shape, generator=gen, dtype=out.dtype) for out in outputs]
    torch.autograd.backward(outputs, weights)

    def objective():
        with torch.no_grad():
            return sum((out * w).sum() for out, w in zip(fn(*inputs), weights, strict=True)).item()

    for tensor in inputs:
        flat = tensor.data.view(-1)
        elements = torch.randperm(flat.numel(), generator=gen)[:samples]
        numerical = torch.empty(len(elements), dtype=tensor.dtype)
        for j, i in enumerate(elements.tolist()):
            original = flat[i].item()
            flat[i] = original + eps
            up = objective()
            flat[i] = original - eps
            down = objective()
            flat[i] = original
            numerical[j] = (up - down) / (2 * eps)
        torch.testing.assert_close(tensor.grad.view(-1)[elements], numerical, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("z_loss", [0.0, 0.05])
def test_output_layer_gradients_match_finite_differences_in_float64(z_loss):
    x, weight, targets = output_layer_inputs(n=9, c=5, v=7, dtype=torch.float64)
    assert_gradients_match_finite_differences(lambda a, w: linear_cross_entropy(a, w, targets, z_loss, 4)[:1],
                                              [x, weight])


def test_output_layer_never_holds_all_the_logits():
    """The peak of forward and backward is about one chunk of logits, not all of them."""
    torch.manual_seed(0)
    n, v = 1024, 4096
    x, weight = torch.randn(n, 32, requires_grad=True), torch.randn(v, 32, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    full_logits = n * v * 4
    chunk = 128 * v * 4

    def fused():
        linear_cross_entropy(x, weight, targets, 1e-4, chunk_rows=128)[0].backward()

    def reference():
        reference_losses(x, weight, targets, 1e-4)[0].backward()

    fused_peak, reference_peak = peak_bytes_of(fused, x.device), peak_bytes_of(reference, x.device)
    assert reference_peak >= 2 * full_logits  # the measure sees the logits and their gradient
    gradients = (x.numel() + 2 * weight.numel()) * 4  # dL/dx, dL/dW and its fp32 accumulator
    assert chunk < fused_peak < 2 * chunk + gradients + 2**20


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_eval_does_no_gradient_work():
    x, weight, targets = output_layer_inputs(n=64)
    with OpCounter() as train:
        linear_cross_entropy(x, weight, targets, 1e-4, chunk_rows=16)
    with torch.no_grad(), OpCounter() as evaluation:
        loss, ce = linear_cross_entropy(x, weight, targets, 1e-4, chunk_rows=16)
    matmuls = ("mm", "addmm", "addmm_")
    assert sum(train.ops.count(op) for op in matmuls) == 3 * 4  # logits, dL/dx, dL/dW for each of 4 chunks
    assert sum(evaluation.ops.count(op) for op in matmuls) == 4  # the logits alone
    assert "scatter_add_" not in evaluation.ops
    torch.testing.assert_close(loss, reference_losses(x, weight, targets, 1e-4)[0].detach())


@pytest.mark.parametrize("size", [1.0, 8.0])
def test_output_layer_takes_the_max_only_when_exp_could_overflow(size):
    """On a CPU the max pass is skipped when the Cauchy-Schwarz bound on the logits is small (fused.py)."""
    x, weight, targets = output_layer_inputs(n=64)
    x = x * size  # the bound max ||x_i|| max ||W_j||: about 38 at size 1, 300 at size 8
    with OpCounter() as ops:
        linear_cross_entropy(x, weight, targets, 1e-4, chunk_rows=16)
    assert ops.ops.count("amax") == (4 if size > 1 else 0)


# ----------------------------------------------------------------------------- the switch, end to end

@pytest.mark.parametrize("overrides", [
    {},  # PaLM: parallel, SwiGLU, multi-query, RoPE
    {"parallel_block": False, "mlp": "gelu", "pos_emb": "learned", "n_kv_head": 4, "bias": True},  # GPT-2's
    {"n_kv_head": 2, "head_dim": 12, "tie_embeddings": False, "logit_scale": False},
], ids=["palm", "gpt2", "gqa-untied"])
def test_fused_is_a_drop_in_for_the_models_plain_lines(overrides):
    """PaLMConfig.fused swaps fused.py in for model.py's plain lines: the same loss, cross-entropy and gradient
    of every parameter, in fp32 to float rounding."""
    torch.manual_seed(0)
    config = dict(vocab_size=96, block_size=16, n_layer=2, n_head=4, d_model=32, d_ff=48, dropout=0.0, z_loss=1e-3)
    fused, plain = PaLM(PaLMConfig(**config, **overrides, fused=True)), PaLM(PaLMConfig(**config, **overrides,
                                                                                       fused=False))
    plain.load_state_dict(fused.state_dict())
    idx, targets = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    targets[0, :5] = -1
    results = []
    for model in (fused, plain):
        out = model(idx, targets)
        out.loss.backward()
        results.append((out.loss.detach(), out.ce, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)
    for name, grad in results[1][2].items():
        torch.testing.assert_close(results[0][2][name], grad, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------- the fused projection's pieces

HEAD = 8


def reference_pieces(h, splits, rope):
    """model.py's plain lines for the pieces of h (the blocks' `fused=False` branch): Attention.heads (heads, and
    RoPE on q and k) and MLP.activation (SwiGLU or GELU), called on stand-ins for the modules."""
    pieces = dict(zip(splits, h.split(list(splits.values()), dim=-1), strict=True))
    out = []
    if "q" in pieces:
        out += Attention.heads(SimpleNamespace(head_dim=HEAD), pieces["q"], pieces["k"], pieces["v"], rope)
    if "up" in pieces:
        mlp_inputs = [pieces[name] for name in ("gate", "up") if name in pieces]
        out.append(MLP.activation(SimpleNamespace(swiglu="gate" in pieces), *mlp_inputs))
    return out


LAYOUTS = {
    "parallel, SwiGLU, multi-query": dict(q=4 * HEAD, k=HEAD, v=HEAD, gate=24, up=24),
    "parallel, GELU, 2 K/V heads": dict(q=4 * HEAD, k=2 * HEAD, v=2 * HEAD, up=24),
    "attention alone": dict(q=2 * HEAD, k=2 * HEAD, v=2 * HEAD),
    "SwiGLU alone": dict(gate=24, up=24),
    "GELU alone": dict(up=24),
}


def pieces_and_grads(fn, x, weight, splits, rope, grads):
    """The pieces of h = x W^T (h a temporary, as in the model) and the gradients of x and W."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    pieces = fn(x @ weight.T, splits, rope)
    outputs = [p.detach().clone() for p in pieces]
    torch.autograd.backward(pieces, grads)
    return outputs, x.grad, weight.grad


def projection_inputs(splits, dtype=torch.float32, T=6):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, T, 16, generator=gen, dtype=dtype)
    weight = torch.randn(sum(splits.values()), 16, generator=gen, dtype=dtype) / 4
    return x, weight, gen


@pytest.mark.parametrize("with_rope", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_projection_matches_the_unfused_pieces_in_fp32(layout, with_rope):
    splits = LAYOUTS[layout]
    x, weight, gen = projection_inputs(splits)
    rope = rope_tables(HEAD, 6, 10000.0) if with_rope else None
    want = reference_pieces(x @ weight.T, splits, rope)
    grads = [torch.randn(p.shape, generator=gen) for p in want]
    fused = pieces_and_grads(lambda h, s, r: split_projection(h, s, HEAD, r), x, weight, splits, rope, grads)
    unfused = pieces_and_grads(reference_pieces, x, weight, splits, rope, grads)
    for got, expected in zip([*fused[0], *fused[1:]], [*unfused[0], *unfused[1:]], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["parallel, SwiGLU, multi-query", "parallel, GELU, 2 K/V heads"])
def test_split_projection_gradients_match_finite_differences_in_float64(layout):
    splits = LAYOUTS[layout]
    x, weight, _ = projection_inputs(splits, torch.float64, T=3)
    rope = tuple(t.double() for t in rope_tables(HEAD, 3, 10000.0))
    assert_gradients_match_finite_differences(lambda a, w: split_projection(a @ w.T, splits, HEAD, rope),
                                              [x, weight])


def test_split_projection_under_bf16_matches_the_unfused_pieces():
    splits = LAYOUTS["parallel, SwiGLU, multi-query"]
    x, weight, gen = projection_inputs(splits)
    rope = rope_tables(HEAD, 6, 10000.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference_pieces(x @ weight.T, splits, rope)
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in want]
        fused = pieces_and_grads(lambda h, s, r: split_projection(h, s, HEAD, r), x, weight, splits, rope, grads)
        unfused = pieces_and_grads(reference_pieces, x, weight, splits, rope, grads)
    for got, expected in zip([*fused[0], *fused[1:]], [*unfused[0], *unfused[1:]], strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=0.02, atol=0.05)


def test_split_projection_backward_writes_into_h_without_a_concatenation():
    splits = LAYOUTS["parallel, SwiGLU, multi-query"]
    x, weight, gen = projection_inputs(splits)
    h = x @ weight.requires_grad_().T
    pieces = split_projection(h, splits, HEAD, rope_tables(HEAD, 6, 10000.0))
    storage = []
    h.register_hook(lambda grad: storage.append(grad.untyped_storage().data_ptr()))
    with OpCounter() as backward:
        torch.autograd.backward(pieces, [torch.randn(p.shape, generator=gen) for p in pieces])
    assert storage == [h.untyped_storage().data_ptr()]  # h's gradient is written into h itself
    assert not {"cat", "neg", "empty", "empty_like", "new_empty"} & set(backward.ops)


def test_a_second_backward_through_the_pieces_raises_instead_of_reading_a_gradient_as_h():
    splits = LAYOUTS["SwiGLU alone"]
    x, weight, _ = projection_inputs(splits)
    (hidden,) = split_projection(x @ weight.requires_grad_().T, splits, HEAD, None)
    hidden.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        hidden.sum().backward()


def test_split_projection_without_grad_holds_one_d_ff_tensor_and_gives_the_same_pieces():
    """Evaluation and generation save nothing for a backward: SwiGLU writes its product over silu(gate), so
    the call's peak is its outputs alone, rotated q and k and one d_ff-wide hidden (with grad, silu(gate)
    is kept for the backward: one d_ff tensor more)."""
    splits = LAYOUTS["parallel, SwiGLU, multi-query"]
    x, weight, _ = projection_inputs(splits, T=64)
    rope = rope_tables(HEAD, 64, 10000.0)
    h = x @ weight.T
    outputs = (2 * 64 * 5 * HEAD + 2 * 64 * 24) * 4  # q and k (4 + 1 heads), hidden (d_ff 24); fp32
    with torch.no_grad():
        assert peak_bytes_of(lambda: split_projection(h, splits, HEAD, rope), h.device) == outputs
        pieces = split_projection(h, splits, HEAD, rope)
    h.requires_grad_()
    assert peak_bytes_of(lambda: split_projection(h, splits, HEAD, rope), h.device) == outputs + 2 * 64 * 24 * 4
    for got, expected in zip(pieces, split_projection(h, splits, HEAD, rope), strict=True):
        assert torch.equal(got, expected)


def test_rope_inverse_undoes_the_rotation_and_preserves_the_norm():
    cos, sin = rope_tables(16, 10, 10000.0)
    x = torch.randn(10, 16)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(apply_rope(rotated, cos, sin, inverse=True), x)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.slow  # ~30 s of compilation on 2 cores
def test_compiled_blocks_match_eager_without_graph_breaks():
    """train.py --compile: each block compiled (compile_blocks); split_projection gives inductor plain ops."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    config = PaLMConfig(vocab_size=128, block_size=32, n_layer=2, n_head=4, head_dim=16, d_model=64)
    eager, compiled = PaLM(config), PaLM(config)
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    x, y = torch.randint(128, (2, 32)), torch.randint(128, (2, 32))
    for model in (eager, compiled):
        model(x, y).loss.backward()
    assert not torch._dynamo.utils.counters["graph_break"]
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
