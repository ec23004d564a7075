"""Which device and which precision: detected, never assumed."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch

from nanopalm.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA GPU is visible; use --device=cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device mps was asked for but MPS is not available; use --device=cpu or auto")
    return device


def free_memory(device: torch.device) -> int | None:
    """Bytes this device can still give: the GPU's free memory, MPS's recommended limit less what it holds,
    or the RAM the kernel says is available (Linux); None where it cannot tell."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """True when this CPU multiplies bf16 matrices faster than fp32 ones (native bf16, e.g. AVX512-BF16
    or AMX). Measured once, ~0.1 s: some CPUs that report bf16 emulate it hundreds of times slower. Each
    dtype is timed five times, interleaved, and the fastest of each counts: another process busy on the
    same cores slows single timings, not the best of five, so the answer does not depend on the load."""
    a = {dtype: torch.randn(512, 512).to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    best = {dtype: float("inf") for dtype in a}
    try:
        for _ in range(5):
            for dtype, m in a.items():
                start = time.perf_counter()
                m @ m
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    except RuntimeError:
        return False
    return best[torch.bfloat16] < 0.8 * best[torch.float32]


@dataclass(frozen=True)
class Precision:
    """Every precision decision of a run, made once by `pick_precision`.

    dtype: what the run trains in. Weights and optimizer state stay fp32 whatever it is; bf16 and fp16
    are mixed precision. Two ways to get there: autocast around the forward (one process, DDP), or, under
    FSDP2 in bf16, FSDP's MixedPrecisionPolicy, which all-gathers the weights in bf16 (half the traffic)
    and runs the forward in bf16 with no autocast on top, reducing gradients in fp32.
    """

    dtype: torch.dtype
    sharded: bool = False  # FSDP2

    @property
    def autocast_dtype(self) -> torch.dtype:
        """The autocast dtype of training and eval forwards; float32 means no autocast."""
        return torch.float32 if self.fsdp_param_dtype is not None else self.dtype

    @property
    def fsdp_param_dtype(self) -> torch.dtype | None:
        """FSDP2's param_dtype: bf16 when it does the casting, None (no cast) otherwise."""
        return torch.bfloat16 if self.sharded and self.dtype == torch.bfloat16 else None

    @property
    def grad_scaler(self) -> bool:
        """fp16 needs loss scaling (bf16 has fp32's range)."""
        return self.dtype == torch.float16

    def autocast(self, device: torch.device, for_generation: bool = False) -> contextlib.AbstractContextManager:
        """Mixed precision for a forward pass; a no-op in fp32. Generation always autocasts to the run's
        dtype: it runs outside FSDP's casting (and sample.py keeps fp32 weights)."""
        dtype = self.dtype if for_generation else self.autocast_dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)


def pick_precision(name: str, device: torch.device, sharded: bool = False, tf32: bool = True) -> Precision:
    """`auto`: bf16 on CUDA where supported, else fp16 (with a GradScaler); bf16 on a CPU whose bf16 is
    fast; fp32 otherwise (MPS included). On CUDA, fp32 matmuls use TF32 unless tf32=False."""
    if device.type == "cuda":  # TF32: fp32 matmuls on tensor cores with a 10-bit mantissa
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if name != "auto":
        dtype = DTYPES[name]
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bfloat16; use --dtype=float16 or --dtype=auto")
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif device.type == "cpu" and cpu_bf16_is_fast():
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    if sharded and dtype == torch.float16:
        raise UserError("--fsdp=True trains in bfloat16 or float32, not float16 (its loss scaling would have to "
                        "be sharded too): use --dtype=float32, or DDP (--fsdp=False)")
    return Precision(dtype, sharded)


def inference_precision(name: str, device: torch.device) -> Precision:
    """Sampling and evaluation. `auto`: bf16 autocast on CUDA (the weights stay fp32; flash and cuDNN attention
    take only bf16/fp16), fp32 elsewhere, even on a CPU whose bf16 is fast: inference is cheap there, and fp32
    numbers are reproducible."""
    return pick_precision("float32" if name == "auto" and device.type != "cuda" else name, device)
