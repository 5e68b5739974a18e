"""SP — Tung & Mori 2019, "Similarity-preserving knowledge distillation".

On the last stage's post-ReLU map of each net, flattened per sample (S: B × C_s·H_s·W_s,
T: B × C_t·H_t·W_t), the batch similarity matrices are row-normalised and compared::

    G_s = S Sᵀ,  G_t = T Tᵀ                                   (B × B)
    Ĝ[b, :] = G[b, :] / max(‖G[b, :]‖₂, 1e-12)                (each row a unit vector)
    L_SP = (1 / B²) ‖ Ĝ_t − Ĝ_s ‖_F²

Features (RepDistiller ``train_student.py`` ``--distill similarity``: ``[feat_s[-2]]``, the last
stage's post-ReLU map, the entry before the pooled vector; mdistiller SP: ``[feats[-1]]``, the
same map): ``feats[-1]`` of both nets. Widths and spatial sizes may differ (only B × B matrices
are compared). Defaults from the references: recipe weight 3000 (``default_weight``:
RepDistiller ``scripts/run_cifar_distill.sh`` ``-b 3000``, mdistiller ``SP.LOSS.FEAT_WEIGHT``);
CE 1.0 is the separate ``ce`` method.

Reference followed: RepDistiller ``distiller_zoo/SP.py`` (commit 1e2f8169), ``helper/loops.py``
(1143dfea); mdistiller ``mdistiller/distillers/SP.py`` (e8c5bb33) is the same loss.

Deviations from the reference: none in the loss (the reference returns a 1-element tensor,
here a scalar). Inputs are up-cast to fp32 (the reference trains in fp32) and the Gram matrices,
their normalisation and the difference are computed with autocast off (a bf16 Gram matrix of
vectors of ~10⁴ entries loses the small differences the loss is made of).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.api import NoParams, StudentMethod, UserError, at_least_fp32, hookimpl, saveable



def normalised_gram(f: Tensor) -> Tensor:
    """Row-normalised B × B Gram matrix of the flattened samples."""
    flat = f.reshape(f.shape[0], -1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """‖Ĝ_t − Ĝ_s‖_F² / B², in float32 with autocast off."""
    if f_s.shape[0] != f_t.shape[0]:
        raise UserError(f"sp: student batch {f_s.shape[0]} != teacher batch {f_t.shape[0]}")
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        f_s, f_t = at_least_fp32(f_s), at_least_fp32(saveable(f_t))
        bsz = f_s.shape[0]
        diff = normalised_gram(f_t) - normalised_gram(f_s)
        return (diff * diff).sum() / (bsz * bsz)


class SP(StudentMethod):
    default_weight = 3000.0

    def __init__(self, params: NoParams, setup):
        super().__init__()
        for name, out in (("student", setup.student_out), ("teacher", setup.teacher_out)):
            if len(out.feats) < 2:
                raise UserError(
                    f"sp needs a stage map in feats[1:] of the {name} (it has {len(out.feats)} "
                    "feature maps, stem included)"
                )

    def forward(self, student, teacher, batch, extra):
        return {"sp": sp_loss(student.feats[-1], teacher.feats[-1])}


@hookimpl
def kdbench_register_student_methods(register):
    register("sp", SP,
             help="Similarity-preserving KD: batch Gram matrices of the last stage map (w 3000)")
