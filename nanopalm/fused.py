"""The model's two fused pieces, each a torch.autograd.Function in plain PyTorch (no custom kernels): the
output layer with its losses, and the elementwise work between a block's input projection and its matmuls.

1. linear_cross_entropy: the output layer, cross-entropy and z-loss, never holding all the logits.
For hidden states x (N, C), the output matrix W (V, C) and targets t (N,), the training loss is

    logits = x W^T                                  (N, V)
    lse_i  = m_i + log s_i,  m_i = max_j logits_ij,  s_i = sum_j exp(logits_ij - m_i)   (log Z_i)
    ce     = mean_i (lse_i - logits_i,t_i)
    loss   = ce + z_loss * mean_i lse_i^2          (PaLM Section 5: the z-loss pushes log Z to 0)

and its gradient with respect to the logits of row i is (p_i (1 + 2 z_loss lse_i) - onehot(t_i)) / n, with
p_i = exp(logits_i - m_i) / s_i the softmax and n the number of counted targets (a target of -1 counts in
neither term). The function walks over chunks of rows; for each it computes the chunk's logits (transposed,
vocabulary by tokens) into one reused buffer, turns them in place into exp(logits - m) (one exp), reads s
and the chunk's share of the loss, scales the buffer in place into the chunk's logit gradient G, and from
it writes the chunk's rows of dL/dx = G W and adds its term of dL/dW = G^T x.
Any shift m_i gives the same lse; the max only keeps exp from overflowing (and s from vanishing). By
Cauchy-Schwarz |logits_ij| <= ||x_i|| ||W_j||, so when that bound is at most SHIFT_FREE_BOUND (64) for every
row, exp(logits) lies in [e^-64, e^64] and m = 0 is as exact: no max pass and no subtraction pass, two of
the five passes over each chunk. The bound is checked once per call where reading it costs nothing (a CPU);
on a GPU, where passes over memory are cheap and a host sync is not, the max is always taken.
The gradients are computed in the forward pass (when grad is enabled) and scaled by the incoming gradient
in backward: no logits are recomputed, so it costs the same three matmuls as the unfused layer, with fewer
passes over the logits and only one chunk of them in memory (all of them are 17 GB in fp32 for 8 x 2048
tokens at PaLM's 256k vocabulary). Under autocast the matmuls run in the autocast dtype, as F.linear's would,
and the softmax statistics in fp32.

2. split_projection: a block's fused input projection h = LN(x) [Wq Wk Wv Wgate Wup]^T (PaLM Section 2:
one matmul for both branches of the parallel block) cut into its pieces, with each piece's elementwise
function applied on the way:
  - RoPE on q and k together (they sit side by side in h). Pairing dimension i with i + D/2 (the "rotate
    half" layout), position p rotates each pair by p * theta_i:
        (a, b) -> (a cos - b sin, b cos + a sin)
    a linear map whose transpose is the rotation by -p theta_i, so its backward needs only the angles;
  - v unchanged;
  - SwiGLU (Shazeer 2020): hidden = silu(gate) * up, silu(g) = g sigmoid(g), whose gradients are
        d/dup = grad * silu(gate),  d/dgate = grad * up * silu'(gate),  silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)
    so it keeps gate and up (already in h) and silu(gate), which spares the backward an exp pass over the
    d_ff columns for d_ff more numbers kept per token (without a backward to come, in evaluation and
    generation, the product is written over silu(gate) instead); or GELU (tanh form) on up alone (GPT-2).
Autograd would give each piece its own gradient and then concatenate them into h's gradient (the backward
of a split is a cat), after RoPE's own cat and negation. Here the backward writes every piece's gradient
straight into its columns of h itself, which nothing needs once the pieces' gradients are known: no cat,
no new buffer. (A second backward through the same graph therefore raises, as for any tensor modified in
place after it was saved.) Under torch.compile it returns the same pieces from plain operations instead:
inductor fuses those, forward and backward, by itself, and cannot trace writes into a tensor's halves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits held at once: on a CPU 16 MiB, below glibc's largest mmap threshold (32 MiB; at 32 every call mapped
# its buffer afresh and page-faulted through it, 8,192 faults of 4 KiB), on a GPU long matmuls. At least
# MIN_CHUNK_ROWS rows, so that a huge vocabulary still gets real matmuls: at 256k that is 256 MiB of fp32
# logits, against 2 GiB a sequence of 2048 tokens unchunked.
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 25}  # 16 MiB / 128 MiB of fp32 logits
MIN_CHUNK_ROWS = 256
# |logit| bound under which exp(logits) needs no shift: e^64 * 2^20 (a million words) stays below fp32's
# largest number (e^88.7), and e^-64 far above its smallest normal one (e^-87.3).
SHIFT_FREE_BOUND = 64.0
# Devices where reading a number back costs no wait for queued work: only there is the bound checked.
HOST_READS_ARE_FREE = {"cpu"}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float,
                chunk_rows: int, need_grad_x: bool, need_grad_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _compute_dtype(x)
        stats = torch.promote_types(dtype, torch.float32)  # softmax statistics in fp32 at least
        with torch.autocast(x.device.type, enabled=False):
            w, xs = weight.to(dtype), x.to(dtype)
            valid = targets != -1
            count = valid.sum().to(stats)
            grad_x = torch.empty_like(xs) if need_grad_x else None
            grad_w = torch.zeros_like(weight, dtype=stats) if need_grad_w else None
            ce_sum = torch.zeros((), device=x.device, dtype=stats)
            z_sum = torch.zeros((), device=x.device, dtype=stats)
            vocab = w.shape[0]
            buffer = torch.empty(vocab * min(chunk_rows, x.shape[0]), device=x.device, dtype=dtype)
            shift = x.device.type not in HOST_READS_ARE_FREE or _logit_bound(xs, w, stats) > SHIFT_FREE_BOUND
            for start in range(0, x.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                x_c, keep, index = xs[rows], valid[rows], targets[rows].clamp_min(0)[None]
                # The chunk's logits, transposed: (V, n), one column a token (W x^T runs ~15% faster than
                # x W^T on a CPU). The only logits alive at a time.
                logits = torch.mm(w, x_c.T, out=buffer[:vocab * x_c.shape[0]].view(vocab, -1)).to(stats)
                target_logit = logits.gather(0, index).squeeze(0)
                top = logits.amax(dim=0) if shift else None
                exp = (logits.sub_(top) if shift else logits).exp_()  # in place: exp(logits - m)
                total = exp.sum(dim=0)
                lse = total.log() + top if shift else total.log()
                ce_sum += torch.where(keep, lse - target_logit, 0.0).sum()
                z_sum += torch.where(keep, lse.square(), 0.0).sum()
                if grad_x is None and grad_w is None:
                    continue
                # dL/dlogits in place of exp: p (1 + 2 z lse) / n - onehot / n, rows of -1 targets zero.
                scale = torch.where(keep, (1.0 + 2.0 * z_loss * lse) / (count * total), 0.0)
                grad = exp.mul_(scale)
                grad.scatter_add_(0, index, torch.where(keep, -1.0 / count, 0.0)[None])
                grad = grad.to(dtype)  # (V, n)
                if grad_x is not None:
                    torch.mm(grad.T, w, out=grad_x[rows])
                if grad_w is not None and dtype == stats:
                    grad_w.addmm_(grad, x_c)
                elif grad_w is not None:  # a bf16/fp16 matmul, accumulated in fp32 over the chunks
                    grad_w += (grad @ x_c).to(stats)
            ce = ce_sum / count
            loss = ce + z_loss * z_sum / count
        ctx.save_for_backward(grad_x, grad_w)
        ctx.dtypes = x.dtype, weight.dtype
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_ce: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        if grad_x is not None:  # (the saved gradients are scaled in place: nothing else holds them)
            grad_x = grad_x.mul_(grad_loss.to(grad_x.dtype)).to(x_dtype)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(w_dtype)
        return grad_x, grad_w, None, None, None, None, None


def _logit_bound(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> float:
    """max_ij |x_i . W_j| <= max_i ||x_i|| max_j ||W_j|| (Cauchy-Schwarz), with norms in `dtype`."""
    norms = [torch.linalg.vector_norm(t, dim=1, dtype=dtype).max() for t in (x, weight)]
    return (norms[0] * norms[1]).item()


def default_chunk_rows(vocab_size: int, device_type: str) -> int:
    """Rows of logits computed at once on `device_type` (CHUNK_ELEMENTS, at least MIN_CHUNK_ROWS)."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS.get(device_type, CHUNK_ELEMENTS["cuda"]) // vocab_size)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0,
                         chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, cross-entropy) of the logits x @ weight.T against targets, chunk by chunk.

    x (N, C), weight (V, C), targets (N,) with -1 for positions not counted. The cross-entropy is for
    reporting: only the training loss (cross-entropy plus z-loss) carries a gradient. With grad disabled
    (evaluation) no gradient work is done at all.
    """
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], x.device.type)
    grad = torch.is_grad_enabled()  # (inside forward grad mode is always off: decide here)
    return _LinearCrossEntropy.apply(x, weight, targets, z_loss, chunk_rows, grad and x.requires_grad,
                                     grad and weight.requires_grad)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None,
               inverse: bool = False) -> torch.Tensor:
    """Rotate the pairs (x[..., i], x[..., i + D/2]) by the angles whose cos and sin are given (..., D/2),
    broadcast against x's halves; `inverse` rotates by minus the angles (RoPE's backward).

    Into `out` (four passes over halves, no temporaries), or without it as plain operations, the form
    torch.compile wants (it fuses them into one kernel, but cannot trace writes into the halves of `out`).
    """
    sign = -1.0 if inverse else 1.0
    a, b = x.chunk(2, dim=-1)
    if out is None:
        return torch.cat([a * cos - sign * b * sin, b * cos + sign * a * sin], dim=-1)
    out_a, out_b = out.chunk(2, dim=-1)
    torch.mul(a, cos, out=out_a).addcmul_(b, sin, value=-sign)  # a cos - b sin
    torch.mul(b, cos, out=out_b).addcmul_(a, sin, value=sign)  # b cos + a sin
    return out


def _swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, silu: torch.Tensor) -> None:
    """Overwrite gate and up with the gradients of silu(gate) * up, given silu(gate) (no temporary)."""
    up.mul_(grad)  # grad * up: the gradient of silu(gate)
    torch.ops.aten.silu_backward.grad_input(up, gate, grad_input=gate)  # times silu'(gate), into gate
    torch.mul(grad, silu, out=up)


def _pieces(h: torch.Tensor, columns: dict[str, slice], head_dim: int, cos: torch.Tensor | None,
            sin: torch.Tensor | None, compiling: bool,
            keep_silu: bool) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """The pieces of h, each with its function (split_projection's forward), and silu(gate) for the
    backward when there is a gate and `keep_silu` (else SwiGLU's product is written over it: one d_ff-wide
    tensor, not two)."""
    pieces, silu = [], None
    if "q" in columns:
        qk = _heads(h, columns["q"].start, columns["k"].stop, head_dim)  # (B, T, H + K, D): q and k together
        if cos is not None:
            out = None if compiling else torch.empty(qk.shape, dtype=h.dtype, device=h.device)
            qk = apply_rope(qk, cos[:, None], sin[:, None], out)
        n_q = (columns["q"].stop - columns["q"].start) // head_dim
        v = _heads(h, columns["v"].start, columns["v"].stop, head_dim)
        pieces += [qk[:, :, :n_q].transpose(1, 2), qk[:, :, n_q:].transpose(1, 2), v.transpose(1, 2)]
    if "gate" in columns:
        silu = F.silu(h[..., columns["gate"]])
        pieces.append(silu * h[..., columns["up"]] if keep_silu else silu.mul_(h[..., columns["up"]]))
        silu = silu if keep_silu else None
    elif "up" in columns:
        pieces.append(F.gelu(h[..., columns["up"]], approximate="tanh"))
    return tuple(pieces), silu


class _SplitProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                splits: tuple[tuple[str, int], ...], head_dim: int) -> tuple[torch.Tensor, ...]:
        ctx.columns, ctx.head_dim = _columns(splits), head_dim
        pieces, silu = _pieces(h, ctx.columns, head_dim, cos, sin, compiling=False, keep_silu=True)
        ctx.save_for_backward(h, cos, sin, silu)
        return pieces

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        h, cos, sin, silu = ctx.saved_tensors
        columns, head_dim = ctx.columns, ctx.head_dim
        grad_h = h.detach()  # each piece's gradient overwrites its own columns, once they are read
        grads = list(grads)
        if "q" in columns:
            for name in ("q", "k", "v"):
                grad = grads.pop(0).transpose(1, 2)  # (B, T, heads, D), as the columns of h
                slot = _heads(grad_h, columns[name].start, columns[name].stop, head_dim)
                if name != "v" and cos is not None:
                    apply_rope(grad, cos[:, None], sin[:, None], slot, inverse=True)
                else:
                    slot.copy_(grad)
        if "gate" in columns:
            _swiglu_backward(grads[0], grad_h[..., columns["gate"]], grad_h[..., columns["up"]], silu)
        elif "up" in columns:
            up = grad_h[..., columns["up"]]
            torch.ops.aten.gelu_backward.grad_input(grads[0], up, approximate="tanh", grad_input=up)
        return grad_h, None, None, None, None


def _columns(splits: tuple[tuple[str, int], ...]) -> dict[str, slice]:
    bounds, start = {}, 0
    for name, size in splits:
        bounds[name] = slice(start, start + size)
        start += size
    return bounds


def _heads(h: torch.Tensor, start: int, stop: int, head_dim: int) -> torch.Tensor:
    """Columns start:stop of h (B, T, N) as heads: a (B, T, heads, head_dim) view."""
    return h[..., start:stop].unflatten(-1, (-1, head_dim))


def split_projection(h: torch.Tensor, splits: dict[str, int], head_dim: int,
                     rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    """Cut a fused projection's output h (B, T, N) into its pieces, each with its elementwise function.

    `splits` names h's columns in order, a subset of q, k, v, gate, up (q, k, v together or not at all;
    up with or without gate). Returns q (B, H, T, D) and k (B, K, T, D) rotated by RoPE when `rope` (its
    cos and sin tables, (T, D/2) each) is given, v (B, K, T, D), then the MLP's hidden activation:
    silu(gate) * up with a gate, GELU(up) without. The backward overwrites h with its own gradient.
    """
    if "q" in splits and list(splits)[:3] != ["q", "k", "v"]:
        raise ValueError(f"q, k and v must come first and in that order, not {list(splits)}")
    cos, sin = rope if rope is not None else (None, None)
    columns = _columns(tuple(splits.items()))
    if torch.compiler.is_compiling():  # plain operations: inductor fuses them (silu and the product into one
        return _pieces(h, columns, head_dim, cos, sin, compiling=True, keep_silu=True)[0]  # kernel) by itself
    if not (torch.is_grad_enabled() and h.requires_grad):  # evaluation, generation: no backward to come
        return _pieces(h, columns, head_dim, cos, sin, compiling=False, keep_silu=False)[0]
    return _SplitProjection.apply(h, cos, sin, tuple(splits.items()), head_dim)
