"""The training loop shared by teachers and students, and evaluation.

A *task* supplies the step (``loss_terms(batch) -> (terms, logits)``), the modules that train,
and the extra views it needs; :func:`fit` owns the optimizer, the schedule, the metrics and the
progress, checkpoints and resume. Metrics (and a flag for the first non-finite loss) are
accumulated on the device and read once per epoch, so the step itself never synchronises with
the host; writing a checkpoint (every epoch, and every N steps if asked) does.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from kdbench.api import Batch
from kdbench.data.loader import DeviceData
from kdbench.engine.checkpoint import Checkpointer


class Task(Protocol):
    """Everything :func:`fit` reads of what it trains (built by :mod:`kdbench.engine.tasks`)."""

    views: tuple[str, ...]  # extra augmented views each batch must carry (see Batch.views)
    # Optional: ``update_rule`` (a kdbench.api.StudentOptimizer) trains it instead of the
    # schedule's SGD, from the loss in two parts, ``split_terms(terms)``.
    plans_epochs: bool  # True: fit() draws each epoch's batches up front and calls start_epoch

    def modules(self) -> list[nn.Module]: ...  # trained (train mode, in the optimizer)

    def stateful_modules(self) -> list[nn.Module]: ...  # checkpointed (modules() and more)

    def start_epoch(self, plan) -> None: ...  # the epoch's EpochPlan, when plans_epochs

    def loss_terms(self, batch: Batch) -> tuple[dict[str, Tensor], Tensor]: ...

    def eval_model(self) -> nn.Module: ...

    def epoch_stats(self) -> dict[str, float]: ...


class Diverged(Exception):
    """The loss became NaN/inf: at ``epoch`` (0-based), first at global ``step`` (1-based) if
    known. Detected at the end of the epoch (or at a mid-epoch checkpoint)."""

    def __init__(self, epoch: int, terms: dict[str, float], step: int | None = None):
        self.epoch, self.terms, self.step = epoch, terms, step
        at = f"epoch {epoch + 1}" + (f", step {step}" if step is not None else "")
        super().__init__(f"loss is not finite at {at}" + (f" ({terms})" if terms else ""))


@dataclass
class Evaluation:
    """What :func:`fit` evaluates after an epoch: every ``every`` epochs and always after the last,
    the validation split ``val`` (if any) and the test set — the whole test set after the last
    epoch and after every epoch that is a new best on validation, ``test_during`` (a subset,
    cheaper) after the others if given. Each evaluated epoch records ``test_images``."""

    every: int = 1
    val: DeviceData | None = None
    test_during: DeviceData | None = None

    def due(self, epoch: int, epochs: int) -> bool:
        return (epoch + 1) % self.every == 0 or epoch + 1 == epochs

    def describe(self, test: DeviceData) -> dict:
        """For the record: how each epoch was evaluated."""
        return {"every": self.every, "test_images": len(test),
                "test_images_other_epochs": len(self.test_during or test),
                "val_images": len(self.val) if self.val is not None else 0}


@dataclass
class FitResult:
    epochs: list[dict] = field(default_factory=list)
    resumed_from: dict | None = None  # where the checkpoint it resumed from left off

    @property
    def final(self) -> dict:
        last = self.epochs[-1]
        return {"top1": last["test_top1"], "top5": last["test_top5"], "epoch": last["epoch"]}

    @property
    def best(self) -> dict:
        """The best evaluated epoch: chosen on the validation split when there is one (its test
        accuracy is reported), else on the test set itself (optimistic)."""
        evaluated = [e for e in self.epochs if "test_top1" in e]
        on_val = all("val_top1" in e for e in evaluated)
        key = "val_top1" if on_val else "test_top1"
        best = max(evaluated, key=lambda e: e[key])  # the first of equals: the earliest epoch
        out = {"top1": best["test_top1"], "top5": best["test_top5"], "epoch": best["epoch"],
               "selected_on": "validation" if on_val else "test"}
        if "test_images" in best:
            out["test_images"] = best["test_images"]
        if on_val:
            out["val_top1"] = best["val_top1"]
        return out


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 on CUDA unless fp32 was asked for, and on the CPU if bf16 was; else None (fp32)."""
    if (device.type == "cuda" and precision != "fp32") or (device.type == "cpu" and precision == "bf16"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str):
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def make_optimizer(params, schedule, device: torch.device, rule=None):
    """The optimizer of ``params`` and its MultiStepLR: the schedule's SGD (fused on CUDA), or
    the one ``rule`` (a :class:`kdbench.api.StudentOptimizer`, a task's ``update_rule``) builds."""
    if rule is not None:
        optimizer = rule.build(params, schedule, device)
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=schedule.milestones,
                                                               gamma=schedule.gamma)
    opts = dict(lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay,
                nesterov=schedule.nesterov)
    if device.type == "cuda":
        opts["fused"] = True
    else:
        opts["foreach"] = True
    optimizer = torch.optim.SGD(params, **opts)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=schedule.milestones,
                                                     gamma=schedule.gamma)
    return optimizer, scheduler


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData, batch_size: int, device: torch.device,
             precision: str, split: str = "test") -> dict[str, float]:
    """Top-1, top-5 and mean cross-entropy of ``model`` on ``data``, keyed ``<split>_top1`` ..."""
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), device=device, dtype=torch.long)
    correct5 = torch.zeros((), device=device, dtype=torch.long)
    loss_sum = torch.zeros((), device=device)
    k = min(5, data.num_classes)
    for x, y in data.eval_batches(batch_size):
        with autocast(device, precision):
            logits = model(x).logits
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        topk = logits.topk(k, dim=1).indices
        hits = topk == y[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
    model.train(was_training)
    n = len(data)
    return {f"{split}_top1": 100.0 * correct1.item() / n, f"{split}_top5": 100.0 * correct5.item() / n,
            f"{split}_loss": loss_sum.item() / n}


class Interrupted(Exception):
    """A stop signal arrived; the run stopped after a step and wrote a checkpoint."""

    def __init__(self, signum: int, epoch: int, step: int):
        self.signum, self.epoch, self.step = signum, epoch, step
        super().__init__(f"interrupted by signal {signum} at epoch {epoch + 1}, step {step}")


# Test-only hook: ``<step>[:<signal name>]`` sends the signal (default SIGKILL) to this process
# after global step <step> of a run that started fresh (not resumed), to test crash recovery.
KILL_ENV = "KDBENCH_TEST_KILL_AT_STEP"


def _kill_hook() -> tuple[int, int] | None:
    value = os.environ.get(KILL_ENV)
    if not value:
        return None
    step, _, name = value.partition(":")
    return int(step), int(getattr(signal, f"SIG{name or 'KILL'}"))


def new_accum(device: torch.device) -> dict:
    """An epoch's metrics, kept on the device (see :func:`accumulate`)."""
    return {"loss": torch.zeros((), device=device),
            "correct": torch.zeros((), device=device, dtype=torch.long),
            "terms": {}, "seen": 0,
            # First global step (1-based) whose loss was not finite, -1 while all are finite.
            "first_bad": torch.full((), -1, device=device, dtype=torch.long)}


def train_step(task: Task, batch: Batch, optimizer, device: torch.device, precision: str):
    """One optimizer step of ``task`` on ``batch``: (loss, terms, logits), not detached. No host
    sync. The step of :func:`fit`, of the ``--calibrate`` estimate and of the benchmarks."""
    with autocast(device, precision):
        terms, logits = task.loss_terms(batch)
        loss = sum(terms.values())
    rule = getattr(task, "update_rule", None)
    if rule is not None:  # an optimizer plugin's step: it takes the loss in two parts
        rule.step(optimizer, *task.split_terms(terms))
        return loss, terms, logits
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, terms, logits


def accumulate(acc: dict, loss: Tensor, terms: dict[str, Tensor], logits: Tensor, y: Tensor,
               step: int) -> None:
    """Add global step ``step``'s (1-based) metrics to ``acc``, on the device (no host sync)."""
    n = y.shape[0]
    acc["seen"] += n
    loss = loss.detach().float()
    acc["loss"] += loss * n
    for name, value in terms.items():
        acc["terms"][name] = acc["terms"].get(name, 0) + value.detach().float() * n
    acc["correct"] += (logits.detach().argmax(1) == y).sum()
    bad = acc["first_bad"]
    acc["first_bad"] = torch.where((bad < 0) & ~torch.isfinite(loss), step, bad)


def fit(task: Task, schedule, train: DeviceData, test: DeviceData, device: torch.device,
        precision: str, generator: torch.Generator, progress, eval_batch_size: int,
        on_epoch: Callable[[dict], None] | None = None, checkpointer: Checkpointer | None = None,
        stop_requested: Callable[[], int | None] = lambda: None,
        evaluation: Evaluation | None = None) -> FitResult:
    """Train ``task`` for ``schedule.epochs`` epochs, continuing from the checkpointer's newest
    good checkpoint if there is one. Checkpoints are written at the end of every epoch and every
    ``checkpointer.every_steps`` steps; ``stop_requested()`` (a signal number or None) is polled
    after every step: if set, a checkpoint is written and :class:`Interrupted` raised."""
    params = [p for m in task.modules() for p in m.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, schedule, device, getattr(task, "update_rule", None))
    stateful = task.stateful_modules()
    resume = None
    if checkpointer is not None:
        resume = checkpointer.restore(modules=stateful, optimizer=optimizer, scheduler=scheduler,
                                      generator=generator, device=device)
    result = FitResult(epochs=list(resume.epochs) if resume else [])
    if resume is not None:
        result.resumed_from = {"epochs_done": resume.epoch, "batches_done": resume.batch,
                               "step": resume.step}
    step = resume.step if resume else 0
    kill = _kill_hook() if resume is None else None
    every = checkpointer.every_steps if checkpointer is not None else None
    evaluation = evaluation or Evaluation()
    nbatches = train.num_batches(schedule.batch_size)
    if resume is not None:
        progress.log(f"  resuming from {resume.path.name}: epoch {resume.epoch + 1}, "
                     f"batch {resume.batch} of {nbatches}, step {step}")

    for epoch in range(resume.epoch if resume else 0, schedule.epochs):
        for m in task.modules():
            m.train()
        # The checkpoint holds the data generator at the start of its epoch: a mid-epoch resume
        # replays the first ``skip`` batches (data only) to get the same batches and state.
        epoch_gen_state = generator.get_state()
        skip = resume.batch if resume is not None and resume.epoch == epoch else 0
        acc = resume.accum if skip and resume.accum is not None else new_accum(device)
        lr = optimizer.param_groups[0]["lr"]

        def save(batch_done: int, mid_epoch: bool) -> None:
            # Reading first_bad syncs, but checkpoints are rare; never checkpoint past a NaN.
            if mid_epoch and int(acc["first_bad"]) >= 0:
                raise Diverged(epoch, {}, int(acc["first_bad"]))
            checkpointer.save(modules=stateful, optimizer=optimizer, scheduler=scheduler,
                              epoch=epoch if mid_epoch else epoch + 1, batch=batch_done, step=step,
                              epoch_gen_state=epoch_gen_state if mid_epoch else generator.get_state(),
                              epochs=result.epochs, accum=acc if mid_epoch else None)

        plan = None
        if task.plans_epochs:  # the task looks at the epoch's draws first
            plan = train.epoch_plan(schedule.batch_size, generator)
            task.start_epoch(plan)
        batches = train.train_batches(schedule.batch_size, generator, task.views, epoch,
                                      schedule.epochs, step - skip, plan=plan)
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            loss, terms, logits = train_step(task, batch, optimizer, device, precision)
            step += 1
            accumulate(acc, loss, terms, logits, batch.y, step)
            progress.batch()
            if checkpointer is not None and every and step % every == 0 and i + 1 < nbatches:
                save(i + 1, mid_epoch=True)
            if kill is not None and step == kill[0]:
                os.kill(os.getpid(), kill[1])
            signum = stop_requested()
            if signum is not None and i + 1 < nbatches:
                if checkpointer is not None:
                    save(i + 1, mid_epoch=True)
                raise Interrupted(signum, epoch, step)
        scheduler.step()
        # One host read per epoch: every accumulated metric at once.
        term_sums, seen = acc["terms"], acc["seen"]
        names = list(term_sums)
        values = torch.stack([t.double() for t in (acc["loss"], acc["correct"], acc["first_bad"],
                                                   *[term_sums[k] for k in names])]).tolist()
        first_bad = int(values.pop(2))
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": values[0] / seen, "train_top1": 100.0 * values[1] / seen}
        record.update({f"loss_{k}": v / seen for k, v in zip(names, values[2:])})
        if first_bad >= 0 or not all(math.isfinite(v) for v in values):
            raise Diverged(epoch, {k: v for k, v in record.items() if k.startswith(("train", "loss"))},
                           first_bad if first_bad >= 0 else None)
        shown = {"loss": record["train_loss"]}
        if evaluation.due(epoch, schedule.epochs):
            full = epoch + 1 == schedule.epochs or evaluation.test_during is None
            if evaluation.val is not None:
                record.update(evaluate(task.eval_model(), evaluation.val, eval_batch_size, device,
                                       precision, split="val"))
                shown["val_top1"] = record["val_top1"]
                # A new best on validation is the "best" epoch so far: its test number is taken
                # on the whole test set, whatever the other epochs use.
                full = full or all(record["val_top1"] > e["val_top1"] for e in result.epochs if "val_top1" in e)
            on = test if full else evaluation.test_during
            record.update(evaluate(task.eval_model(), on, eval_batch_size, device, precision))
            record["test_images"] = len(on)
            shown["top1"] = record["test_top1"]
        record.update(task.epoch_stats())
        result.epochs.append(record)
        progress.epoch_done(epoch, shown)
        if on_epoch is not None:
            on_epoch(record)
        if checkpointer is not None:
            save(0, mid_epoch=False)
        signum = stop_requested()
        if signum is not None and epoch + 1 < schedule.epochs:
            raise Interrupted(signum, epoch + 1, step)
    return result
