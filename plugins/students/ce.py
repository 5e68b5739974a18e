"""The student's own cross-entropy with the ground-truth labels.

An explicit term of every method set: the vanilla student is ``[{name = "ce"}]``, Hinton KD is
``ce`` (weight 0.1) + ``kd`` (weight 0.9). Needs no teacher.
"""
import torch.nn.functional as F

from kdbench.api import NoParams, StudentMethod, hookimpl


class CrossEntropy(StudentMethod):
    needs_teacher = False
    default_weight = 1.0

    def __init__(self, params: NoParams, setup):
        super().__init__()

    def forward(self, student, teacher, batch, extra):
        return {"ce": F.cross_entropy(student.logits, batch.y)}


@hookimpl
def kdbench_register_student_methods(register):
    register("ce", CrossEntropy, help="cross-entropy with the labels (the student alone)")
