"""User mistakes: one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
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


EXIT_USER_ERROR = 2
EXIT_CTRL_C = 130  # 128 + SIGINT, what shells report for a process stopped by Ctrl-C


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
    return 0


def _say(line: str) -> None:
    """One write of the whole line: under torchrun every rank reports, and lines must not interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
