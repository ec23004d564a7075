"""Deterministic fault injection, so that tests can fail a run at an exact point instead of hoping for a
lucky timing: NANOPALM_FAULT=POINT:ACTION[:N] acts the N-th time (default 1) the code reaches POINT; under
torchrun, NANOPALM_FAULT_RANK=R limits it to rank R.

    points   checkpoint_write (inside a checkpoint write: weights or this rank's shards written, nothing renamed)
             train_step (before a training step's forward)
    actions  kill     SIGKILL this process: no cleanup, as a crash or a lost node
             enospc   raise OSError(ENOSPC), as a full disk
             oom      raise the error PyTorch's CPU allocator raises when memory runs out
             sigterm2 send this process SIGTERM twice, as an impatient scheduler or user does

Unset, it costs one dictionary lookup per call.
"""

from __future__ import annotations

import errno
import os
import signal

_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("NANOPALM_FAULT")
    if not spec:
        return
    point, action, *nth = spec.split(":")
    if point != name or os.environ.get("NANOPALM_FAULT_RANK", os.environ.get("RANK")) != os.environ.get("RANK"):
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(nth[0] if nth else 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif action == "oom":  # the message of c10's DefaultCPUAllocator (alloc_cpu.cpp)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 91750400000 bytes. Error code 12 (Cannot allocate memory)")
    elif action == "sigterm2":
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        raise ValueError(f"NANOPALM_FAULT={spec!r}: unknown action {action!r} (kill, enospc, oom or sigterm2)")
