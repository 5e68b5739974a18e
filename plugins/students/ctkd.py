"""CTKD — Li, Li, Yang, Zhao, Song, Luo, Li & Yang 2023, "Curriculum temperature for knowledge
distillation" (AAAI).

KD with a learned temperature that is trained *against* the student: a gradient reversal layer
(GRL) between a learnable scalar θ and the temperature, with a reversal strength λ that grows
over the epochs (the curriculum: easy → hard).

    T = T_min + T_range · sigmoid(GRL_λ(θ))          (global temperature, one scalar)
    L_CTKD = T² · (1/B) Σ_b KL( softmax(t_b / T) ‖ softmax(s_b / T) )

GRL_λ is the identity forward and multiplies the gradient by −λ backward: the student descends
L, θ ascends it (λ > 0), i.e. the temperature moves to make distillation harder. The schedule
(``CosineDecay`` in the reference's train_student.py, with the values of
scripts/run_cifar_distill.sh: ``--cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10``):

    λ(e) = λ_start + (λ_end − λ_start) · (1 − cos(π · min(e + 1, n) / n)) / 2,   n = 10,

λ_start = 0, λ_end = 1, e = ``batch.epoch`` (0-based; the reference's epoch counts from 1 and
multiplies the gradient by its "decay value" −λ: −0.0245 in its first epoch, −1 from epoch 10 on,
as its logs record). Constant within an epoch.

Defaults from the reference (zhengli97/CTKD): θ initialised to 1 (``Global_T``:
``nn.Parameter(torch.ones(1))``), T_min = 1 and T_range = 20 (``--t_start 1 --t_end 20``: the
"end" is the range, T ∈ (1, 21); at θ = 1, T = 1 + 20·sigmoid(1) ≈ 15.62), CE 0.1 and KD 0.9
(``-r 0.1 -a 0.9``). ``default_weight`` is 0.9; pair it with ``ce`` at 0.1, as KD. The
temperature receives the recipe weight's share of the gradient, as the reference's θ does
(``loss = 0.1·CE + 0.9·L_KD``). θ is a parameter of this method: it trains with the student
(the optimiser gets every method's parameters: the same SGD, learning rate schedule and
weight decay as the student's, as the reference's ``trainable_list``), and it is checkpointed
with the method's state.

Global versus instance temperature: the reference's code has the global temperature only
(``--mlp_name global``; any other name leaves no temperature module); the instance-wise variant
(an MLP predicting one temperature per sample) is described in its README and released outside
the repository. This plugin implements the global version (the default there) and nothing else.

Returned term: ``ctkd``; ``epoch_stats`` records the temperature after the epoch
(``ctkd_temperature``). The teacher's logits only (``teacher_logits_only``: the logit cache can
serve it). Everything in float32 with autocast off.

Deviations from the reference: none in the loss. The reference's alternative linear schedule
(``--cosine_decay 0``) is not offered. θ is a 0-dim tensor (the reference's has shape (1,)),
so the loss is a scalar.

Logit standardisation (``logit_standardize = true``; see ``_logits.py``): both logits z-scored
per sample before the (learned) temperature, and the term multiplied by ``ls_scale`` = 10
(0.9 → 9), as the LS reference's CTKD copy trains (``-r 0.1 -a 9``; its ``--kd_T 2`` is unused
with a learned temperature). Its ``train_student.py`` picks the standardised KL when
``--logit_stand`` is *not* given (the condition is inverted), so its script's runs standardise.
Its logs show temperatures settling just above 2 (and first epochs near 22–30), i.e. a
different T_min/T_range than the script's 1/20, which it does not record; set
``temperature_min`` / ``temperature_range`` to try them.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import StudentMethod, hookimpl
from kdbench_plugins.students._logits import LogitStandardization
from kdbench_plugins.students.kd import kd_loss


class CTKDParams(LogitStandardization):
    ls_defaults = {"ls_scale": 10.0}

    temperature_min: float = Field(1.0, gt=0, description="lowest temperature T_min "
                                   "(the reference's --t_start)")
    temperature_range: float = Field(20.0, gt=0, description="T = T_min + T_range·sigmoid(θ), "
                                     "so T < T_min + T_range (the reference's --t_end)")
    theta_init: float = Field(1.0, description="initial θ (the reference's torch.ones(1))")
    reversal_start: float = Field(0.0, ge=0, description="reversal strength λ at the start of "
                                  "the curriculum (the reference's -decay_max)")
    reversal_end: float = Field(1.0, ge=0, description="reversal strength λ at its end "
                                "(the reference's -decay_min)")
    reversal_epochs: int = Field(10, ge=1, description="epochs of the cosine ramp of λ "
                                 "(the reference's --decay_loops)")


def reversal_strength(epoch: int, start: float, end: float, epochs: int) -> float:
    """λ for a 0-based ``epoch``: the reference's CosineDecay at its 1-based epoch, negated."""
    i = min(epoch + 1, epochs)
    return start + (end - start) * (1.0 - math.cos(math.pi * i / epochs)) / 2.0


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by −λ."""

    @staticmethod
    def forward(ctx, x, strength: float):
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.strength * grad, None


def reverse_grad(x: Tensor, strength: float) -> Tensor:
    return _ReverseGrad.apply(x, strength)


class CTKD(StudentMethod):
    default_weight = 0.9  # with ce at 0.1, as the reference (-r 0.1 -a 0.9)
    teacher_logits_only = True  # its teacher logits may come from the logit cache

    def __init__(self, params: CTKDParams, setup):
        super().__init__()
        self.t_min, self.t_range = params.temperature_min, params.temperature_range
        self.schedule = (params.reversal_start, params.reversal_end, params.reversal_epochs)
        self.logit_standardize = params.logit_standardize
        self.ls_factor = params.ls_factor
        device = setup.device if setup is not None else None
        self.theta = nn.Parameter(torch.tensor(float(params.theta_init), device=device))

    def temperature(self, strength: float = 0.0) -> Tensor:
        """T from θ (0-dim, float32); the gradient reaching θ is reversed and scaled by λ."""
        theta = self.theta.float()
        return self.t_min + self.t_range * torch.sigmoid(reverse_grad(theta, strength))

    def forward(self, student, teacher, batch, extra):
        with torch.autocast(device_type=student.logits.device.type, enabled=False):
            T = self.temperature(reversal_strength(batch.epoch, *self.schedule))
            loss = kd_loss(student.logits, teacher.logits, T, standardize=self.logit_standardize)
        return {"ctkd": loss * self.ls_factor if self.logit_standardize else loss}

    def epoch_stats(self) -> dict[str, float]:
        with torch.no_grad():
            return {"ctkd_temperature": float(self.temperature())}


@hookimpl
def kdbench_register_student_methods(register):
    register("ctkd", CTKD, params=CTKDParams,
             help="curriculum temperature KD: a learned temperature trained through a gradient "
                  "reversal layer, cosine curriculum over 10 epochs")
