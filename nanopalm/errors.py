"""User mistakes: one clear line on stderr and a non-zero exit, never a traceback. Running out of memory
counts as one: too large a batch, block or model is the most common mistake in training language models."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import NoReturn


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, ...). The message says what and how."""


class Interrupted(Exception):
    """The run stopped early on request (SIGTERM, Ctrl-C) after saving its state; the message says how to go on."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def warn(message: str) -> None:
    """A warning: one line on stderr (stdout is the run's log and output, which a user may pipe or parse)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


EXIT_USER_ERROR = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_CTRL_C = 130  # 128 + SIGINT, what shells report for a process stopped by Ctrl-C

MEMORY_ADVICE = ("use a smaller --batch_size with a larger --gradient_accumulation_steps (the same global batch), "
                 "a smaller --block_size, --activation_checkpointing=full, or --fsdp=True on several GPUs")
# What ran out, and how PyTorch's allocator says so (c10's CPU allocator, CUDA's caching allocator, MPS); group 1
# is the amount asked for, where the message gives it.
_OUT_OF_MEMORY = [
    ("the CPU's memory", r"DefaultCPUAllocator: can't allocate memory(?:: you tried to allocate (\d+) bytes)?"),
    ("the GPU's memory", r"CUDA out of memory\.(?: Tried to allocate ([\d.]+ [KMGT]?i?B))?"),
    ("MPS memory", r"MPS backend out of memory(?:.*?Tried to allocate ([\d.]+ [KMGT]?i?B))?"),
]


def out_of_memory(error: BaseException) -> str | None:
    """The one line to print when `error` is an out-of-memory error (CPU, CUDA, MPS or Python's), else None."""
    if isinstance(error, MemoryError):
        return f"out of memory (Python could not allocate): {MEMORY_ADVICE}"
    if not isinstance(error, RuntimeError):  # torch.OutOfMemoryError is a RuntimeError too
        return None
    for where, pattern in _OUT_OF_MEMORY:
        if found := re.search(pattern, str(error)):
            amount = found[1]
            if amount and amount.isdigit():
                amount = f"{int(amount) / 2**30:.1f} GiB"
            return f"out of {where}{f', asked for {amount}' if amount else ''}: {MEMORY_ADVICE}"
    return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown flag, bad number) are UserErrors, so they read like every other."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")


def run_cli(main: Callable[[list[str]], None], argv: list[str] | None = None) -> int:
    """Run `main(argv)`; a UserError becomes `error: <message>` on stderr and exit code 2."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        _say(f"error: {e}")
        return EXIT_USER_ERROR
    except Interrupted as e:
        _say(str(e))
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C where nothing is worth saving: stop quietly, no traceback
        _say("interrupted")
        return EXIT_CTRL_C
    except (RuntimeError, MemoryError) as e:
        line = out_of_memory(e)
        if line is None:
            raise
        _say(f"error: {line}")
        return EXIT_OUT_OF_MEMORY
    return 0


def _say(line: str) -> None:
    """One write of the whole line: under torchrun every rank reports, and lines must not interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
