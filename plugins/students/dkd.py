"""DKD — Zhao, Cui, Song, Qiu & Liang 2022, "Decoupled knowledge distillation" (CVPR).

For logits z (B × C), a target y_i per sample and a temperature T let p = softmax(z / T):

* binary (target vs the rest) probabilities  b_i = (p_{i,y_i}, 1 − p_{i,y_i});
* non-target probabilities  p̂_{i,k} = softmax over k ≠ y_i of z_{i,k} / T   (C − 1 entries).

    TCKD = T² · (1/B) Σ_i KL(b^t_i ‖ b^s_i)
    NCKD = T² · (1/B) Σ_i KL(p̂^t_i ‖ p̂^s_i)
    L_DKD = w(e) · (α · TCKD + β · NCKD),    w(e) = min((e + 1) / warmup_epochs, 1)

with e = ``batch.epoch`` (0-based). Defaults from mdistiller (``mdistiller/engine/cfg.py``:
DKD CE 1.0, ALPHA 1.0, BETA 8.0, T 4.0, WARMUP 20; ``mdistiller/distillers/DKD.py``).

Warm-up: the reference scales the DKD loss by ``min(epoch / WARMUP, 1.0)`` with mdistiller's
epoch counted from 1 (``BaseTrainer.train``: ``epoch = 1 ... while epoch < EPOCHS + 1``), so its
first epoch trains at 1/20 and epoch 20 reaches 1; with kdbench's 0-based epoch that is
(e + 1) / 20, here. Constant within an epoch, as there. ``warmup_epochs = 0`` turns it off.

Weights and the student's CE (read this when writing a recipe): mdistiller trains DKD with
CE weight **1.0** (not KD's 0.1) and the DKD loss at weight 1 (α, β inside): write
``[{name = "ce", weight = 1.0}, {name = "dkd"}]``. ``default_weight`` is 1.0.

Per-pair β in the reference's CIFAR-100 recipes (``configs/cifar100/dkd/*.yaml``; α = 1, T = 4
everywhere): β = 2 for res56→res20 and res110→res32; β = 6 for vgg13→vgg8, vgg13→mv2,
wrn40_2→wrn_16_2 and wrn40_2→wrn_40_1; β = 8 (the default) for res32x4→res8x4, res32x4→shuv1,
res32x4→shuv2, res50→mv2 and wrn40_2→shuv1. (ImageNet: T 1, warm-up 1 epoch, β 0.5 for
r34→r18 and 2.0 for r50→mv1.) Set ``beta`` per pair to follow them.

Returned terms: ``dkd_tckd`` (w·α·TCKD) and ``dkd_nckd`` (w·β·NCKD), in float32 with autocast
off; the teacher's logits only (``teacher_logits_only``: the logit cache can serve it).

Deviations from the reference: none in the loss. How it is computed differs, to the same
value: log b^s from the student's log-softmax (log p_y and logsumexp of the non-target log p)
instead of ``log`` of summed softmax probabilities, and the non-target softmax over the C − 1
gathered columns instead of subtracting 1000 from the target logit (the reference's
exp(−1000 …) is exactly 0 in float32, so both leave the target column out).

Logit standardisation (``logit_standardize = true``; see ``_logits.py``): both logits z-scored
per sample before the temperature; an unset ``temperature`` becomes 2 and both terms are
multiplied by ``ls_scale`` = 9, as the LS reference's ``tools/train.py`` sets DKD (α ← 9·α,
β ← 9·β, T = 2; warm-up unchanged). Its logs use per-pair values (e.g. wrn_40_2→wrn_16_2:
T 2, weight 12, β 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdbench.api import StudentMethod, hookimpl
from kdbench_plugins.students._logits import LogitStandardization, fp32_logit_pair


class DKDParams(LogitStandardization):
    ls_defaults = {"temperature": 2.0, "ls_scale": 9.0}

    alpha: float = Field(1.0, ge=0, description="weight α of the target-class term TCKD")
    beta: float = Field(8.0, ge=0, description="weight β of the non-target-class term NCKD "
                        "(the reference's CIFAR-100 recipes use 2, 6 or 8 per pair)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")
    warmup_epochs: int = Field(20, ge=0, description="epochs of the linear warm-up of the DKD "
                               "loss weight, min((epoch + 1) / warmup_epochs, 1); 0: none")


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """min((epoch + 1) / warmup_epochs, 1) for a 0-based epoch (mdistiller's 1-based
    ``min(epoch / warmup, 1)``); 1 without warm-up."""
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


def dkd_terms(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float,
              standardize: bool = False) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each T² · batch-mean KL, unweighted; float32 with autocast off."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s, t = fp32_logit_pair(student_logits, teacher_logits, standardize, "dkd")
        b, c = s.shape
        gt = F.one_hot(target.long(), c).bool()
        log_p_s = F.log_softmax(s / temperature, dim=1)
        log_p_t = F.log_softmax(t / temperature, dim=1)

        def binary(log_p):  # (log p_target, log(1 − p_target)), (B, 2)
            non_target = log_p.masked_fill(gt, float("-inf")).logsumexp(dim=1)
            return torch.stack([log_p[gt], non_target], dim=1)

        tckd = F.kl_div(binary(log_p_s), binary(log_p_t), reduction="sum", log_target=True) / b
        others = ~gt  # the C − 1 non-target columns of every row, in class order
        log_q_s = F.log_softmax(s[others].view(b, c - 1) / temperature, dim=1)
        log_q_t = F.log_softmax(t[others].view(b, c - 1) / temperature, dim=1)
        nckd = F.kl_div(log_q_s, log_q_t, reduction="sum", log_target=True) / b
        return tckd * temperature**2, nckd * temperature**2


class DKD(StudentMethod):
    default_weight = 1.0  # with ce at weight 1.0, as mdistiller (see docstring)
    teacher_logits_only = True  # its teacher logits may come from the logit cache

    def __init__(self, params: DKDParams, setup):
        super().__init__()
        self.alpha, self.beta = params.alpha, params.beta
        self.temperature = params.temperature
        self.warmup_epochs = params.warmup_epochs
        self.logit_standardize = params.logit_standardize
        self.ls_factor = params.ls_factor

    def forward(self, student, teacher, batch, extra):
        tckd, nckd = dkd_terms(student.logits, teacher.logits, batch.y, self.temperature,
                               self.logit_standardize)
        w = warmup_factor(batch.epoch, self.warmup_epochs) * self.ls_factor
        return {"dkd_tckd": w * self.alpha * tckd, "dkd_nckd": w * self.beta * nckd}


@hookimpl
def kdbench_register_student_methods(register):
    register("dkd", DKD, params=DKDParams,
             help="decoupled KD: target (TCKD) and non-target (NCKD) KL terms, β=8, T=4, "
                  "20-epoch warm-up")
