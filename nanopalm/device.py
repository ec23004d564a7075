"""Which device and which precision: detected, never assumed."""

from __future__ import annotations

import contextlib
import functools
import time

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


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """True when this CPU multiplies bf16 matrices faster than fp32 ones (native bf16, e.g. AVX512-BF16
    or AMX). Measured once, ~0.1 s: some CPUs that report bf16 emulate it hundreds of times slower."""
    def rate(dtype: torch.dtype) -> float:
        a = torch.randn(512, 512).to(dtype)
        a @ a  # warm-up
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        return time.perf_counter() - start
    try:
        return rate(torch.bfloat16) < 0.8 * rate(torch.float32)
    except RuntimeError:
        return False


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA where supported, else fp16 (with a GradScaler); bf16 on a CPU whose bf16 is
    fast; fp32 otherwise (MPS included)."""
    if name != "auto":
        dtype = DTYPES[name]
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bfloat16; use --dtype=float16 or --dtype=auto")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_bf16_is_fast():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op for fp32 (weights stay fp32 either way)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
