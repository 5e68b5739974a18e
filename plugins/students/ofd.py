"""OFD — Heo, Kim, Yun, Park, Kwak & Choi 2019, "A comprehensive overhaul of feature distillation".

Distils the pre-ReLU stage outputs ``preact_feats[1:]`` of both nets. For each matched stage i
(of k), the student map goes through a connector ``r`` (conv 1x1 s_ch -> t_ch, no bias, + BN)
and the teacher map through the margin ReLU ``σ_m(t) = max(t, m)``, with one margin m per
teacher channel. The partial L2 distance skips positions where the student is already below a
non-positive target::

    d_i = Σ_{positions, channels}  [ not (r(s) <= σ_m(t) and σ_m(t) <= 0) ] · (r(s) − σ_m(t))²
    L_OFD = (1/B) Σ_i d_i / 2^(k−i−1)          (i = 0 .. k−1, shallowest first)

Margin per channel (expectation of the negative part of the teacher's pre-ReLU response,
modelled as N(β, γ²) from the BN that feeds the stage's final ReLU), computed once at
construction from ``teacher.bn_before_relu()`` and stored as buffers::

    s = |γ|, m = β;  if Φ(−m/s) > 0.001: margin = m − s · exp(−(m/s)²/2) / √(2π) / Φ(−m/s)
                     else:               margin = −3s

Scaling (identical total to the official code): the official CIFAR-100 loop adds
``loss_distill.sum() / batch_size / 1000`` to the CE. Here the term ``ofd`` is the per-sample
sum ``Σ_i d_i / 2^(k−i−1) / B`` and ``default_weight = 0.001`` carries the 1/1000 (the card's
"feature weight 0.001"), so ``weight · term`` equals the official term exactly. CE 1.0 is the
separate ``ce`` method.

Teacher mode: the official training loop calls ``d_net.t_net.train()`` every epoch, i.e. the
teacher's BN uses batch statistics (and updates its running statistics) during distillation;
mdistiller's OFD does the same (its ``train()`` override puts every child, the teacher included,
in train mode). So ``teacher_train_mode = True``. The margins depend only on γ and β, which never
change, so computing them once is exact.

Choices and deviations (documented):

* Masking uses the clamped target σ_m(t), as in the official ``distillation_loss`` (target is
  replaced by ``max(t, margin)`` before the mask ``(s > target) | (target > 0)``) and the paper.
* Connector init as the official code: conv ~ N(0, sqrt(2 / (k·k·out))), BN weight 1, bias 0.
  Channel counts come from the setup's dummy forward, not from hard-coded tables.
* Spatial sizes: the official CIFAR pairs always have equal sizes. For other pairs the teacher
  map is ``F.adaptive_avg_pool2d``-ed to the student's size, as mdistiller does. When the
  teacher map is larger this is average pooling; when it is *smaller* the same call returns
  the student's size by repeating each teacher value over a block (nearest-neighbour upsampling
  for integer ratios), i.e. the loss is still taken on the student's grid, exactly as mdistiller.
* Different stage counts: the deepest k = min(n_s, n_t) stages of each are matched (as
  mdistiller's ``_align_list``), and the margins come from the matching (deepest k) teacher BNs
  — mdistiller indexes its margins from the shallowest teacher stage instead, which misaligns
  them when the counts differ; we do not copy that.
* A BN with γ = 0 (official code: division by zero) gets the limit of the formula as s -> 0,
  margin = min(β, 0).
* The Gaussian CDF is computed with ``math.erfc`` (no scipy); values agree with scipy's
  ``norm.cdf`` to double precision.
* Inputs are up-cast to fp32 before the loss (the reference trains in fp32): the connectors may
  run under bf16 autocast, their outputs and the teacher maps are up-cast (before the teacher's
  pooling) and the partial L2 is summed in fp32 with autocast off.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.api import NoParams, StudentMethod, UserError, at_least_fp32, hookimpl


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def margins_from_bn(bn: nn.BatchNorm2d) -> Tensor:
    """Per-channel OFD margins (float32, shape (C,)) from a BN's affine parameters."""
    if bn.weight is None or bn.bias is None:
        raise UserError("OFD needs affine BatchNorm layers in the teacher's bn_before_relu()")
    out = []
    for gamma, beta in zip(bn.weight.detach().double().cpu().tolist(),
                           bn.bias.detach().double().cpu().tolist()):
        s, m = abs(gamma), beta
        if s == 0.0:
            out.append(min(m, 0.0))
            continue
        cdf = _normal_cdf(-m / s)
        if cdf > 0.001:
            out.append(m - s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf)
        else:
            out.append(-3.0 * s)
    return torch.tensor(out, dtype=torch.float32)



def partial_l2(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """Σ over positions where not (source <= σ_m(t) <= 0) of (source − σ_m(t))²; margin (C,).
    bf16/fp16 inputs are up-cast: the sum is taken in float32 with autocast off."""
    with torch.autocast(device_type=source.device.type, enabled=False):
        source, target = at_least_fp32(source), at_least_fp32(target)
        target = torch.max(target, margin.view(1, -1, 1, 1).to(target))
        mask = (source > target) | (target > 0)
        return ((source - target) ** 2 * mask.to(source.dtype)).sum()


def _connector(s_ch: int, t_ch: int) -> nn.Sequential:
    conv = nn.Conv2d(s_ch, t_ch, kernel_size=1, stride=1, padding=0, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (1 * 1 * t_ch)))
    bn = nn.BatchNorm2d(t_ch)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


class OFD(StudentMethod):
    default_weight = 0.001
    teacher_train_mode = True

    def __init__(self, params: NoParams, setup):
        super().__init__()
        s_feats = setup.student_out.preact_feats[1:]
        t_feats = setup.teacher_out.preact_feats[1:]
        k = min(len(s_feats), len(t_feats))
        if k == 0:
            raise UserError("OFD needs at least one stage in preact_feats[1:] of both nets")
        self.num_stages = k
        s_feats, t_feats = s_feats[-k:], t_feats[-k:]
        t_bns = list(setup.teacher.bn_before_relu())
        if len(t_bns) != len(setup.teacher_out.preact_feats) - 1:
            raise UserError(
                f"OFD: teacher bn_before_relu() has {len(t_bns)} layers but preact_feats[1:] "
                f"has {len(setup.teacher_out.preact_feats) - 1} stages"
            )
        t_bns = t_bns[-k:]
        self.connectors = nn.ModuleList()
        for i, (fs, ft, bn) in enumerate(zip(s_feats, t_feats, t_bns)):
            t_ch = ft.shape[1]
            if bn.num_features != t_ch:
                raise UserError(
                    f"OFD: teacher BN {i} has {bn.num_features} channels, its stage {t_ch}"
                )
            self.connectors.append(_connector(fs.shape[1], t_ch))
            self.register_buffer(f"margin{i}", margins_from_bn(bn).to(ft.device))

    def margins(self) -> list[Tensor]:
        return [getattr(self, f"margin{i}") for i in range(self.num_stages)]

    def forward(self, student, teacher, batch, extra):
        k = self.num_stages
        s_feats = student.preact_feats[1:][-k:]
        t_feats = teacher.preact_feats[1:][-k:]
        batch_size = s_feats[0].shape[0]
        total = at_least_fp32(s_feats[0]).new_zeros(())
        for i, (fs, ft, conn, margin) in enumerate(
            zip(s_feats, t_feats, self.connectors, self.margins())
        ):
            source = at_least_fp32(conn(fs))  # the connector may run in bf16; the loss does not
            with torch.autocast(device_type=source.device.type, enabled=False):
                target = at_least_fp32(ft.detach())
                if target.shape[-2:] != source.shape[-2:]:
                    target = F.adaptive_avg_pool2d(target, source.shape[-2:])
                total = total + partial_l2(source, target, margin) / 2 ** (k - i - 1)
        return {"ofd": total / batch_size}


@hookimpl
def kdbench_register_student_methods(register):
    register("ofd", OFD, help="OFD: partial L2 on pre-ReLU features with BN-derived margins")
