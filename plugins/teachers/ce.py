"""Plain cross-entropy: the teacher of every baseline row in the paper's tables (λ = 0).

The logits are up-cast to fp32 before the loss, autocast off. The representation the
diagnostics measure for it is the unnormalised logits (the f that CE trains), so a CE teacher's
record is comparable with an intra-class teacher's at the default ``embedding = "logits"``.
"""
import torch
import torch.nn.functional as F

from kdbench.api import NoParams, TeacherObjective, at_least_fp32, hookimpl


def fp32_cross_entropy(logits, y):
    """Cross-entropy of bf16/fp16 logits up-cast to float32 (float32/float64 unchanged), with
    autocast off."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.cross_entropy(at_least_fp32(logits), y)


class CrossEntropy(TeacherObjective):
    # What CE trains is the classifier f itself (the paper's Sec. 3.1): its diagnostics measure
    # Section 4's statistics on the logits too, as for the intra-class teachers' default f.
    representation_name = "logits"

    def __init__(self, params: NoParams, setup):
        super().__init__()

    def forward(self, out, batch, extra, encode):
        return {"ce": fp32_cross_entropy(out.logits, batch.y)}

    def representation(self, out):
        """f(x) = the logits, unnormalised, float32."""
        with torch.autocast(device_type=out.logits.device.type, enabled=False):
            return at_least_fp32(out.logits)


@hookimpl
def kdbench_register_teacher_objectives(register):
    register("ce", CrossEntropy, help="cross-entropy with the labels")
