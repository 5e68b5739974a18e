"""FT — Kim, Park & Kwak 2018, "Paraphrasing complex network: network compression via factor
transfer".

A *paraphraser* P (a convolutional auto-encoder) is first trained to reconstruct the teacher's
last stage map t = ``feats[-1]`` (post-ReLU) and its encoder's output is the teacher's
*factor*; a *translator* T (three conv + BN + LeakyReLU layers) maps the student's last stage
map s onto a factor of the same size, and the student learns to match the teacher's factor::

    init stage:   L_rec = mean ( P_dec(P_enc(t)) − t )²          (trains P only)

    φ(f)[b] = normalize_L2( mean_c f[b, c, ·, ·]^p1 )  ∈ R^{H·W}   (p1 = 2)
    L_FT = mean_{b, positions} | φ(T(s))[b] − φ(P_enc(t))[b] |^p2   (p2 = 1)

with the larger of the two factor maps average-pooled to the smaller's size. P has no gradient
in the main schedule (the reference gives it to no optimizer and keeps it in eval mode); T and
the student learn from L_FT. Factor channels: int(0.5 · teacher channels) (rate k = 0.5).

FT's initialisation stage of ``init_epochs`` (30) epochs is declared through the contract
(:class:`kdbench.api.InitStage`) and trains P alone, the student in eval mode, at SGD lr
``init_lr`` = 0.01 (``helper/pretrain.py``: 0.01 for ResNet and WRN students with
``--distill factor``, the student's ``opt.learning_rate`` otherwise: 0.05 for VGG, 0.01 for
MobileNet/ShuffleNet), momentum 0.9, weight decay 5e-4. Recipe weight 200
(``default_weight``: RepDistiller ``scripts/run_cifar_distill.sh`` ``-b 200``); CE 1.0 is the
separate ``ce`` method.

Reference followed: RepDistiller ``distiller_zoo/FT.py`` (commit 1e2f8169: ``FactorTransfer(p1=2,
p2=1)``), ``models/util.py`` (``Paraphraser(t_shape, k=0.5, use_bn=False)``: conv 3×3 (C→C, C→kC,
kC→kC) each + LeakyReLU(0.1), decoder of transposed convs 3×3 (kC→kC, kC→C, C→C) each +
LeakyReLU(0.1); ``Translator(s_shape, t_shape, k=0.5, use_bn=True)``: conv 3×3 (sC→sC, sC→kC,
kC→kC) each + BN + LeakyReLU(0.1)), ``helper/pretrain.py`` (the init stage, ``nn.MSELoss`` on
the reconstruction of ``feat_t[-2]``) and ``helper/loops.py`` (``factor_s = translator(feat_s[-2])``,
``factor_t = paraphraser(feat_t[-2], is_factor=True)``). mdistiller has no FT.

Deviations from the reference:

* ``init_lr`` is one number (0.01, the reference's for the ResNet and WRN students that most
  pairs have); a VGG student trains its init stage at 0.05 in the reference: set
  ``init_lr = 0.05`` for it (None: the student schedule's learning rate).
* The paraphraser's factor of the teacher is computed without gradient in the main schedule
  (the reference computes it with gradient but gives the paraphraser to no optimizer); the
  paraphraser's parameters stay in the run's optimizer, which leaves a parameter without
  gradient untouched (no weight decay, no momentum), so it does not change. It has no BN or
  dropout, so its mode does not matter.
* Pooling to (min H, min W) of the two factors (the reference pools to a square (H, H); equal on
  square maps).
* Inputs are up-cast to fp32 and the loss runs with autocast off (the reference trains in
  fp32); the paraphraser and translator may run in bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import InitStage, Params, StudentMethod, UserError, at_least_fp32, hookimpl
from kdbench_plugins.students._stages import pool_to_common


class FTParams(Params):
    rate: float = Field(0.5, gt=0, le=4, description="factor channels = int(rate · teacher channels) "
                        "(Paraphraser/Translator k)")
    p1: float = Field(2.0, gt=0, description="power of the channel mean in the factor map (FactorTransfer p1)")
    p2: int = Field(1, ge=1, description="1: mean absolute factor difference; else the mean of its "
                    "p2-th power (FactorTransfer p2)")
    init_epochs: int = Field(30, ge=0, description="epochs of the paraphraser's initialisation stage "
                             "(train_student.py --init_epochs); 0: no stage")
    init_lr: float | None = Field(0.01, gt=0, description="SGD learning rate of the initialisation "
                                  "stage (pretrain.py: 0.01 for ResNet/WRN students, 0.05 for VGG); "
                                  "None: the student schedule's")


def _conv_block(c_in: int, c_out: int, conv=nn.Conv2d, bn: bool = False) -> list[nn.Module]:
    return [conv(c_in, c_out, 3, 1, 1), *([nn.BatchNorm2d(c_out)] if bn else []), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.encoder = nn.Sequential(*_conv_block(channels, channels), *_conv_block(channels, factor),
                                     *_conv_block(factor, factor))
        t = nn.ConvTranspose2d
        self.decoder = nn.Sequential(*_conv_block(factor, factor, t), *_conv_block(factor, channels, t),
                                     *_conv_block(channels, channels, t))

    def forward(self, t: Tensor) -> Tensor:
        return self.decoder(self.encoder(t))


def translator(channels: int, factor: int) -> nn.Sequential:
    return nn.Sequential(*_conv_block(channels, channels, bn=True), *_conv_block(channels, factor, bn=True),
                         *_conv_block(factor, factor, bn=True))


def factor_map(f: Tensor, p1: float) -> Tensor:
    return F.normalize(f.pow(p1).mean(1).flatten(1))


def ft_loss(factor_s: Tensor, factor_t: Tensor, p1: float, p2: int) -> Tensor:
    """L_FT in fp32 with autocast off."""
    with torch.autocast(device_type=factor_s.device.type, enabled=False):
        fs, ft = pool_to_common(at_least_fp32(factor_s), at_least_fp32(factor_t))
        diff = factor_map(fs, p1) - factor_map(ft, p1)
        return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()


class FT(StudentMethod):
    default_weight = 200.0  # run_cifar_distill.sh -b 200

    def __init__(self, params: FTParams, setup):
        super().__init__()
        s, t = setup.student_out.feats[-1], setup.teacher_out.feats[-1]
        for name, f in (("student", s), ("teacher", t)):
            if f.dim() != 4:
                raise UserError(f"ft: {name} feats[-1] has shape {tuple(f.shape)}; FT needs a "
                                "(B, C, H, W) map")
        factor = int(t.shape[1] * params.rate)
        if factor < 1:
            raise UserError(f"ft: rate {params.rate} gives {factor} factor channels for a teacher "
                            f"map of {t.shape[1]}; raise rate")
        self.p1, self.p2 = params.p1, params.p2
        self.init_epochs, self.init_lr = params.init_epochs, params.init_lr
        self.paraphraser = Paraphraser(int(t.shape[1]), factor)
        self.translator = translator(int(s.shape[1]), factor)

    def reconstruction(self, student, teacher, batch) -> dict[str, Tensor]:
        target = teacher.feats[-1].detach()
        rec = at_least_fp32(self.paraphraser(target))
        with torch.autocast(device_type=rec.device.type, enabled=False):
            return {"ft_rec": F.mse_loss(rec, at_least_fp32(target))}

    def init_stage(self) -> InitStage | None:
        if not self.init_epochs:
            return None
        return InitStage(epochs=self.init_epochs, modules=[self.paraphraser], loss=self.reconstruction,
                         lr=self.init_lr)

    def forward(self, student, teacher, batch, extra):
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(teacher.feats[-1])
        factor_s = self.translator(student.feats[-1])
        return {"ft": ft_loss(factor_s, factor_t, self.p1, self.p2)}


@hookimpl
def kdbench_register_student_methods(register):
    register("ft", FT, params=FTParams,
             help="FT: factor transfer through a paraphraser pre-trained for 30 epochs (weight 200)")
