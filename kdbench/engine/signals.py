"""Stop signals: a run stopped by one finishes its step, writes a checkpoint and is recorded as
``interrupted``; the same command resumes it.

SIGUSR1 and SIGUSR2 are the warnings a scheduler sends before a time limit or a preemption
(submitit asks Slurm for USR2, many sites use USR1), SIGTERM its last word, SIGINT a Ctrl-C.

Under the slurm launcher (``KDBENCH_LAUNCHER=slurm``), Slurm sends its signal to every process of
the job step and the job's script passes signals on as well, so one warning can arrive two or
three times: there a repeated signal does not stop the run at once (Slurm's own SIGKILL, after
its KillWait, is the hard stop). Elsewhere a second signal stops at once.

The job's task starts the run with these signals blocked (:mod:`kdbench.launchers.slurm`), so
that one arriving while Python and torch load is held, not fatal: entering :class:`StopSignals`
installs the handlers and then unblocks them, and a signal held since then is handled at once
(the run stops before its first step).

Before :class:`StopSignals` takes over, a Ctrl-C is remembered (:func:`catch_early_interrupts`).
While kdbench imports torch it is only remembered and acted on once the imports
are done (:func:`raise_if_interrupted`): a KeyboardInterrupt raised inside a C extension's
initialisation can abort the interpreter (seen: SIGABRT inside ``import torch``), and one raised
inside a library's bare ``except:`` is swallowed. From then on it raises KeyboardInterrupt as
Python's own handler does, and is still remembered, so that one swallowed later stops the grid
before its first step.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
LAUNCHER_ENV = "KDBENCH_LAUNCHER"  # (kdbench.launchers.LAUNCHER_ENV; not imported: keep this light)


_early_interrupts: list[int] = []
_raise_early = [False]  # False while importing: remember only


def _remember(signum, frame):
    _early_interrupts.append(signum)
    if _raise_early[0]:
        raise KeyboardInterrupt


def catch_early_interrupts():
    """From the start of a command: remember every Ctrl-C, raising nothing until
    :func:`raise_if_interrupted`. A SIGINT that was ignored when the process started (a
    background job) stays ignored. Returns the handler to restore when the command ends."""
    _early_interrupts.clear()
    _raise_early[0] = False
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread() and previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, _remember)
    return previous


def raise_if_interrupted() -> None:
    """The imports are done: KeyboardInterrupt if a Ctrl-C came meanwhile; later ones raise at
    once (and are remembered)."""
    _raise_early[0] = True
    if _early_interrupts:
        raise KeyboardInterrupt


def restore_interrupts(previous) -> None:
    if signal.getsignal(signal.SIGINT) is _remember:
        signal.signal(signal.SIGINT, previous)
    _early_interrupts.clear()


class StopSignals:
    """While active, SIGTERM/SIGINT/SIGUSR1/SIGUSR2 only set ``signum`` (the training loop polls
    it after each step); a second one restores the default action and re-sends itself (stops at
    once), except under the slurm launcher (``escalate`` False by default there)."""

    def __init__(self, escalate: bool | None = None):
        self.signum: int | None = None
        self.escalate = os.environ.get(LAUNCHER_ENV) != "slurm" if escalate is None else escalate
        self._old: dict[int, object] = {}
        self._old_mask: set | None = None

    def __call__(self) -> int | None:
        return self.signum

    def _handle(self, signum, frame):
        if self.signum is not None:
            if not self.escalate:
                return  # the same warning again (Slurm signals every process of the job)
            signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        again = ("send it again to stop at once" if self.escalate
                 else "Slurm's SIGKILL after its KillWait stops it at once")
        print(f"\nkdbench: got {signal.Signals(signum).name}: finishing the current step, then "
              f"writing a checkpoint ({again})", file=sys.stderr, flush=True)

    def __enter__(self):
        if _early_interrupts and self.signum is None:
            self.signum = _early_interrupts[0]  # pressed before, swallowed on the way: stop now
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
            # Handlers first, then unblock: a signal held while blocked is handled now.
            self._old_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return self

    def __exit__(self, *exc):
        if self._old_mask is not None:
            # Block again what was blocked before (a late signal then stays held, not fatal).
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)
            self._old_mask = None
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False
