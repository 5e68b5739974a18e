"""TensorBoard tracker: every run's per-epoch metrics as TensorBoard scalars.

    kdbench run RECIPE --tracker tensorboard              # event files in <output>/tensorboard
    kdbench run RECIPE --tracker tensorboard:log_dir=tb   # or anywhere else
    tensorboard --logdir <output>/tensorboard

Needs the ``tensorboard`` package (``pip install 'kdbench[tensorboard]'``); without it the
tracker is reported once and switched off, and the runs train as usual. One folder per run id
(a resumed run appends to it), one step per epoch. Tags: ``top1/train``, ``top1/val``,
``top1/test``, ``loss/train`` (the run's whole objective), ``loss/val``, ``loss/test``
(cross-entropy), ``top5/...``, ``loss_terms/<term>`` (each weighted term of the objective),
``lr``, and whatever else the epoch's record holds as a number; at the end
``result/final_top1`` and ``result/best_top1`` (at their epochs) and the text ``status``
(done, diverged, interrupted, failed). The text ``run`` holds the run's description and its
spec.

Deviations: none (the writer is torch.utils.tensorboard's SummaryWriter).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import Field

from kdbench.api import Params, hookimpl
from kdbench.trackers import TrackedRun, Tracker

SPLITS = ("train", "val", "test")


class TensorBoardParams(Params):
    log_dir: str | None = Field(None, description="folder of the event files, one sub-folder "
                                "per run id (default: <recipe output>/tensorboard)")
    flush_secs: int = Field(30, gt=0, description="seconds between writes of the event files")


def tag(key: str) -> str:
    """The record's key as a TensorBoard tag: test_top1 -> top1/test, loss_kd -> loss_terms/kd."""
    split, _, what = key.partition("_")
    if split in SPLITS and what:
        return f"{what}/{split}"
    if split == "loss" and what:
        return f"loss_terms/{what}"
    return key


class TensorBoardTracker(Tracker):
    def __init__(self, params: TensorBoardParams, output_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(f"{exc}; install it with pip install 'kdbench[tensorboard]'") from None
        self.writer_class, self.flush_secs = SummaryWriter, params.flush_secs
        self.root = Path(params.log_dir) if params.log_dir else Path(output_dir) / "tensorboard"
        self.writers = {}

    def start(self, run: TrackedRun) -> None:
        writer = self.writer_class(log_dir=str(self.root / run.id), flush_secs=self.flush_secs)
        spec = json.dumps(run.spec, indent=1, sort_keys=True, default=str)
        writer.add_text("run", f"{run.kind} {run.id}: {run.describe}\n\n    "
                        + spec.replace("\n", "\n    "))
        self.writers[run.id] = writer

    def epoch(self, run: TrackedRun, metrics: dict[str, float]) -> None:
        writer, step = self.writers[run.id], int(metrics["epoch"])
        for key, value in metrics.items():
            if key != "epoch" and math.isfinite(value):
                writer.add_scalar(tag(key), value, step)

    def end(self, run: TrackedRun, status: str, result: dict) -> None:
        writer = self.writers.pop(run.id, None)
        if writer is None:
            return
        for which in ("final", "best"):
            r = result.get(which) or {}
            if isinstance(r.get("top1"), (int, float)):
                writer.add_scalar(f"result/{which}_top1", r["top1"], int(r.get("epoch") or 0))
        writer.add_text("status", status)
        writer.close()


@hookimpl
def kdbench_register_trackers(register):
    register("tensorboard", TensorBoardTracker, params=TensorBoardParams,
             help="TensorBoard event files of every run's per-epoch metrics (extra: tensorboard)")
