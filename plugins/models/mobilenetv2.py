"""MobileNetV2 for CIFAR as used in the KD literature: RepDistiller / mdistiller
``mobilenetv2.py``, ``mobilenetv2_T_w(T, W)``.

Names: ``mobilenetv2`` is ``mobile_half`` (expansion 6, width multiplier 0.5), the net that
RepDistiller *and* mdistiller register as ``"MobileNetV2"`` (so "MobileNetV2" in their CIFAR-100
tables is this half-width net). ``mobilenetv2_w1`` is the same family at full width,
``mobilenetv2_T_w(6, 1.0)``, which neither code base registers by name (mdistiller's Tiny-
ImageNet "MobileNetV2" is a different implementation, ``mv2_tinyimagenet.py``, not this one).
"""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import KDModel, ModelOutput, hookimpl

from ._common import WidthParams, init_repdistiller

# t (expansion), c (channels), n (blocks), s (first stride); t=None means "the model's T".
SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
           (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]
STAGE_ENDS = (1, 2, 4, 6)  # feats[1:] are the outputs of these block groups (as the reference)


class MobileNetV2Params(WidthParams):
    width_mult: float = Field(0.5, gt=0, le=4)
    expand_ratio: int = Field(6, ge=1)


class MobileNetV2W1Params(MobileNetV2Params):
    width_mult: float = Field(1.0, gt=0, le=4)


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """pw conv-BN-ReLU, 3x3 depthwise conv-BN-ReLU, pw-linear conv-BN (+ identity if shapes
    allow). The block ends linearly: there is no ReLU after ``conv[7]``."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hid = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hid, 1, 1, 0, bias=False),  # pw
            nn.BatchNorm2d(hid),
            nn.ReLU(inplace=True),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False),  # dw
            nn.BatchNorm2d(hid),
            nn.ReLU(inplace=True),
            nn.Conv2d(hid, oup, 1, 1, 0, bias=False),  # pw-linear
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(KDModel):
    """CIFAR MobileNetV2 of RepDistiller: stride-2 3x3 stem (conv-BN-ReLU), 17 inverted residual
    blocks in 7 groups, 1x1 conv-BN-ReLU to 1280 channels, adaptive average pool, linear head.

    Feature convention (documented exception): the stem has a ReLU, so ``feats[0] =
    relu(preact_feats[0])`` with ``preact_feats[0]`` its BN output. The four stages (ends of
    groups 1, 2, 4, 6, as in the reference) end with a *linear* bottleneck: there is no ReLU, so
    ``feats[i]`` and ``preact_feats[i]`` are both the block output that the next stage consumes
    (the same tensor; feats[i] may be negative), as in mdistiller. ``bn_before_relu()`` gives
    the last (pw-linear) BN of each stage, as RepDistiller; for stages 1-3 the last block also
    adds its identity shortcut after that BN, so OFD's margin is an approximation there, exact
    for stage 4 (no shortcut). mdistiller exposes no ``preact_feats`` for this net, so OFD
    failed with it there (**defect**); here both are provided.
    """

    def __init__(self, num_classes: int, expand_ratio: int = 6, width_mult: float = 0.5):
        super().__init__()
        ch = max(1, int(32 * width_mult))
        self.conv1 = _conv_bn_relu(3, ch, 3, 2)
        self.blocks = nn.ModuleList()
        stage_channels = []
        for t, c, n, s in SETTING:
            out = max(1, int(c * width_mult))
            layers = []
            for i in range(n):
                t_i = expand_ratio if t is None else t
                layers.append(InvertedResidual(ch, out, s if i == 0 else 1, t_i))
                ch = out
            self.blocks.append(nn.Sequential(*layers))
            stage_channels.append(out)
        self._stage_channels = [stage_channels[i] for i in STAGE_ENDS]
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(ch, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        init_repdistiller(self)

    def stage_channels(self) -> list[int]:
        return list(self._stage_channels)

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.blocks[i][-1].conv[-1] for i in STAGE_ENDS]

    def forward(self, x: Tensor) -> ModelOutput:
        pre = self.conv1[1](self.conv1[0](x))
        out = F.relu(pre)
        feats, preacts = [out], [pre]
        for i, group in enumerate(self.blocks):
            out = group(out)
            if i in STAGE_ENDS:
                feats.append(out)
                preacts.append(out)
        pooled = self.avgpool(self.conv2(out)).flatten(1)
        return ModelOutput(self.classifier(pooled), feats, preacts, pooled)


def _factory(num_classes: int, params: MobileNetV2Params) -> MobileNetV2:
    return MobileNetV2(num_classes, params.expand_ratio, params.width_mult)


@hookimpl
def kdbench_register_models(register):
    register(
        "mobilenetv2", _factory, params=MobileNetV2Params,
        help="CIFAR MobileNetV2, expansion 6 x width 0.5 (RepDistiller mobile_half)",
    )
    register(
        "mobilenetv2_w1", _factory, params=MobileNetV2W1Params,
        help="CIFAR MobileNetV2 at full width, expansion 6 x width 1.0 "
             "(RepDistiller mobilenetv2_T_w(6, 1))",
    )
