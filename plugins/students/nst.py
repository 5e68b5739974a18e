"""NST — Huang & Wang 2017, "Like what you like: knowledge distill via neuron selectivity
transfer".

Each channel's map over the H·W positions is one sample of a distribution ("neuron
selectivity"); NST matches the student's and the teacher's distributions of channels by the
squared MMD with the polynomial kernel k(x, y) = (x·y)². For each matched stage i with post-ReLU
maps (the larger average-pooled, adaptive, to the spatial size of the smaller), per sample b the
channel maps are L2-normalised over positions, ŝ_c = S_{b,c} / ‖S_{b,c}‖, t̂_c likewise, and::

    L_i = mean_{b,c,c'} (t̂_c·t̂_c')² + mean_{b,c,c'} (ŝ_c·ŝ_c')² − 2·mean_{b,c,c'} (ŝ_c·t̂_c')²
    L_NST = Σ_i L_i

(the means over B·C_t², B·C_s² and B·C_s·C_t entries; the first term is a constant computed
without gradient: the reference's ``full_loss = True``, so the loss is the full MMD² ≥ 0).

Features (RepDistiller ``train_student.py`` ``--distill nst``: ``feat_s[1:-1]``, the post-ReLU
stage outputs; mdistiller NST: ``feats[1:]``): ``feats[1:]`` of both nets; the channel counts
may differ. Defaults from the references: recipe weight 50 (``default_weight``: RepDistiller
``scripts/run_cifar_distill.sh`` ``-b 50``, mdistiller ``NST.LOSS.FEAT_WEIGHT``); CE 1.0 is the
separate ``ce`` method.

Reference followed: RepDistiller ``distiller_zoo/NST.py`` (commit 1e2f8169), ``helper/loops.py``
(1143dfea); mdistiller ``mdistiller/distillers/NST.py`` (e8c5bb33) is the same loss.

Deviations from the reference:

* The kernel means are computed from batched Gram matrices (B × C × C, ``bmm``) instead of the
  reference's broadcast product (B × C × C × H·W): the same sums, without the H·W-times larger
  intermediate.
* Pooling: each map is pooled to (min(H_s, H_t), min(W_s, W_t)) (the reference compares heights
  and pools to a square; the same for square maps).
* Different stage counts (never the case on the reference pairs, which ``zip`` from the
  shallowest stage): the deepest k = min(n_s, n_t) stages are paired, as OFD and VID here do.
* Inputs are up-cast to fp32 (the reference trains in fp32) and the loss runs with autocast off:
  the MMD is a difference of near-equal means, which bf16 cannot resolve.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.api import NoParams, StudentMethod, at_least_fp32, hookimpl, saveable
from kdbench_plugins.students._stages import deepest_pairs, matched_stage_count, pool_to_common



def poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over (batch, channel of a, channel of b) of (a_c · b_c')²; a (B, C_a, N), b (B, C_b,
    N)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_stage_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """The squared MMD of one stage, in float32 with autocast off."""
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        f_s, f_t = pool_to_common(at_least_fp32(f_s), at_least_fp32(saveable(f_t)))
        s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
        t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
        return (poly_kernel_mean(t, t).detach() + poly_kernel_mean(s, s)
                - 2 * poly_kernel_mean(s, t))


class NST(StudentMethod):
    default_weight = 50.0

    def __init__(self, params: NoParams, setup):
        super().__init__()
        self.num_stages = matched_stage_count(setup, "nst")

    def forward(self, student, teacher, batch, extra):
        k = self.num_stages
        pairs = deepest_pairs(student, teacher, k)
        return {"nst": sum(nst_stage_loss(f_s, f_t) for f_s, f_t in pairs)}


@hookimpl
def kdbench_register_student_methods(register):
    register("nst", NST,
             help="Neuron selectivity transfer: poly-kernel MMD² of feats[1:] channels (w 50)")
