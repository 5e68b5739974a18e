"""Small helpers shared by the CIFAR model zoo plugins."""
from __future__ import annotations

import math

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import KDModel, ModelOutput, Params


class WidthParams(Params):
    """Channel-width multiplier. 1.0 is the published architecture; smaller values build thin
    copies (same depth and feature protocol) for fast tests."""

    width_mult: float = Field(1.0, gt=0, le=4)


def scaled(channels: int, mult: float, divisor: int = 1) -> int:
    """``channels * mult`` rounded to a multiple of ``divisor`` (at least ``divisor``)."""
    if mult == 1.0:
        return channels
    return max(divisor, int(round(channels * mult / divisor)) * divisor)


def init_repdistiller(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """RepDistiller's init (vgg.py, mobilenetv2.py, wrn.py): conv ~ N(0, sqrt(2 / (k*k*out))),
    BN weight 1 / bias 0, linear bias 0 and weight ~ N(0, linear_std) (None keeps PyTorch's
    default linear weight, as in wrn.py)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


class StemStagesNet(KDModel):
    """The forward shared by the zoo's ResNets and ShuffleNetV1: a stem ``conv1`` → ``bn1`` →
    ReLU, then ``stages`` of blocks that each return their pre-activation (the sum before the
    block's final ReLU), global average pooling and the classifier named ``head`` (the
    reference's state-dict name: ``fc`` or ``linear``). ``feats`` are the stem's and each
    stage's post-ReLU outputs, ``preact_feats`` the same before the ReLU."""

    head = "linear"
    _stage_channels: list[int]

    @property
    def stages(self) -> list[nn.Sequential]:
        raise NotImplementedError

    def stage_channels(self) -> list[int]:
        return list(self._stage_channels)

    def forward(self, x: Tensor) -> ModelOutput:
        pre = self.bn1(self.conv1(x))
        out = F.relu(pre)
        feats, preacts = [out], [pre]
        for stage in self.stages:
            for blk in stage:
                pre = blk(out)
                out = F.relu(pre)
            feats.append(out)
            preacts.append(pre)
        pooled = self.avgpool(out).flatten(1)
        return ModelOutput(getattr(self, self.head)(pooled), feats, preacts, pooled)
