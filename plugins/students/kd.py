"""KD — Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network".

    L_KD = T² · (1/B) Σ_b KL( softmax(t_b / T) ‖ softmax(s_b / T) )

KL summed over classes, averaged over the batch, scaled by T² so gradients keep their size
across temperatures. Defaults from the method card: T = 4, weight 0.9 (the student's CE term,
weight 0.1, is the separate ``ce`` method in the recipe).

Deviations from the reference: none in the loss; inputs are up-cast to fp32 before the loss (the
reference trains in fp32), with autocast off: under bf16 the log-softmax / KL of bf16 logits
lose the small KL of a student close to its teacher (it can even come out negative).
"""
import torch
import torch.nn.functional as F
from pydantic import Field

from kdbench.api import Params, StudentMethod, at_least_fp32, hookimpl


class KDParams(Params):
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")



def kd_loss(student_logits, teacher_logits, temperature: float):
    """T² · batch-mean KL(softmax(t/T) ‖ softmax(s/T)), in float32 with autocast off."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student_logits, teacher_logits = at_least_fp32(student_logits), at_least_fp32(teacher_logits)
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

    def forward(self, student, teacher, batch, extra):
        return {"kd": kd_loss(student.logits, teacher.logits, self.temperature)}


@hookimpl
def kdbench_register_student_methods(register):
    register("kd", KD, params=KDParams, help="Hinton KD: KL between softened logits (T=4)")
