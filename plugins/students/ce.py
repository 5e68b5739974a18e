"""The student's own cross-entropy with the ground-truth labels.

An explicit term of every method set: the vanilla student is ``[{name = "ce"}]``, Hinton KD is
``ce`` (weight 0.1) + ``kd`` (weight 0.9). Needs no teacher. The logits are up-cast to fp32
before the loss, autocast off (CUDA/CPU autocast would up-cast them too; this does not rely on
an autocast op list).
"""
import torch
import torch.nn.functional as F

from kdbench.api import NoParams, StudentMethod, at_least_fp32, hookimpl


class CrossEntropy(StudentMethod):
    needs_teacher = False
    default_weight = 1.0

    def __init__(self, params: NoParams, setup):
        super().__init__()

    def forward(self, student, teacher, batch, extra):
        logits = at_least_fp32(student.logits)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return {"ce": F.cross_entropy(logits, batch.y)}


@hookimpl
def kdbench_register_student_methods(register):
    register("ce", CrossEntropy, help="cross-entropy with the labels (the student alone)")
