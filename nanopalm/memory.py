"""The memory of a training run per GPU, estimated before it starts: one estimator, for the planner
(`python bench.py memory --preset=PRESET --world_size=8 --gpu_memory=80`) and for the trainer.

A step holds, per GPU (docs/BENCHMARKS.md, "Memory planner", has the measurements behind each line):
  parameters   fp32 master weights, 1/world_size of them under FSDP2 (rows padded to equal shards), plus
               what FSDP2 all-gathers: the root (embedding and final norm) for the whole step and two
               blocks at a time, in the compute dtype
  gradients    fp32, one per trained parameter: DDP's all-reduce buckets (always allocated), FSDP2's shards
  optimizer    AdamW's two moments, or PaLM's Adafactor's v and m (nanopalm/optim.py): 8 bytes a trained
               parameter (LoRA: the adapters alone; the frozen base has neither)
  activations  what the backward needs from the forward of one micro-batch, counted tensor by tensor as
               model.py computes them, for each activation-checkpointing mode
  temporary    the output layer's own gradients and one chunk of logits (fused.py), a block's recomputation
               and activation gradients in the backward, autocast's copies of the weights, the optimizer's
               foreach intermediates
The peak is the largest total at five moments of a step: the output layer's forward (the end of the
forward), its backward, the backward of the last block and of the first, and the optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from nanopalm.config import RunConfig
from nanopalm.device import Precision
from nanopalm.distributed import DistInfo
from nanopalm.fused import default_chunk_rows
from nanopalm.lora import parse_targets
from nanopalm.model import PaLM, PaLMConfig

GIB = 1 << 30


@dataclass(frozen=True)
class Setup:
    """What decides a run's memory besides the micro-batch: the model and how it is trained."""

    model: PaLMConfig
    world_size: int = 1
    fsdp: bool = False
    optimizer: str = "adamw"  # adamw | adafactor
    dtype: torch.dtype = torch.bfloat16  # the training dtype (Precision.dtype): fp32 or mixed bf16 / fp16
    activation_checkpointing: str = "none"  # none | full | selective (distributed.checkpoint_activations)
    accumulate: bool = True  # several micro-batches a step: the gradients live through the forward
    device: str = "cuda"

    @classmethod
    def of_run(cls, cfg: RunConfig, info: DistInfo, precision: Precision, device: torch.device) -> Setup:
        """The setup of a run as the trainer builds it (call before the first step)."""
        micro_steps = cfg.train.gradient_accumulation_steps // info.world_size
        return cls(cfg.model, info.world_size, info.sharded, cfg.optim.optimizer, precision.dtype,
                   cfg.train.activation_checkpointing, micro_steps > 1 or bool(cfg.optim.batch_ramp), device.type)

    @property
    def sharded(self) -> bool:
        return self.fsdp and self.world_size > 1

    @property
    def compute_bytes(self) -> int:
        """Bytes of an activation computed by a matmul: the autocast (or FSDP2 param) dtype's."""
        return self.dtype.itemsize

    @property
    def residual_bytes(self) -> int:
        """The residual stream: fp32 under autocast (fp32 x plus a bf16 branch), bf16 under FSDP2's bf16."""
        return self.dtype.itemsize if self.sharded else 4

    @property
    def flash(self) -> bool:
        """Whether SDPA takes a kernel that keeps O(T) per query (flash, memory-efficient, CPU flash) rather
        than the math kernel's T x T attention matrices: on CUDA, flash takes bf16/fp16 with multi-query;
        fp32 goes to the memory-efficient kernel, which has no grouped K/V; the CPU's flash has no dropout."""
        if self.device == "cuda":
            return self.dtype != torch.float32 or self.model.n_kv_head == self.model.n_head
        return self.model.dropout == 0


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU at the peak of a step, by kind, and the moment of the step the peak falls on."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    temporary: int
    phase: str

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.temporary


@dataclass(frozen=True)
class _Shapes:
    """The parameter counts that matter, from the model built on the meta device (no memory)."""

    local: int  # the parameters this GPU holds: all, or its FSDP2 shards (rows padded to equal shards)
    block: int  # one block's (all of them: what FSDP2 all-gathers)
    local_block: int  # one block's on this GPU
    root: int  # outside the blocks: embeddings, final norm, untied output layer
    local_root: int
    block_matrices: int  # one block's weight matrices: autocast casts them for its matmuls
    trained: int  # what has gradients and optimizer state on this GPU: all of `local`, or LoRA's adapters
    trained_block: int  # of one block, on this GPU
    trained_root: int


def _shapes(setup: Setup, model: torch.nn.Module | None = None) -> _Shapes:
    """The parameter counts of `model` (FSDP2's DTensors count whole), or of setup.model built on the meta device:
    counted from the module itself, so that a change to model.py cannot leave them wrong. (The first meta-device
    build in a process costs a second, torch's decompositions loading: the trainer passes its built model.)"""
    if model is None:
        with torch.device("meta"):
            model = PaLM(setup.model)
    world = setup.world_size if setup.sharded else 1

    def count(params: list[torch.Tensor], shard: bool = False) -> int:
        return sum(-(-p.shape[0] // world) * (p.numel() // p.shape[0]) if shard else p.numel() for p in params)
    params, block = list(model.parameters()), list(model.blocks[0].parameters())
    root = [p for p in params if all(p is not q for b in model.blocks for q in b.parameters())]
    def trained(group: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p for p in group if p.requires_grad]
    return _Shapes(count(params, True), count(block), count(block, True), count(root), count(root, True),
                   sum(p.numel() for p in block if p.dim() == 2), count(trained(params), True),
                   count(trained(block), True), count(trained(root), True))


def _block_activations(setup: Setup, tokens: int) -> tuple[int, int, int]:
    """For one block and `tokens` tokens, the bytes of: what it keeps for the backward without
    checkpointing; what selective checkpointing keeps of that (its matmul and attention outputs); the
    gradients alive at once in its backward (the widest input projection's and the residual's). The
    block's input, kept in every mode, is in none of them: it is the previous block's output."""
    c, b, r = setup.model, setup.compute_bytes, setup.residual_bytes
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    hidden = 2 * c.d_ff if c.mlp == "swiglu" else c.d_ff  # the MLP's input projections
    drop = (1 if setup.device == "cuda" else r) if c.dropout else 0  # a dropout mask (bool on CUDA)
    rope = (q + kv) * b if c.pos_emb == "rope" else 0  # RoPE's outputs: new tensors, SDPA keeps them
    attention = q * b + 4 * c.n_head  # SDPA's output and its log-sum-exp (fp32)
    if not setup.flash:  # math kernel: scores' softmax, and with dropout its mask and result (fp32 on CPU)
        attention += c.n_head * c.block_size * (4 + 8 * bool(c.dropout)) + 2 * q * b
    mlp = (2 if c.mlp == "swiglu" else 1) * c.d_ff * b  # the activation's output; SwiGLU's silu(gate) too (fused.py)
    norm = c.d_model * b + 8  # LayerNorm's output as the matmul keeps it, and its mean and rstd (fp32)
    outputs = 2 * c.d_model * b  # attention's and the MLP's output projections (kept by selective only)
    if c.parallel_block:  # one LayerNorm, one fused matmul: q, k, v, gate, up
        # The widest gradients: the pieces' (fused.py writes h's own gradient into h, not a new buffer).
        projections, widest = (q + 2 * kv + hidden) * b, q + 2 * kv + c.d_ff
        full = norm + projections + rope + attention + mlp + drop * c.d_model
    else:  # GPT-2's serial block: two norms, two input matmuls, a residual stream in the middle
        projections, widest = (q + 2 * kv + hidden) * b, max(q + 2 * kv, hidden)
        full = 2 * norm + projections + rope + attention + mlp + c.d_model * r + 2 * drop * c.d_model
    if c.lora_rank:  # each adapted layer keeps its r-wide A x per target, and with dropout its dropped input
        targets = parse_targets(c.lora_targets)
        ranks = c.lora_rank * len(targets) * b
        inputs = c.d_model * (1 if c.parallel_block else 2) + c.n_head * c.head_dim + c.d_ff
        dropped = inputs * (b + 1) if c.lora_dropout else 0  # the dropped input, and its (bool) mask
        rows = {"q": q, "k": kv, "v": kv, "o": c.d_model, "gate": c.d_ff, "up": c.d_ff, "down": c.d_model}
        adapted = sum(rows[t] for t in targets if t != "gate" or c.mlp == "swiglu") * b  # B (A x): matmul outputs
        full, outputs = full + ranks + dropped, outputs + ranks + adapted  # (selective keeps them)
        fan_in = {"o": q, "down": c.d_ff}  # the others read the block's normalised input, d_model wide
        widest += max(fan_in.get(t, c.d_model) for t in targets)  # dL/dx through an A: added to the base's
    # The math kernel's matrices come from ops selective checkpointing recomputes (bmm, softmax, dropout).
    kept = projections + outputs + (attention if setup.flash else 0)
    return full * tokens, kept * tokens, (widest * b + c.d_model * r) * tokens


def estimate(setup: Setup, batch_size: int, model: torch.nn.Module | None = None) -> Estimate:
    """Bytes per GPU at the peak of a training step with micro-batches of `batch_size` sequences (`model`: the
    run's, when it is built, else setup.model's shapes are read from a meta-device build)."""
    c, s = setup.model, _shapes(setup, model)
    tokens = batch_size * c.block_size
    b, r = setup.compute_bytes, setup.residual_bytes
    mixed = setup.dtype != torch.float32
    vocab_matrix = c.vocab_size * c.d_model

    rope_tables = c.block_size * c.head_dim * 4 if c.pos_emb == "rope" else 0  # cos and sin, T x D/2 each
    parameters = 4 * s.local + rope_tables  # fp32 weights
    if setup.sharded:  # all-gathered: the root for the whole step, two blocks at a time
        parameters += (s.root + 2 * s.block) * b
    optimizer = 8 * s.trained  # LoRA: the adapters alone have gradients and optimizer state
    gradients = 4 * s.trained
    # DDP's buckets are allocated once and for all; with accumulation the gradients outlive the forward.
    always = gradients if setup.accumulate or (setup.world_size > 1 and not setup.sharded) else 0

    full, kept, gradient_work = _block_activations(setup, tokens)
    per_block = {"none": full, "full": 0, "selective": kept}[setup.activation_checkpointing]
    block_input = c.d_model * r * tokens
    fixed = 2 * 8 * tokens + 8 * tokens  # token ids and targets (int64), the final norm's statistics
    if c.pos_emb == "learned":
        fixed += block_input  # the position embeddings' sum with the token embeddings
    forward = fixed + (c.n_layer + 1) * block_input + c.n_layer * per_block  # all kept at the forward's end
    # The output layer (fused.py): dL/dx (compute dtype) and dL/dW (fp32) computed in the forward, kept for
    # the backward; one reused buffer of a chunk of logits in the compute dtype; in mixed precision also the
    # chunk's fp32 statistics and compute-dtype gradient, a compute-dtype copy of the weight and each chunk's
    # dW term, in the compute dtype then fp32.
    chunk = min(tokens, default_chunk_rows(c.vocab_size, setup.device)) * c.vocab_size
    output_kept = 4 * vocab_matrix * bool(s.trained_root) + b * c.d_model * tokens  # dL/dW: not for a frozen one
    output_forward = output_kept + chunk * b + (chunk * (4 + b) + vocab_matrix * (2 * b + 4) if mixed else 0)
    # Autocast keeps a compute-dtype copy of each block's weight matrices until the forward ends, and without
    # checkpointing the matmuls keep them until their backward; with it, a block's recomputation casts its
    # own again (FSDP2 all-gathers in the compute dtype instead: no autocast).
    casts = s.block_matrices * b if mixed and not setup.sharded else 0
    kept_casts = casts if setup.activation_checkpointing == "none" else 0

    def block_backward(i: int) -> tuple[int, int, int]:
        """Block i's backward, the blocks after it done: their gradients, its activations and work."""
        grads = max(always, 4 * (s.trained_root + (c.n_layer - 1 - i) * s.trained_block))
        return (grads, fixed + (i + 1) * block_input + i * per_block,
                full + gradient_work + casts + i * kept_casts)

    if setup.optimizer == "adafactor":
        step_temporary = 4 * s.trained  # the update, rsqrt(v) * g, for every parameter at once (foreach)
    else:  # fused AdamW on CUDA works in place; the foreach one holds sqrt(exp_avg_sq)
        step_temporary = 0 if setup.device == "cuda" else 4 * s.trained
    phases = {
        "output layer forward": (always, forward, output_forward + c.n_layer * casts),
        "output layer backward": (always, forward, 2 * output_kept + c.n_layer * kept_casts),  # times dL/dloss
        "last block's backward": block_backward(c.n_layer - 1),
        "first block's backward": block_backward(0),
        "optimizer step": (gradients, 0, step_temporary),
    }
    phase = max(phases, key=lambda p: sum(phases[p]))
    grads, activations, temporary = phases[phase]
    return Estimate(parameters, grads, optimizer, activations, temporary, phase)


def largest_batch(setup: Setup, memory_bytes: float, limit: int = 4096) -> int:
    """The largest micro-batch (sequences) whose estimated peak fits in `memory_bytes`; 0 if none does."""
    fits: Callable[[int], bool] = lambda n: estimate(setup, n).total <= memory_bytes  # noqa: E731
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # the total grows with the batch: bisect
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def measure(parts: list[Callable[[], None]], model: torch.nn.Module, optimizer: torch.optim.Optimizer
            ) -> dict[str, int]:
    """The peak bytes of a training step of `model`, called as `parts` one after the other (each
    micro-batch's forward and backward, then the optimizer step), by kind, as PyTorch's MemTracker counts
    them: every tensor's storage from its allocation to its release, on any device (the CPU included,
    which has no allocator statistics). Run a step before: the optimizer's state is made by its first."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        for part in parts:
            part()
            tracker.reset_mod_stats()  # a module runs once a part: MemTracker follows one call at a time
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {str(getattr(kind, "value", kind)): value for kind, value in peak.items()}


def peak_bytes_of(fn: Callable[[], object], device: torch.device) -> int | None:
    """The most bytes of tensor memory fn holds at once, beyond what was allocated before it.

    CUDA: the caching allocator's peak. CPU: torch.profiler (profile_memory=True) records every
    allocation and free of the CPU allocator, temporaries inside an operator included; their running
    sum, in order, peaks at the answer. Exact to the byte and independent of the machine's load, unlike
    the process's resident memory. None on other devices.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):  # nbytes: + allocated, - freed
        held += event.nbytes()
        peak = max(peak, held)
    return peak



__all__ = ["Setup", "Estimate", "estimate", "largest_batch", "measure", "peak_bytes_of", "GIB"]
