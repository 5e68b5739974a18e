"""Logit MSE — Ba & Caruana 2014, "Do deep nets really need to be deep?" (NeurIPS).

The student regresses the teacher's logits (pre-softmax outputs) with a squared error::

    L = 1/(2B) Σ_b Σ_c ( s_bc − t_bc )²

for a batch of B samples, student logits s and teacher logits t over the C classes. This is the
paper's loss (1/2T Σ_t ‖g(x_t; W, β) − z_t‖², T training samples) per mini-batch. With
``center = true`` each sample's logits are shifted to zero mean first,
s_bc ← s_bc − (1/C) Σ_c' s_bc' (and likewise t), which ignores the shift that the softmax does not
see; it is the limit of Hinton KD at high temperature for zero-mean logits (Hinton et al. 2015,
§2.1). The teacher's logits are treated as constants: only the student receives gradients.

Use it next to the student's own cross-entropy, e.g.
``methods = [{ name = "ce", weight = 0.1 }, { name = "logit_mse", weight = 0.9 }]``.
"""
from __future__ import annotations

from pydantic import Field
from torch import Tensor

from kdbench.api import Params, StudentMethod, hookimpl


class LogitMSEParams(Params):
    center: bool = Field(False, description="subtract each sample's mean logit before comparing")


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, center: bool = False) -> Tensor:
    """1/(2B) Σ_b Σ_c (s_bc − t_bc)², teacher detached; fp32 whatever the autocast dtype."""
    s = student_logits.float()
    t = teacher_logits.detach().float()
    if center:
        s = s - s.mean(dim=1, keepdim=True)
        t = t - t.mean(dim=1, keepdim=True)
    return 0.5 * (s - t).pow(2).sum(dim=1).mean()


class LogitMSE(StudentMethod):
    default_weight = 1.0  # the paper trains on the mimic loss alone

    def __init__(self, params: LogitMSEParams, setup=None):
        super().__init__()
        self.center = params.center

    def forward(self, student, teacher, batch, extra):
        return {"logit_mse": logit_mse(student.logits, teacher.logits, self.center)}


@hookimpl
def kdbench_register_student_methods(register):
    register("logit_mse", LogitMSE, params=LogitMSEParams,
             help="Ba & Caruana 2014: squared error between student and teacher logits")
