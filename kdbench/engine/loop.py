"""The training loop shared by teachers and students, and evaluation.

A *task* supplies the step (``loss_terms(batch) -> (terms, logits)``), the modules that train,
and the extra views it needs; :func:`fit` owns the optimizer, the schedule, the metrics and the
progress. Metrics are accumulated on the device and read once per epoch, so the step itself
never synchronises with the host.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from kdbench.api import Batch
from kdbench.data.loader import DeviceData


class Task(Protocol):
    views: tuple[str, ...]

    def modules(self) -> list[nn.Module]: ...  # trained (train mode, in the optimizer)

    def loss_terms(self, batch: Batch) -> tuple[dict[str, Tensor], Tensor]: ...

    def eval_model(self) -> nn.Module: ...

    def epoch_stats(self) -> dict[str, float]: ...


class Diverged(Exception):
    def __init__(self, epoch: int, terms: dict[str, float]):
        self.epoch, self.terms = epoch, terms
        super().__init__(f"loss is not finite at epoch {epoch + 1} ({terms})")


@dataclass
class FitResult:
    epochs: list[dict] = field(default_factory=list)

    @property
    def final(self) -> dict:
        last = self.epochs[-1]
        return {"top1": last["test_top1"], "top5": last["test_top5"], "epoch": last["epoch"]}

    @property
    def best(self) -> dict:
        best = max(self.epochs, key=lambda e: e["test_top1"])
        return {"top1": best["test_top1"], "top5": best["test_top5"], "epoch": best["epoch"]}


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA unless fp32 was asked for; plain fp32 on the CPU."""
    if device.type == "cuda" and precision != "fp32":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16" and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(params, schedule, device: torch.device):
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
             precision: str) -> dict[str, float]:
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
    return {"test_top1": 100.0 * correct1.item() / n, "test_top5": 100.0 * correct5.item() / n,
            "test_loss": loss_sum.item() / n}


def fit(task: Task, schedule, train: DeviceData, test: DeviceData, device: torch.device,
        precision: str, generator: torch.Generator, progress, eval_batch_size: int,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    params = [p for m in task.modules() for p in m.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, schedule, device)
    result = FitResult()
    step = 0
    for epoch in range(schedule.epochs):
        for m in task.modules():
            m.train()
        term_sums: dict[str, Tensor] = {}
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        lr = optimizer.param_groups[0]["lr"]
        for batch in train.train_batches(schedule.batch_size, generator, task.views, epoch,
                                         schedule.epochs, step):
            with autocast(device, precision):
                terms, logits = task.loss_terms(batch)
                loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = batch.y.shape[0]
            seen += n
            loss_sum += loss.detach().float() * n
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0) + value.detach().float() * n
            correct += (logits.detach().argmax(1) == batch.y).sum()
            step += 1
            progress.batch()
        scheduler.step()
        # One host read per epoch: every accumulated metric at once.
        names = list(term_sums)
        values = torch.stack([loss_sum, correct.float(), *[term_sums[k] for k in names]]).tolist()
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": values[0] / seen, "train_top1": 100.0 * values[1] / seen}
        record.update({f"loss_{k}": v / seen for k, v in zip(names, values[2:])})
        if not all(math.isfinite(v) for v in values):
            raise Diverged(epoch, {k: v for k, v in record.items() if k.startswith(("train", "loss"))})
        record.update(evaluate(task.eval_model(), test, eval_batch_size, device, precision))
        record.update(task.epoch_stats())
        result.epochs.append(record)
        progress.epoch_done(epoch, {"loss": record["train_loss"], "top1": record["test_top1"]})
        if on_epoch is not None:
            on_epoch(record)
    return result
