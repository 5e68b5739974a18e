"""Plain cross-entropy: the teacher of every baseline row in the paper's tables (λ = 0)."""
import torch.nn.functional as F

from kdbench.api import NoParams, TeacherObjective, hookimpl


class CrossEntropy(TeacherObjective):
    def __init__(self, params: NoParams, setup):
        super().__init__()

    def forward(self, out, batch, extra, encode):
        return {"ce": F.cross_entropy(out.logits, batch.y)}


@hookimpl
def kdbench_register_teacher_objectives(register):
    register("ce", CrossEntropy, help="cross-entropy with the labels")
