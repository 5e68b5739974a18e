"""DOT — Zhao, Cui, Song & Liang 2023, "DOT: A Distillation-Oriented Trainer" (ICCV).

SGD with one momentum buffer per loss: the task (label) loss's gradient and the distillation
loss's gradient keep separate buffers, the distillation one with the larger momentum::

    v_task ← (μ − Δ) · v_task + ∇L_task + λ·θ
    v_kd   ← (μ + Δ) · v_kd   + ∇L_kd
    θ      ← θ − η · v_task − η · v_kd

μ, λ and η are the student schedule's momentum, weight decay and (MultiStepLR-stepped) lr;
Δ = 0.075, the reference's ``SOLVER.DOT.DELTA`` in every CIFAR-100 config
(``configs/cifar100/dot/*.yaml``, megvii-research/mdistiller). A buffer's first value is its
first gradient (torch SGD's convention). With Δ = 0 and every parameter in both losses this is
plain SGD on the summed loss.

In a recipe DOT is an optimizer, not a loss: mdistiller's DOT row is KD (CE 0.1, KD 0.9, T = 4)
trained with it::

    [[method_sets]]
    label = "DOT"
    methods = [{ name = "ce", weight = 0.1 }, { name = "kd", weight = 0.9 }]
    optimizer = "dot"

The task loss is the sum of the set's methods that need no teacher (``ce``), the distillation
loss the sum of the others, each weighted as the recipe says: the reference's ``loss_ce`` and
``loss_kd``. Each step is two backward passes through the same forward (distillation first,
graph retained, then the task loss), as the reference's ``DOT.train_iter``.

Parameters reached by one loss only (mdistiller ``engine/dot.py``): a parameter with no
distillation gradient (e.g. the classifier under a feature-only method) updates its task buffer
with the mean momentum (2μ)/2 = μ; a parameter with no task gradient (a method's own modules:
CRD's embeddings, FitNet's regressor) updates its distillation buffer with momentum μ and takes
the weight decay there.

Deviations from the reference:

* none in the update, including its one quirk, kept: a parameter reached by the distillation
  loss only gets no weight decay at its first step (its buffer starts as the raw gradient).
* Any number of parameter groups (the reference asserts one); the momentum buffers are
  ``momentum_buffer`` and ``distillation_momentum_buffer`` in the optimizer's state (the
  reference: ``momentum_buffer`` and ``momentum_kd_buffer``), checkpointed as any optimizer's.
* The update runs as ``torch._foreach_*`` ops over each group's parameters (the reference
  loops over tensors in Python); the arithmetic is the same, op for op.
* bf16 autocast is allowed (the reference refuses AMP because of its fp16 GradScaler; bf16
  needs none). Under torchrun (DDP) it is refused: DDP allows one backward per forward.
* The initialisation stages of FitNet-like methods train with plain SGD, as without DOT.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdbench.api import Params, StudentOptimizer, hookimpl


class DOTParams(Params):
    delta: float = Field(0.075, ge=0, lt=1, description="Δ: the task loss's gradients keep momentum "
                         "μ − Δ and the distillation loss's μ + Δ (μ: the schedule's momentum)")


class DistillationOrientedSGD(torch.optim.Optimizer):
    """SGD with separate momentum buffers for two losses (see the module docstring). Call
    :meth:`hold_distillation_grads` after the distillation loss's backward, then the task loss's
    backward, then :meth:`step`."""

    def __init__(self, params, lr: float, momentum_task: float, momentum_distill: float,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum_task=momentum_task,
                                      momentum_distill=momentum_distill, weight_decay=weight_decay))
        self._held: dict[Tensor, Tensor] = {}  # parameter -> its distillation gradient

    @torch.no_grad()
    def hold_distillation_grads(self) -> None:
        self._held = {p: p.grad for g in self.param_groups for p in g["params"] if p.grad is not None}

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("DistillationOrientedSGD.step takes no closure (two backward passes "
                             "precede it: see hold_distillation_grads)")
        held, self._held = self._held, {}
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            m_task, m_distill = group["momentum_task"], group["momentum_distill"]
            m_one = (m_task + m_distill) / 2  # for a parameter only one of the losses reaches
            task = [p for p in group["params"] if p.grad is not None]
            distill = [p for p in group["params"] if p in held]
            in_task = set(task)
            # The task gradients first, for every parameter that has one (as the reference).
            grads = [p.grad for p in task]
            if decay:
                grads = torch._foreach_add(grads, task, alpha=decay)
            self._update(task, grads, "momentum_buffer",
                         [m_task if p in held else m_one for p in task], lr)
            # Then the distillation gradients; weight decay only where no task gradient took it
            # (and, as the reference, not at a distillation-only buffer's first step).
            grads = [held[p] for p in distill]
            if decay:
                grads = [g.add(p, alpha=decay) if p not in in_task and "distillation_momentum_buffer" in self.state[p]
                         else g for p, g in zip(distill, grads)]
            self._update(distill, grads, "distillation_momentum_buffer",
                         [m_distill if p in in_task else m_one for p in distill], lr)

    def _update(self, params: list[Tensor], grads: list[Tensor], key: str, momenta: list[float],
                lr: float) -> None:
        """buf ← m·buf + g (buf ← g at its first step), p ← p − lr·buf, for each parameter."""
        if not params:
            return
        old = [i for i, p in enumerate(params) if key in self.state[p]]
        for i, p in enumerate(params):
            if key not in self.state[p]:
                self.state[p][key] = torch.clone(grads[i]).detach()
        if old:
            bufs = [self.state[params[i]][key] for i in old]
            for m in sorted({momenta[i] for i in old}):  # one foreach call per momentum value
                these = [b for b, i in zip(bufs, old) if momenta[i] == m]
                torch._foreach_mul_(these, m)
            torch._foreach_add_(bufs, [grads[i] for i in old])
        torch._foreach_add_(params, [self.state[p][key] for p in params], alpha=-lr)


class DOT(StudentOptimizer):
    supports_ddp = False  # two backward passes per forward

    def __init__(self, params: DOTParams):
        self.delta = params.delta

    @classmethod
    def schedule_problems(cls, params: DOTParams, schedule) -> list[str]:
        problems = []
        if schedule.nesterov:
            problems.append("nesterov = true: DOT has no Nesterov form (the reference's has "
                            "none); set nesterov = false")
        if schedule.momentum - params.delta < 0 or schedule.momentum + params.delta >= 1:
            problems.append(f"momentum {schedule.momentum} ± delta {params.delta} must stay in "
                            "[0, 1) (the task momentum is momentum − delta, the distillation "
                            "momentum momentum + delta); lower delta")
        return problems

    def build(self, parameters, schedule, device):
        return DistillationOrientedSGD(parameters, lr=schedule.lr,
                                       momentum_task=schedule.momentum - self.delta,
                                       momentum_distill=schedule.momentum + self.delta,
                                       weight_decay=schedule.weight_decay)

    def step(self, optimizer, label_loss, distillation_loss):
        optimizer.zero_grad(set_to_none=True)
        distillation_loss.backward(retain_graph=True)
        optimizer.hold_distillation_grads()
        optimizer.zero_grad(set_to_none=True)
        label_loss.backward()
        optimizer.step()


@hookimpl
def kdbench_register_optimizers(register):
    register("dot", DOT, params=DOTParams,
             help="DOT: separate momenta for the task and distillation gradients (μ ∓ 0.075)")
