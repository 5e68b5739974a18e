"""FitNet — Romero et al. 2014, "FitNets: hints for thin deep nets".

A regressor r maps the student's *guided* layer onto the teacher's *hint* layer and the student
is trained to match it:

    L_hint = (1 / (B·C·H·W)) Σ ( r(s_h) − t_h )²        (mean squared error over every element)

Defaults from the method card (mdistiller ``FITNET`` config): hint layer 2 for both nets
(``feats[2]``, post-ReLU), recipe weight 100 (``default_weight``; the student's CE, weight 1.0, is
the separate ``ce`` method).

Regressor (mdistiller's ``ConvReg``), sized from the dummy-forward shapes in the set-up, never
per architecture: with student map (sC, sH, sW) and teacher map (tC, tH, tW),

* sH == 2·tH: Conv2d(sC, tC, 3, stride 2, padding 1)
* 2·sH == tH: ConvTranspose2d(sC, tC, 4, stride 2, padding 1)
* sH >= tH (otherwise): Conv2d(sC, tC, kernel (1 + sH − tH, 1 + sW − tW)) (1×1 when equal)

followed by BatchNorm2d(tC) and ReLU (the hint is post-ReLU, so the target is non-negative).
Any other size ratio (student smaller than the teacher by a factor other than 2) is refused with a
:class:`UserError` naming both shapes, as the reference does.

Deviations from the reference: none in the loss. The teacher map is cloned when it is an
inference-mode tensor (so the engine may run the teacher under ``torch.inference_mode()``), and
the regressor output is compared in float32 (harmless under bf16 autocast): inputs are up-cast to
fp32 before the loss (the reference trains in fp32); the MSE runs with autocast off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdbench.api import Params, StudentMethod, UserError, hookimpl, saveable


class FitNetParams(Params):
    hint_layer: int = Field(
        2, ge=0, description="feats index (stem = 0) of the hint (teacher) and guided (student) layer"
    )



class ConvRegressor(nn.Module):
    """conv (chosen from the spatial sizes) + BN + ReLU, mapping (sC, sH, sW) to (tC, tH, tW)."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        _, s_c, s_h, s_w = (int(v) for v in s_shape)
        _, t_c, t_h, t_w = (int(v) for v in t_shape)
        if s_h == 2 * t_h and s_w == 2 * t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h and 2 * s_w == t_w:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise UserError(
                f"fitnet: cannot regress a student map of size {s_h}x{s_w} onto a teacher map of "
                f"size {t_h}x{t_w} (supported: equal, student 2x larger, student 2x smaller, or "
                "student larger); choose another hint_layer"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class FitNet(StudentMethod):
    default_weight = 100.0

    def __init__(self, params: FitNetParams, setup):
        super().__init__()
        self.hint_layer = params.hint_layer
        s_feats, t_feats = setup.student_out.feats, setup.teacher_out.feats
        if self.hint_layer >= min(len(s_feats), len(t_feats)):
            raise UserError(
                f"fitnet: hint_layer {self.hint_layer} out of range (student has {len(s_feats)} "
                f"feature maps, teacher {len(t_feats)})"
            )
        self.regressor = ConvRegressor(
            s_feats[self.hint_layer].shape, t_feats[self.hint_layer].shape
        )

    def forward(self, student, teacher, batch, extra):
        pred = self.regressor(student.feats[self.hint_layer])  # may run in bf16 under autocast
        target = saveable(teacher.feats[self.hint_layer])
        with torch.autocast(device_type=pred.device.type, enabled=False):
            return {"fitnet": F.mse_loss(pred.float(), target.float())}


@hookimpl
def kdbench_register_student_methods(register):
    register(
        "fitnet",
        FitNet,
        params=FitNetParams,
        help="FitNet hints: MSE between regressed student and teacher feats[2] (weight 100)",
    )
