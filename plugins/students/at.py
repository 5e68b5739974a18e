"""AT — Zagoruyko & Komodakis 2017, "Paying more attention to attention: improving the performance
of convolutional neural networks via attention transfer".

For each matched stage i with post-ReLU maps S_i (student) and T_i (teacher), the larger map
average-pooled (adaptive) to the spatial size of the smaller, and for each sample b the spatial
attention map (channel mean of the p-th power, flattened, L2-normalised)::

    a(F_b) = q / max(‖q‖₂, 1e-12),   q = vec( (1/C) Σ_c F_{b,c}^p )        (a vector of H·W)
    L_AT = Σ_i (1 / (B·H_i·W_i)) Σ_b ‖ a(S_{i,b}) − a(T_{i,b}) ‖²

Features (RepDistiller ``train_student.py`` ``--distill attention``: ``feat_s[1:-1]``, the
post-ReLU outputs of every stage, without the stem and the pooled vector; mdistiller AT:
``feats[1:]``, the same maps): ``feats[1:]`` of both nets. Defaults from the references:
p = 2 (mdistiller ``AT.P``, RepDistiller ``Attention(p=2)``), recipe weight 1000
(``default_weight``: RepDistiller ``scripts/run_cifar_distill.sh`` ``-b 1000``, mdistiller
``AT.LOSS.FEAT_WEIGHT``). CE 1.0 is the separate ``ce`` method (RepDistiller runs AT with
``-a 0``, no KD term).

Reference followed: RepDistiller ``distiller_zoo/AT.py`` (commit 1e2f8169) and the training
loop ``helper/loops.py`` (1143dfea); mdistiller ``mdistiller/distillers/AT.py`` (e8c5bb33) is the
same loss.

Deviations from the reference:

* Pooling: the reference compares the heights only and pools to a square (t_H, t_H); here each
  map is pooled to (min(H_s, H_t), min(W_s, W_t)), which is the same for the square maps of every
  reference pair and also right for non-square ones.
* Different stage counts (never the case on the reference pairs, which ``zip`` the two lists
  from the shallowest stage): the deepest k = min(n_s, n_t) stages of each net are paired, as
  OFD and VID in this benchmark do, so the last stages always meet.
* Inputs are up-cast to fp32 (the reference trains in fp32) and the loss runs with autocast off:
  the p-th power, the normalisation and the squared differences are not bf16-safe.
* The kdbench WRN's ``feats`` are post-ReLU (the BN + ReLU after each group); RepDistiller's
  WRN returns the raw block sums for its first two stages. That difference is in the model
  protocol, not in this loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdbench.api import Params, StudentMethod, at_least_fp32, hookimpl, saveable
from kdbench_plugins.students._stages import deepest_pairs, matched_stage_count, pool_to_common


class ATParams(Params):
    p: float = Field(2.0, gt=0, description="power of the activations in the attention map")



def attention_map(f: Tensor, p: float) -> Tensor:
    """(B, H·W): channel mean of f^p per position, L2-normalised per sample."""
    return F.normalize(f.pow(p).mean(1).reshape(f.shape[0], -1), dim=1)


def at_stage_loss(f_s: Tensor, f_t: Tensor, p: float) -> Tensor:
    """Mean over batch and positions of the squared difference of the two attention maps, in
    float32 with autocast off."""
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        f_s, f_t = pool_to_common(at_least_fp32(f_s), at_least_fp32(saveable(f_t)))
        return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


class AT(StudentMethod):
    default_weight = 1000.0

    def __init__(self, params: ATParams, setup):
        super().__init__()
        self.p = params.p
        self.num_stages = matched_stage_count(setup, "at")

    def forward(self, student, teacher, batch, extra):
        k = self.num_stages
        pairs = deepest_pairs(student, teacher, k)
        return {"at": sum(at_stage_loss(f_s, f_t, self.p) for f_s, f_t in pairs)}


@hookimpl
def kdbench_register_student_methods(register):
    register("at", AT, params=ATParams,
             help="Attention transfer: L2 of normalised p=2 attention maps of feats[1:] (w 1000)")
