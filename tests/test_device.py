"""Every device and precision decision, on this CPU: what `auto` picks, what each dtype means for autocast, FSDP2
and loss scaling, and the one-line errors (the CUDA side is in tests/gpu/test_cuda.py)."""

import time

import pytest
import torch

from nanopalm import device as dev
from nanopalm.errors import UserError

CPU = torch.device("cpu")


def test_auto_on_a_machine_without_a_gpu_is_the_cpu_and_names_are_checked():
    assert dev.pick_device("auto") == CPU and dev.pick_device("cpu") == CPU
    with pytest.raises(UserError, match="unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"):
        dev.pick_device("tpu")
    with pytest.raises(UserError, match="device cuda was asked for but no CUDA GPU is visible"):
        dev.pick_device("cuda:0")


@pytest.mark.parametrize("fast", [True, False])
def test_auto_trains_in_bf16_exactly_where_this_cpus_bf16_is_fast(fast, monkeypatch):
    monkeypatch.setattr(dev, "cpu_bf16_is_fast", lambda: fast)
    assert dev.pick_precision("auto", CPU).dtype == (torch.bfloat16 if fast else torch.float32)
    assert dev.inference_precision("auto", CPU).dtype == torch.float32  # sampling and eval: fp32 on a CPU


def test_each_dtype_sets_autocast_fsdp_casting_and_loss_scaling():
    fp32, bf16, fp16 = (dev.pick_precision(name, CPU) for name in ("float32", "bfloat16", "float16"))
    assert (fp32.autocast_dtype, bf16.autocast_dtype, fp16.autocast_dtype) == (torch.float32, torch.bfloat16,
                                                                              torch.float16)
    assert (fp32.grad_scaler, bf16.grad_scaler, fp16.grad_scaler) == (False, False, True)
    with fp32.autocast(CPU):
        assert not torch.is_autocast_enabled("cpu")
    with bf16.autocast(CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    sharded = dev.pick_precision("bfloat16", CPU, sharded=True)  # FSDP2 casts the weights itself: no autocast
    assert sharded.fsdp_param_dtype == torch.bfloat16 and sharded.autocast_dtype == torch.float32
    with sharded.autocast(CPU, for_generation=True):  # generation runs outside FSDP's casting
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(UserError, match="--fsdp=True trains in bfloat16 or float32, not float16"):
        dev.pick_precision("float16", CPU, sharded=True)


@pytest.mark.parametrize("bf16_time, expected", [(10.0, False), (0.9, False), (0.5, True)])
def test_the_bf16_speed_check_asks_for_a_real_gain(bf16_time, expected, monkeypatch):
    """On a clock the test moves: a bf16 matmul taking 10x fp32's time (emulated bf16) is not fast, nor one at
    0.9x (not worth autocast's casts); one at half the time is."""
    clock = [0.0]

    def matmul(a, b):
        clock[0] += bf16_time if a.dtype == torch.bfloat16 else 1.0
        return a

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    dev.cpu_bf16_is_fast.cache_clear()
    try:
        assert dev.cpu_bf16_is_fast() is expected
    finally:
        dev.cpu_bf16_is_fast.cache_clear()


def test_free_memory_on_linux_is_what_the_kernel_says_is_available():
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert abs(dev.free_memory(CPU) - available) < 2**30  # read a moment apart
