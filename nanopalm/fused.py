"""The output layer, cross-entropy and z-loss in one function that never holds the full logits.

For hidden states x (N, C), the output matrix W (V, C) and targets t (N,), the training loss is

    logits = x W^T                    (N, V)
    lse_i  = log sum_j exp(logits_ij)   (log Z, the softmax normaliser)
    ce     = mean_i (lse_i - logits_i,t_i)
    loss   = ce + z_loss * mean_i lse_i^2     (PaLM Section 5: the z-loss pushes log Z to 0)

and its gradient with respect to the logits of row i is (softmax_i * (1 + 2 z_loss lse_i) - onehot(t_i)) / n,
n the number of counted targets (a target of -1 is ignored). So the function walks over chunks of rows:
it computes a chunk's logits, its share of the loss, the chunk's logit gradient, and from it the chunk's
rows of dL/dx = G W and its term of dL/dW = G^T x, then drops the chunk's logits. Peak memory is one chunk
of logits instead of all N x V of them (17 GB in fp32 for 8 x 2048 tokens at PaLM's 256k vocabulary).

The gradients are computed in the forward pass, when grad is enabled, and scaled by the incoming gradient
in backward: no logits are recomputed, so it costs the same three matmuls as the unfused layer. Pure
PyTorch, no custom kernels. Under autocast the matmuls run in the autocast dtype, as F.linear's would,
and the softmax statistics in fp32.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 25  # logits held at once: 128 MiB in fp32, whatever the vocabulary


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float,
                chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _compute_dtype(x)
        stats = torch.promote_types(dtype, torch.float32)  # softmax statistics in fp32 at least
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype)
            valid = targets != -1
            count = valid.sum().to(stats)
            need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros_like(weight, dtype=stats) if ctx.needs_input_grad[1] else None
            ce_sum = torch.zeros((), device=x.device, dtype=stats)
            z_sum = torch.zeros((), device=x.device, dtype=stats)
            for start in range(0, x.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                x_c, t_c, keep = x[rows].to(dtype), targets[rows], valid[rows]
                logits = (x_c @ w.T).to(stats)  # (n, V): the only logits alive at a time
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                index = t_c.clamp_min(0)[:, None]
                target_logit = logits.gather(-1, index).squeeze(-1)
                ce_sum += torch.where(keep, lse - target_logit, 0.0).sum()
                z_sum += torch.where(keep, lse.square(), 0.0).sum()
                if not need_grad:
                    continue
                # dL/dlogits for this chunk, in place of its logits: softmax (1 + 2 z lse) - onehot, masked.
                scale = torch.where(keep, (1.0 + 2.0 * z_loss * lse) / count, 0.0)
                grad = logits.sub_(lse[:, None]).exp_().mul_(scale[:, None])
                grad.scatter_add_(-1, index, torch.where(keep, -1.0 / count, 0.0)[:, None])
                grad = grad.to(dtype)
                if grad_x is not None:
                    grad_x[rows] = grad @ w
                if grad_w is not None and dtype == stats:
                    grad_w.addmm_(grad.T, x_c)
                elif grad_w is not None:  # a bf16/fp16 matmul, accumulated in fp32 over the chunks
                    grad_w += (grad.T @ x_c).to(stats)
            ce = ce_sum / count
            total = ce + z_loss * z_sum / count
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce)
        return total, ce

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, grad_ce: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        if grad_x is not None:
            grad_x = grad_x * grad_total.to(grad_x.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.weight_dtype)
        return grad_x, grad_w, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0,
                         chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, cross-entropy) of the logits x @ weight.T against targets, chunk by chunk.

    x (N, C), weight (V, C), targets (N,) with -1 for positions not counted. The cross-entropy is for
    reporting: only the training loss (cross-entropy plus z-loss) carries a gradient.
    """
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(x, weight, targets, z_loss, rows)
