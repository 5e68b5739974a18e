"""One run across several processes (GPUs) with DistributedDataParallel.

``torchrun --nproc-per-node N -m kdbench run recipe.toml`` trains each run of the grid with N
processes (ranks) together: the grid is the same, the runs are trained one after the other, each
by all ranks. Initialised from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``PORT``): NCCL with one GPU per rank (``cuda:LOCAL_RANK``) when the recipe's
device is CUDA (or auto with a GPU), gloo on the CPU otherwise.

How a step is shared (:func:`distribute_task`):

* Data: every rank holds the whole (device-resident) dataset and draws the same global batch
  from the same generator (same permutation, same augmentation); the recipe's ``batch_size`` stays
  the global batch. Each rank runs the trained net (student, or teacher being trained) on its
  contiguous slice of that batch (:class:`ShardedModel`) and the outputs are gathered with a
  differentiable all-gather, so every rank sees the net's outputs for the whole global batch.
* Everything after the net (the frozen teacher's forward, the distillation methods, the teacher
  objectives) runs on the *global* batch on every rank, identically. So the loss is the
  single-process loss of the global batch, and every stateful method stays consistent across
  ranks without knowing about DDP: CRD's memory banks are updated with the embeddings and
  indices of the whole global batch on every rank, and the margin objective's per-class pipeline
  receives every gated sample of the global batch on every rank (``pipeline_size`` keeps its
  single-process meaning). The price: the frozen teacher's forward and the methods are not
  sharded (only the trained net's forward and backward are).
* Gradients: the trained net is wrapped in DDP; the backward of the all-gather sums each rank's
  output gradients, so after DDP's averaging every rank holds the gradient of the global loss.
  Methods and objectives with parameters are wrapped in DDP too (their gradients are equal on
  every rank already; the averaging keeps them bit-identical).
* BatchNorm: on CUDA the trained net's BatchNorm layers become SyncBatchNorm, so the statistics
  are those of the global batch and the run matches a single-GPU run up to floating-point
  reordering. On the CPU (gloo) PyTorch has no SyncBatchNorm: each rank normalises its slice with
  the slice's own statistics, so the loss curve differs from a single-process run by the
  per-slice BatchNorm noise (tests/test_ddp.py states the tolerance); the running statistics
  used for evaluation are rank 0's (DDP broadcasts them each step).
* Only rank 0 writes records, weights and checkpoints, and takes the per-run locks; it tells the
  other ranks which run to train next. Every rank resumes from the same checkpoint, which holds
  each rank's RNG state (:class:`RankCheckpointer`). What differs per rank is given to the
  runner: a read-only store, that checkpointer, silent progress, the collective stop.
* A stop signal is honoured at the same step on every rank: the ranks compare their stop flags
  every ``STOP_SYNC_STEPS`` steps (a tiny all-reduce), so an interrupted run stops cleanly even if
  only one rank got the signal.

Limits: evaluation is not sharded (every rank evaluates the whole test set, rank 0's result is
recorded); the process-group timeout is ``TIMEOUT`` (rank 0 may wait for a teacher trained by
another ``kdbench run``); a run that fails on one rank only is a hang until that timeout.
"""
from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kdbench.api import ModelOutput, UserError
from kdbench.engine.checkpoint import Checkpointer
from kdbench.engine.runner import GridRunner, Summary
from kdbench.engine.signals import StopSignals
from kdbench.progress import SilentProgress
from kdbench.store import RunStore

TIMEOUT = timedelta(hours=6)
STOP_SYNC_STEPS = 16


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str) -> tuple[int, int, str]:
    """Join torchrun's process group; (rank, world size, this rank's device name)."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in
                          (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
        name = f"cuda:{local}"
    else:
        name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return rank, world, name


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------
def shard_bounds(n: int, world: int) -> list[int]:
    """Start of each rank's contiguous slice of n samples (and n at the end); sizes differ by <= 1."""
    base, rest = divmod(n, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (1 if r < rest else 0))
    return bounds


class _GatherRows(torch.autograd.Function):
    """All-gather of each rank's rows (slices may differ in size by one) into the global tensor.
    Backward: sum the global gradient over ranks (every rank computed the same global loss) and
    keep this rank's rows."""

    @staticmethod
    def forward(ctx, t, sizes):
        rank = dist.get_rank()
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def gather_rows(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    return _GatherRows.apply(t, sizes)


class ShardedModel(nn.Module):
    """Runs the model on this rank's slice of the input and returns the outputs of the whole
    input (gathered from every rank). Every rank must call it with the same input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        world, rank = dist.get_world_size(), dist.get_rank()
        if x.shape[0] < world:  # too few samples to share: every rank computes them all
            return self.model(x)
        bounds = shard_bounds(x.shape[0], world)
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        out = self.model(x[bounds[rank]:bounds[rank + 1]])

        def gather(value):
            if isinstance(value, torch.Tensor):
                return gather_rows(value, sizes)
            if isinstance(value, (list, tuple)):
                return type(value)(gather(v) for v in value)
            return value

        return ModelOutput(**{f.name: gather(getattr(out, f.name)) for f in dataclasses.fields(out)})


def _has_params(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def distribute_task(task, device: torch.device):
    """Share ``task``'s step between the ranks (see the module docstring): the trained net runs
    as DDP over :class:`ShardedModel`, methods and objectives with parameters as DDP. The task's
    modules, evaluation and checkpoints stay the plain modules."""
    ids = [device.index] if device.type == "cuda" else None

    def net(model):
        if device.type == "cuda":  # in place: the parameters and buffers stay the same tensors
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DDP(ShardedModel(model), device_ids=ids)

    def extra(module):
        if not _has_params(module):
            return module
        # (no device_ids: its inputs are already on the device and need no moving)
        return DDP(module, broadcast_buffers=False, find_unused_parameters=True)

    return task.distribute(net, extra)


class CollectiveStop:
    """The runner's stop signals, decided together: every ``STOP_SYNC_STEPS`` polls the ranks take
    the largest signal number any of them got, so all stop after the same step."""

    def __init__(self, signals, device: torch.device):
        self.signals, self.device = signals, device
        self.calls = 0

    @property
    def signum(self):
        return self.signals.signum

    def __call__(self):
        self.calls += 1
        if self.calls % STOP_SYNC_STEPS:
            return None
        flag = torch.tensor([self.signals.signum or 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) and self.signals.signum is None:
            self.signals.signum = int(flag)  # got by another rank: this rank stops too
        return int(flag) or None

    def __enter__(self):
        self.signals.__enter__()
        return self

    def __exit__(self, *exc):
        return self.signals.__exit__(*exc)


# ------------------------------------------------------------------------------------------------
# What each rank does differently: store, checkpoints, progress
# ------------------------------------------------------------------------------------------------
class ReadOnlyStore(RunStore):
    """Ranks other than 0 read the store but never write it."""

    def write_record(self, kind, run_id, record):
        return self.run_dir(kind, run_id) / "record.json"

    def save_weights(self, run_id, state_dict):
        pass


class RankCheckpointer(Checkpointer):
    """Checkpoints of a run trained by every rank: each rank's RNG state is gathered into the one
    file rank 0 writes (the ranks' CUDA generators differ: each rank draws on its own device),
    and on resume every rank restores its own. The other ranks read checkpoints, never write or
    delete them."""

    def save(self, **kwargs):
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, self.capture_rng())
        if dist.get_rank() != 0:
            return None
        return super().save(rng_state={"per_rank": states}, **kwargs)

    def restore_rng(self, state) -> None:
        if "per_rank" not in state:
            raise ValueError("it holds one process's RNG state, not each rank's")
        states = state["per_rank"]
        if len(states) != dist.get_world_size():
            raise ValueError(f"it was written by {len(states)} ranks, not {dist.get_world_size()}")
        super().restore_rng(states[dist.get_rank()])

    def clear(self) -> None:
        if dist.get_rank() == 0:
            super().clear()


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------
class DistributedGridRunner(GridRunner):
    """The grid under torchrun: rank 0 plans, locks and records as :class:`GridRunner` does and
    tells the other ranks which run to train; every run is trained by all ranks together."""

    def __init__(self, loaded, registry, progress, device: str | None = None, **kwargs):
        self.rank, self.world, name = init_from_env(device or loaded.recipe.device)
        device = torch.device(name)
        store = RunStore(loaded.output_dir, loaded.teacher_dir)
        if self.rank != 0:
            store = ReadOnlyStore(store.output_dir, store.teacher_dir)
        super().__init__(loaded, registry, progress if self.rank == 0 else SilentProgress(),
                         device=name, store=store, checkpointer=RankCheckpointer,
                         stop=CollectiveStop(StopSignals(), device),
                         wrap_task=lambda task: distribute_task(task, device),
                         world_size=self.world, **kwargs)
        for spec in self.students:  # before anything trains
            if (opt := spec.optimizer_term()) is not None:
                rule = registry.find("optimizer", opt[0]).factory
                if not getattr(rule, "supports_ddp", False):
                    raise UserError(f"{loaded.path}: method set {spec.meta.method_set!r} trains with "
                                    f"optimizer {opt[0]!r}, which takes more than one backward pass "
                                    "per step and does not run under torchrun (DDP); run that method "
                                    "set without torchrun")

    def _command(self, run_id: str | None = None) -> str | None:
        """Rank 0 sends the id of the next run (None: no more); the others receive it."""
        box = [run_id]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run(self) -> Summary:
        try:
            if self.rank == 0:
                try:
                    return super().run()
                finally:
                    self._command(None)
            specs = {s.id: s for s in self.teachers + self.students}
            summary = Summary()
            with self.stop:
                while (run_id := self._command()) is not None:
                    super().run_one(specs[run_id], summary)
            return summary
        finally:
            dist.barrier()
            dist.destroy_process_group()

    def run_one(self, spec, summary):
        self._command(spec.id)  # rank 0 (the others call GridRunner.run_one from run())
        return super().run_one(spec, summary)
