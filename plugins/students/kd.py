"""KD — Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network".

    L_KD = T² · (1/B) Σ_b KL( softmax(t_b / T) ‖ softmax(s_b / T) )

KL summed over classes, averaged over the batch, scaled by T² so gradients keep their size
across temperatures. Defaults from the method card: T = 4, weight 0.9 (the student's CE term,
weight 0.1, is the separate ``ce`` method in the recipe).

Deviations from the reference: none in the loss; inputs are up-cast to fp32 before the loss (the
reference trains in fp32), with autocast off: under bf16 the log-softmax / KL of bf16 logits
lose the small KL of a student close to its teacher (it can even come out negative).

Logit standardisation (``logit_standardize = true``; Sun et al. 2024, see ``_logits.py``): both
logits are z-scored per sample before the temperature; an unset ``temperature`` becomes 2 and
the term is multiplied by ``ls_scale`` = 10 (recipe weight 0.9 → the reference's KD weight 9),
as the LS reference's ``tools/train.py`` sets KD (T = base temp 2, KD weight 9, CE 0.1).
"""
import torch
import torch.nn.functional as F
from pydantic import Field

from kdbench.api import StudentMethod, at_least_fp32, hookimpl
from kdbench_plugins.students._logits import LogitStandardization, standardize_logits


class KDParams(LogitStandardization):
    ls_defaults = {"temperature": 2.0, "ls_scale": 10.0}

    temperature: float = Field(4.0, gt=0, description="softmax temperature T")


def kd_loss(student_logits, teacher_logits, temperature, *, standardize: bool = False):
    """T² · batch-mean KL(softmax(t/T) ‖ softmax(s/T)), in float32 with autocast off; with
    ``standardize`` both logits are z-scored per sample first. ``temperature`` may be a 0-dim
    tensor (CTKD's learned one)."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student_logits, teacher_logits = at_least_fp32(student_logits), at_least_fp32(teacher_logits)
        if standardize:
            student_logits = standardize_logits(student_logits)
            teacher_logits = standardize_logits(teacher_logits)
        log_p_s = F.log_softmax(student_logits / temperature, dim=1)
        log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return kl * temperature**2


class KD(StudentMethod):
    default_weight = 0.9
    teacher_logits_only = True  # its teacher logits may come from the logit cache

    def __init__(self, params: KDParams, setup):
        super().__init__()
        self.temperature = params.temperature
        self.logit_standardize = params.logit_standardize
        self.ls_factor = params.ls_factor

    def forward(self, student, teacher, batch, extra):
        loss = kd_loss(student.logits, teacher.logits, self.temperature,
                       standardize=self.logit_standardize)
        return {"kd": loss * self.ls_factor if self.logit_standardize else loss}


@hookimpl
def kdbench_register_student_methods(register):
    register("kd", KD, params=KDParams, help="Hinton KD: KL between softened logits (T=4)")
