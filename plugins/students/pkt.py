"""PKT — Passalis & Tefas 2018, "Learning deep representations with probabilistic knowledge
transfer".

On the pooled penultimate vectors s_b (student) and t_b (teacher) of a batch of B samples, with
ε = 1e-7: unit vectors x̂ = x / (‖x‖₂ + ε) (NaN entries set to 0), cosine kernels scaled to [0, 1]
and normalised per row into conditional probabilities, then their KL divergence::

    K_ij = (x̂_i · x̂_j + 1) / 2,      P_ij = K_ij / Σ_j' K_ij'          (for s and for t)
    L_PKT = (1 / B²) Σ_{i,j} P^t_ij · log( (P^t_ij + ε) / (P^s_ij + ε) )

Features (RepDistiller ``train_student.py`` ``--distill pkt``: ``feat_s[-1]``, the pooled
vector; mdistiller PKT: ``pooled_feat``): ``pooled`` of both nets (their widths may differ).
Defaults from the references: ε = 1e-7, recipe weight 30000 (``default_weight``: RepDistiller
``scripts/run_cifar_distill.sh`` ``-b 30000``, mdistiller ``PKT.LOSS.FEAT_WEIGHT``); CE 1.0 is
the separate ``ce`` method.

Reference followed: RepDistiller ``distiller_zoo/PKT.py`` (commit 1e2f8169),
``helper/loops.py`` (1143dfea); mdistiller ``mdistiller/distillers/PKT.py`` (e8c5bb33) is the
same loss.

Deviations from the reference: none in the loss value (the NaN entries are replaced out of place
instead of by in-place masked assignment, the same values). The norm is
``torch.linalg.vector_norm`` instead of ``sqrt(sum(x²))``: the same number, but its gradient at
an all-zero vector (a sample whose pooled ReLU features are all 0) is 0 instead of the
reference's NaN (0 · ∞ from the square root), which would poison every weight. Inputs are
up-cast to fp32 (the reference trains in fp32) and the loss runs with autocast off: with
ε = 1e-7 and probabilities of order 1/B, a bf16 log ratio would be noise.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdbench.api import Params, StudentMethod, UserError, at_least_fp32, hookimpl, saveable


class PKTParams(Params):
    eps: float = Field(1e-7, gt=0, description="added to the norms and inside the log ratio")



def conditional_probabilities(x: Tensor, eps: float) -> Tensor:
    """Row-normalised (cosine + 1) / 2 kernel of the batch, B × B."""
    unit = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)
    unit = torch.where(torch.isnan(unit), torch.zeros_like(unit), unit)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(1, keepdim=True)


def pkt_loss(f_s: Tensor, f_t: Tensor, eps: float = 1e-7) -> Tensor:
    """Mean over the B² entries of P_t · log((P_t + ε) / (P_s + ε)), in float32, autocast off."""
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        s = at_least_fp32(f_s).reshape(f_s.shape[0], -1)
        t = at_least_fp32(saveable(f_t)).reshape(f_t.shape[0], -1)
        p_s, p_t = conditional_probabilities(s, eps), conditional_probabilities(t, eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class PKT(StudentMethod):
    default_weight = 30000.0

    def __init__(self, params: PKTParams, setup):
        super().__init__()
        self.eps = params.eps
        for name, out in (("student", setup.student_out), ("teacher", setup.teacher_out)):
            if out.pooled is None or out.pooled.dim() != 2:
                shape = None if out.pooled is None else tuple(out.pooled.shape)
                raise UserError(f"pkt needs the {name}'s pooled vector (B, D); it has {shape}")

    def forward(self, student, teacher, batch, extra):
        if student.pooled.shape[0] != teacher.pooled.shape[0]:
            raise UserError(f"pkt: student batch {student.pooled.shape[0]} != teacher batch "
                            f"{teacher.pooled.shape[0]}")
        return {"pkt": pkt_loss(student.pooled, teacher.pooled, self.eps)}


@hookimpl
def kdbench_register_student_methods(register):
    register("pkt", PKT, params=PKTParams,
             help="Probabilistic KT: KL of cosine-kernel probabilities of pooled (w 30000)")
