"""Stopping a run cleanly: Ctrl-C (SIGINT) and a scheduler's preemption (SIGTERM) ask the trainer
to stop after the current step and save a checkpoint; a second signal aborts at once."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """``requested`` turns True at the first stop signal received inside :meth:`listening`."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None  # the signal that asked (exit status 128 + it)

    @contextmanager
    def listening(self) -> Iterator[None]:
        """Install the handlers for the block (main thread only: elsewhere Python forbids it)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signum
        print(
            f"\n{name}: finishing the current step, then saving a checkpoint ({name} again to abort).",
            file=sys.stderr,
        )
