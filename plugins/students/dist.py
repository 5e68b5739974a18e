"""DIST — Huang, You, Wang, Qian & Xu 2022, "Knowledge distillation from a stronger teacher"
(NeurIPS).

For logits z (B × C) and a temperature τ let Y = softmax(z / τ) row-wise; superscripts s/t mark
student/teacher. With the Pearson correlation of two vectors

    ρ(a, b) = ⟨a − ā, b − b̄⟩ / (‖a − ā‖ · ‖b − b̄‖ + ε),    ε = 1e-8,

    inter = τ² · (1 − (1/B) Σ_i ρ(Y^s_{i,:}, Y^t_{i,:}))      (across the classes of each sample)
    intra = τ² · (1 − (1/C) Σ_c ρ(Y^s_{:,c}, Y^t_{:,c}))      (across the samples of each class)
    L_DIST = β · inter + γ · intra

Defaults from the reference: β = γ = 1 (``DIST(beta=1, gamma=1, tau)`` in
``lib/models/losses/kd_loss.py``), τ = 4 (``kd: dist_t4`` in
``configs/strategies/distill/dist_cifar.yaml``), loss weight 2 (``kd_loss_weight: 2.``, with
``ori_loss_weight: 1.`` on the student's CE) — of hunto/image_classification_sota, the
classification code of hunto/DIST_KD. ``default_weight`` is 2.0; pair it with ``ce`` at weight
1.0: ``[{name = "ce", weight = 1.0}, {name = "dist"}]``.

The τ² factors are the reference's (its ``DIST.forward``: ``self.tau**2 * inter_class_relation``,
likewise intra); the ε sits in the denominator as there (added to the product of the norms, no
clamp). A batch of one sample has no spread across samples: every class column is constant,
ρ = 0/ε = 0, so intra = τ² with zero gradient (finite, as in the reference).

Scale (measured; read this before a short or tiny recipe): a correlation ignores the scale of
its inputs, so its gradient grows as the student's softmax flattens — about as 1 / (spread of
the student's logits). B = 64, C = 10, teacher logits of std 3, student logits of std 0.01 /
0.1 / 1 / 3: the gradient norm of 2·L_DIST on the student's logits is 257 / 25 / 2.8 / 0.9,
that of 0.9·KD(T = 4) ≈ 0.12–0.16 throughout; the loss itself stays ≈ 2·τ²·2 ≈ 64 while the
correlations are near 0. A fresh student with near-zero logits therefore takes large first
steps (the reference has the same property; nothing here clips it).

Returned terms: ``dist_inter`` (β·inter) and ``dist_intra`` (γ·intra), float32 with autocast
off; the teacher's logits only (``teacher_logits_only``: the logit cache can serve it).

Deviations from the reference: none in the loss (inputs up-cast to float32).

Logit standardisation (``logit_standardize = true``; see ``_logits.py``): both logits z-scored
per sample before the temperature. The LS reference has no DIST, so nothing else changes:
τ stays 4 unless set, ``ls_scale`` defaults to 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdbench.api import StudentMethod, hookimpl
from kdbench_plugins.students._logits import LogitStandardization, fp32_logit_pair

PEARSON_EPS = 1e-8  # the reference's cosine_similarity eps


class DISTParams(LogitStandardization):
    ls_defaults = {"ls_scale": 1.0}

    beta: float = Field(1.0, ge=0, description="weight β of the inter-class relation")
    gamma: float = Field(1.0, ge=0, description="weight γ of the intra-class relation")
    temperature: float = Field(4.0, gt=0, description="softmax temperature τ")


def pearson_rows(a: Tensor, b: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``, shape (rows,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
               standardize: bool = False) -> tuple[Tensor, Tensor]:
    """(inter, intra), each with its τ², unweighted; float32 with autocast off."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s, t = fp32_logit_pair(student_logits, teacher_logits, standardize, "dist")
        y_s, y_t = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
        inter = 1 - pearson_rows(y_s, y_t).mean()
        intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
        return inter * temperature**2, intra * temperature**2


class DIST(StudentMethod):
    default_weight = 2.0  # the reference's kd_loss_weight, with ce at 1.0
    teacher_logits_only = True  # its teacher logits may come from the logit cache

    def __init__(self, params: DISTParams, setup):
        super().__init__()
        self.beta, self.gamma = params.beta, params.gamma
        self.temperature = params.temperature
        self.logit_standardize = params.logit_standardize
        self.ls_factor = params.ls_factor

    def forward(self, student, teacher, batch, extra):
        inter, intra = dist_terms(student.logits, teacher.logits, self.temperature,
                                  self.logit_standardize)
        return {"dist_inter": self.ls_factor * self.beta * inter,
                "dist_intra": self.ls_factor * self.gamma * intra}


@hookimpl
def kdbench_register_student_methods(register):
    register("dist", DIST, params=DISTParams,
             help="DIST: Pearson-correlation relations across classes and across samples (τ=4)")
