"""Checkpoints for exact resume: everything :func:`kdbench.engine.loop.fit` needs to continue a
run bit for bit.

A checkpoint holds

* the state of every stateful module (model, objective or methods with their buffers: CRD's
  memory banks, the margin objective's per-class pipeline; the frozen teacher too when a method
  runs it in train mode, since its BatchNorm statistics then change), *including non-persistent
  buffers* (per-epoch statistics, which a mid-epoch resume must continue, not restart);
* the optimizer and LR-scheduler state (no AMP scaler: bf16 autocast needs none);
* the position: epochs completed, batches done in the current epoch, global step; the epoch
  records so far and the current epoch's metric accumulators;
* every RNG: Python, numpy, torch CPU and CUDA (global; CRD samples negatives from it), taken at
  the checkpoint moment, and the data generator's state *at the start of the current epoch*: a
  mid-epoch resume restores it and replays the epoch's first batches (permutation and
  augmentation draws, no forward/backward) to reach the exact same generator state and batches.

Files: ``ckpt-<step>.pt`` in the run folder, written atomically (temp file + ``os.replace``),
the last two kept. Each file starts with a line ``KDBCKPT1 <sha256 of the rest>`` followed by
the ``torch.save`` payload, so a truncated or corrupt file is detected; loading uses
``torch.load(weights_only=True)`` (tensors and plain containers only: the RNG states are stored
as tensors and lists). A bad checkpoint is reported with a warning and the previous one is used,
or the run starts over. The runner deletes a run's checkpoints once its final record is written,
and those of runs found done at the start of a later ``kdbench run`` (a kill between the two).
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdbench.store import atomic_write_bytes

FORMAT = 1
MAGIC = b"KDBCKPT1 "
KEEP = 2
_NAME = re.compile(r"ckpt-(\d+)\.pt")

# Test-only negative control: leave a piece of state out of every checkpoint written, so a test
# can show that the resume test notices ("rng" or "buffers"; comma-separated).
OMIT_ENV = "KDBENCH_TEST_CKPT_OMIT"


class CheckpointWarning(UserWarning):
    pass


# ------------------------------------------------------------------------------------------------
# RNG states as tensors / primitive containers (loadable with weights_only=True)
# ------------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device's only: a run trains on one device, and a resume on a machine
        # with fewer visible GPUs must still find it.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.cpu().tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # checkpoints before the current-device-only format
            cuda = cuda[torch.cuda.current_device()]
        torch.cuda.set_rng_state(cuda.cpu())


# ------------------------------------------------------------------------------------------------
# Module state, non-persistent buffers included
# ------------------------------------------------------------------------------------------------
def module_state(module: nn.Module, with_buffers: bool = True) -> dict[str, Any]:
    state = module.state_dict()
    # state_dict() skips non-persistent buffers; a mid-epoch resume needs them as well.
    extra = {name: b for name, b in module.named_buffers() if name not in state}
    if not with_buffers:  # test-only negative control: parameters only
        buffers = {name for name, _ in module.named_buffers()}
        state, extra = {k: v for k, v in state.items() if k not in buffers}, {}
    return {"state": state, "buffers": extra, "complete": with_buffers}


def load_module_state(module: nn.Module, saved: dict[str, Any]) -> None:
    module.load_state_dict(saved["state"], strict=saved["complete"])
    buffers = dict(module.named_buffers())
    for name, value in saved["buffers"].items():
        if name not in buffers or buffers[name].shape != value.shape:
            raise ValueError(f"buffer {name!r} does not match the module")
        buffers[name].copy_(value)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def encode(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def decode(data: bytes, map_location=None) -> Any:
    """The checkpoint in ``data``; ValueError if it is truncated, corrupt or not a checkpoint."""
    head, sep, payload = data.partition(b"\n")
    if not head.startswith(MAGIC) or not sep:
        raise ValueError("not a kdbench checkpoint (bad header)")
    if hashlib.sha256(payload).hexdigest().encode() != head[len(MAGIC):]:
        raise ValueError("checksum mismatch (truncated or corrupt file)")
    obj = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError("unknown checkpoint format")
    return obj


@dataclass
class Resume:
    """Where a checkpoint left off (see :func:`kdbench.engine.loop.fit`)."""

    epoch: int  # epochs completed
    batch: int  # batches done in epoch ``epoch``
    step: int  # global optimizer steps done
    epochs: list[dict] = field(default_factory=list)  # epoch records so far
    accum: dict | None = None  # the current epoch's accumulators (None at an epoch boundary)
    path: Path | None = None


class Checkpointer:
    """Writes and finds the checkpoints of one run (its run folder)."""

    def __init__(self, run_dir: Path, every_steps: int | None = None, warn=None):
        self.dir = Path(run_dir)
        self.every_steps = every_steps
        self.warn = warn or (lambda msg: warnings.warn(msg, CheckpointWarning, stacklevel=2))
        omit = {s.strip() for s in os.environ.get(OMIT_ENV, "").split(",") if s.strip()}
        self.omit = omit

    def paths(self) -> list[Path]:
        """Existing checkpoints, newest first."""
        found = []
        for p in self.dir.glob("ckpt-*.pt"):
            m = _NAME.fullmatch(p.name)
            if m and p.is_file():  # a folder of that name is not ours to read or delete
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found, reverse=True)]

    def capture_rng(self) -> dict[str, Any] | None:
        return None if "rng" in self.omit else capture_rng()

    def restore_rng(self, state: dict[str, Any]) -> None:
        restore_rng(state)

    def save(self, *, modules: list[nn.Module], optimizer, scheduler, epoch: int, batch: int,
             step: int, epoch_gen_state: Tensor, epochs: list[dict], accum: dict | None,
             rng_state: dict[str, Any] | None = None) -> Path:
        ckpt = {
            "format": FORMAT,
            "epoch": epoch, "batch": batch, "step": step,
            "modules": [module_state(m, with_buffers="buffers" not in self.omit) for m in modules],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),  # (no AMP grad scaler: bf16 autocast needs none)
            "rng": rng_state if rng_state is not None else self.capture_rng(),
            "data_generator": epoch_gen_state,
            "epochs": epochs,
            "accum": accum,
        }
        path = self.dir / f"ckpt-{step:09d}.pt"
        atomic_write_bytes(path, encode(ckpt))
        for old in self.paths()[KEEP:]:
            old.unlink(missing_ok=True)
        return path

    def restore(self, *, modules: list[nn.Module], optimizer, scheduler, generator: torch.Generator,
                device: torch.device) -> Resume | None:
        """Load the newest good checkpoint into the given objects; None (start over) if there is
        none. A checkpoint that cannot be read or does not fit is skipped with a warning."""
        paths = self.paths()
        if not paths:
            return None
        # A checkpoint that fails half-way through loading must not leave a half-loaded run
        # behind: keep the fresh state to go back to.
        fresh = copy.deepcopy(([module_state(m) for m in modules], optimizer.state_dict(),
                               scheduler.state_dict(), generator.get_state(), capture_rng()))
        for path in paths:
            try:
                ckpt = decode(path.read_bytes(), map_location=device)
                if len(ckpt["modules"]) != len(modules):
                    raise ValueError("it holds a different set of modules")
                for m, saved in zip(modules, ckpt["modules"]):
                    load_module_state(m, saved)
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
                generator.set_state(ckpt["data_generator"].cpu())
                if ckpt["rng"] is not None:
                    self.restore_rng(ckpt["rng"])
            except Exception as exc:  # a bad file must never crash the run: fall back
                self.warn(f"checkpoint {path} is unusable ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]}); ignoring it")
                states, opt, sched, gen, rng = fresh
                for m, saved in zip(modules, states):
                    load_module_state(m, saved)
                optimizer.load_state_dict(opt)
                scheduler.load_state_dict(sched)
                generator.set_state(gen)
                restore_rng(rng)
                continue
            return Resume(epoch=int(ckpt["epoch"]), batch=int(ckpt["batch"]), step=int(ckpt["step"]),
                          epochs=list(ckpt["epochs"]), accum=ckpt["accum"], path=path)
        self.warn(f"no usable checkpoint in {self.dir}; starting the run over")
        return None

    def has_checkpoints(self) -> bool:
        """Whether the run or one of its initialisation stages has a checkpoint file."""
        return bool(self.paths()) or any(stage.is_dir() and Checkpointer(stage).paths()
                                         for stage in self.dir.glob("init-*"))

    def clear(self) -> None:
        """Delete the run's checkpoints, those of its initialisation stages (``init-*/``) too."""
        for p in self.paths():
            p.unlink(missing_ok=True)
        for stage in self.dir.glob("init-*"):
            if stage.is_dir():
                type(self)(stage).clear()
