"""Progress reporting: rich bars (grid, epochs, batches) on a terminal; one plain line per epoch
and per run when the output is not a terminal or ``CI`` is set."""
from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def make_progress(force_plain: bool = False):
    plain = force_plain or bool(os.environ.get("CI")) or not sys.stderr.isatty()
    return PlainProgress() if plain else RichProgress()


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


class PlainProgress:
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.total = 0
        self.done = 0
        self.desc = ""
        self.epochs = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def grid(self, total: int) -> None:
        self.total = total

    def run_started(self, desc: str, epochs: int, batches: int) -> None:
        self.desc, self.epochs, self.t0 = desc, epochs, time.perf_counter()
        self.log(f"[{self.done + 1}/{self.total}] {desc}: {epochs} epochs × {batches} batches")

    def batch(self) -> None:
        pass

    def epoch_done(self, epoch: int, metrics: dict) -> None:
        self.log(f"  {self.desc} epoch {epoch + 1}/{self.epochs} {_fmt(metrics)}")

    def run_done(self, status: str, summary: str) -> None:
        self.done += 1
        self.log(f"[{self.done}/{self.total}] {self.desc}: {status} {summary} "
                 f"({time.perf_counter() - self.t0:.1f}s)")


class RichProgress(PlainProgress):
    def __init__(self):
        super().__init__()
        self.console = Console(stderr=True)
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), console=self.console, transient=False)
        self.grid_task = self.epoch_task = self.batch_task = None

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)

    def log(self, text: str) -> None:
        self.bars.console.print(text, highlight=False, markup=False)

    def grid(self, total: int) -> None:
        self.total = total
        self.grid_task = self.bars.add_task("grid", total=total)

    def run_started(self, desc: str, epochs: int, batches: int) -> None:
        self.desc, self.epochs, self.t0 = desc, epochs, time.perf_counter()
        for task in (self.epoch_task, self.batch_task):
            if task is not None:
                self.bars.remove_task(task)
        self.epoch_task = self.bars.add_task(f"  {desc}", total=epochs)
        self.batch_task = self.bars.add_task("    batches", total=batches)

    def batch(self) -> None:
        self.bars.advance(self.batch_task)

    def epoch_done(self, epoch: int, metrics: dict) -> None:
        self.bars.advance(self.epoch_task)
        self.bars.reset(self.batch_task)
        self.bars.update(self.epoch_task, description=f"  {self.desc} {_fmt(metrics)}")

    def run_done(self, status: str, summary: str) -> None:
        super().run_done(status, summary)
        if self.grid_task is not None:
            self.bars.advance(self.grid_task)


class SilentProgress:
    """Reports nothing (the ranks other than 0 under torchrun, benchmarks)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log(self, text: str) -> None:
        pass

    def grid(self, total: int) -> None:
        pass

    def run_started(self, desc: str, epochs: int, batches: int) -> None:
        pass

    def batch(self) -> None:
        pass

    def epoch_done(self, epoch: int, metrics: dict) -> None:
        pass

    def run_done(self, status: str, summary: str) -> None:
        pass
