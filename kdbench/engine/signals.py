"""Stop signals: a run stopped by one finishes its step, writes a checkpoint and is recorded as
``interrupted``; the same command resumes it."""
from __future__ import annotations

import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """While active, SIGTERM/SIGINT/SIGUSR1 only set ``signum`` (the training loop polls it after
    each step); a second one restores the default action and re-sends itself (stops at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __call__(self) -> int | None:
        return self.signum

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\nkdbench: got {signal.Signals(signum).name}: finishing the current step, then "
              "writing a checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False
