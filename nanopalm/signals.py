"""Stop on request without losing work: SIGTERM (a scheduler preempting the job) and Ctrl-C (SIGINT).

Inside `with GracefulStop() as stop:` the two signals only set `stop.signum`; the training loop looks at
it after every step, saves a checkpoint and ends, and the process exits with 128 + the signal's number
(143 for SIGTERM, 130 for Ctrl-C) so that scripts see the run did not finish. A second signal acts at
once: the previous handlers are back as soon as the first one arrives.
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # Python lets only it install handlers
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum: int, frame) -> None:
        # A flag and one raw write (os.write, not print: the handler can interrupt a print in progress).
        self.signum = signum
        self._restore()
        os.write(2, f"{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint; send "
                    "it again to stop at once, without saving\n".encode())

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
