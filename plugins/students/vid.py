"""VID — Ahn, Hu, Damianou, Lawrence & Dai 2019, "Variational information distillation for
knowledge transfer".

VID maximises a variational lower bound on the mutual information between teacher and student
features by minimising, for each paired layer l, the negative log-likelihood of the teacher map
t under a Gaussian whose mean μ = r_l(s) is a regressor of the student map and whose variance is
per channel, σ²_c = softplus(α_c) + eps (shared over positions):

    L_l = (1 / (B·C·H·W)) Σ_{b,c,h,w} ½ · ( log σ²_c + (t_bchw − μ_bchw)² / σ²_c )
    L_VID = Σ_l L_l

This is RepDistiller's ``VIDLoss`` exactly: ``torch.mean`` over every element (batch, channel,
positions) of each layer, the layers summed, the constant ½·log 2π dropped. Regressor (also as
there): Conv1×1(s→t), ReLU, Conv1×1(t→t), ReLU, Conv1×1(t→t), no biases (mid channels = t, as in
RepDistiller's ``VIDLoss(s, t, t)``). α is initialised to log(exp(5 − eps) − 1) so that the
initial variance is 5.0. Before regressing, the larger of the two maps is average-pooled
(adaptive) to the spatial size of the smaller.

Layers: ``feats[1:]`` of both nets (post-ReLU stage outputs) by default, paired position-wise.
``layers`` picks student indices into ``feats`` and ``teacher_layers`` the teacher ones (default:
the same indices when both nets have as many stages; otherwise the teacher's deepest
``len(layers)`` stages, so that the deepest stages are paired).

Defaults from the method card: initial variance 5.0, eps 1e-5, recipe weight 1.0
(``default_weight``; CE 1.0 is the separate ``ce`` method).

Deviations from the references: α is a registered ``nn.Parameter`` of the method, so it is
checkpointed and trained by the student's optimizer (**defect** in mdistiller: its
``log_scales`` live in a plain Python list, are never registered and never trained). The adaptive
pool uses the (H, W) of the smaller map instead of assuming square maps. The NLL is computed in
float32 with autocast disabled (softplus / log / division are not bf16-safe): inputs are up-cast
to fp32 before the loss (the reference trains in fp32); the teacher map is up-cast before it is
pooled, the regressor may run in bf16 under autocast and its output is up-cast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdbench.api import Params, StudentMethod, UserError, at_least_fp32, hookimpl, saveable


class VIDParams(Params):
    layers: list[int] | None = Field(
        None, description="student indices into feats (default: every stage, feats[1:])"
    )
    teacher_layers: list[int] | None = Field(
        None, description="teacher indices into feats (default: see the module docstring)"
    )
    init_pred_var: float = Field(5.0, gt=0, description="initial per-channel variance")
    eps: float = Field(1e-5, gt=0, description="variance floor added to softplus(alpha)")


def _conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, padding=0, bias=False)


def match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger map to the spatial size of the smaller one."""
    s_h, s_w = s.shape[-2:]
    t_h, t_w = t.shape[-2:]
    if s_h * s_w > t_h * t_w:
        s = F.adaptive_avg_pool2d(s, (t_h, t_w))
    elif s_h * s_w < t_h * t_w:
        t = F.adaptive_avg_pool2d(t, (s_h, s_w))
    return s, t


def resolve_layers(n_s: int, n_t: int, layers, teacher_layers) -> tuple[list[int], list[int]]:
    """Student/teacher feats indices. n_s, n_t: number of feature maps (stem included)."""
    s_idx = list(layers) if layers is not None else list(range(1, n_s))
    if teacher_layers is not None:
        t_idx = list(teacher_layers)
    elif layers is not None and n_s == n_t:
        t_idx = list(s_idx)
    else:
        t_stages = list(range(1, n_t))
        if len(s_idx) > len(t_stages):
            s_idx = s_idx[len(s_idx) - len(t_stages):]  # deepest student stages
        t_idx = t_stages[len(t_stages) - len(s_idx):]  # deepest teacher stages
    if len(s_idx) != len(t_idx) or not s_idx:
        raise UserError(f"vid: layers {s_idx} and teacher_layers {t_idx} must pair up, non-empty")
    for name, idx, n in (("layers", s_idx, n_s), ("teacher_layers", t_idx, n_t)):
        if any(i < 0 or i >= n for i in idx):
            raise UserError(f"vid: {name} {idx} out of range (the net has {n} feature maps)")
    return s_idx, t_idx


class VID(StudentMethod):
    default_weight = 1.0

    def __init__(self, params: VIDParams, setup):
        super().__init__()
        s_feats, t_feats = setup.student_out.feats, setup.teacher_out.feats
        self.s_idx, self.t_idx = resolve_layers(
            len(s_feats), len(t_feats), params.layers, params.teacher_layers
        )
        self.eps = params.eps
        self.regressors = nn.ModuleList()
        alpha0 = math.log(math.expm1(params.init_pred_var - params.eps))
        alphas = []
        for i, j in zip(self.s_idx, self.t_idx):
            s_c, t_c = int(s_feats[i].shape[1]), int(t_feats[j].shape[1])
            self.regressors.append(
                nn.Sequential(
                    _conv1x1(s_c, t_c), nn.ReLU(), _conv1x1(t_c, t_c), nn.ReLU(), _conv1x1(t_c, t_c)
                )
            )
            alphas.append(nn.Parameter(torch.full((t_c,), alpha0)))
        # registered -> checkpointed and handed to the optimizer with the regressors
        self.log_scales = nn.ParameterList(alphas)

    def variances(self) -> list[torch.Tensor]:
        return [F.softplus(a.float()) + self.eps for a in self.log_scales]

    def forward(self, student, teacher, batch, extra):
        total = 0.0
        for reg, alpha, i, j in zip(self.regressors, self.log_scales, self.s_idx, self.t_idx):
            t = at_least_fp32(saveable(teacher.feats[j]))  # the loss target: pooled (if it is the larger map) in fp32
            with torch.autocast(device_type=t.device.type, enabled=False):
                s, t = match_spatial(student.feats[i], t)
            mu = reg(s)
            with torch.autocast(device_type=mu.device.type, enabled=False):
                var = (F.softplus(alpha.float()) + self.eps).view(1, -1, 1, 1)
                nll = 0.5 * ((mu.float() - t.float()) ** 2 / var + torch.log(var))
                total = total + nll.mean()
        return {"vid": total}

    def epoch_stats(self) -> dict[str, float]:
        with torch.no_grad():
            return {
                f"vid_mean_var_{k}": float(v.mean()) for k, v in enumerate(self.variances())
            }


@hookimpl
def kdbench_register_student_methods(register):
    register(
        "vid",
        VID,
        params=VIDParams,
        help="Variational information distillation: Gaussian NLL of teacher feats[1:] (var0 5.0)",
    )
