"""Three-stage CIFAR ResNets of He et al. 2016 (section 4.2): resnet8/14/20/32/44/56/110 and the
4x-wide resnet8x4/resnet32x4 (RepDistiller / mdistiller ``models/resnet.py``).

Not to be confused with :mod:`.cifar_resnet` (resnet18/34/50): those are the *four*-stage
ImageNet-style ResNets adapted to 32x32 inputs (RepDistiller ``resnetv2.py``). This family has
a 3x3 stem and *three* stages of n BasicBlocks each (depth = 6n + 2; the reference's Bottleneck
variant, 9n + 2, is registered under no name there and is left out) at widths 16/32/64 (x4 for the "x4" nets), and uses the reference's module names
(``layerK.J.downsample``, ``fc``) so its published checkpoints load unchanged.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.api import KDModel, ModelOutput, hookimpl

from ._common import StemStagesNet, WidthParams, scaled


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, + shortcut (``downsample`` = 1x1 conv + BN when the shape
    changes, else the identity)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        """Returns the pre-activation (residual sum before the block's final ReLU)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + (x if self.downsample is None else self.downsample(x))




class ResNet3Stage(StemStagesNet):
    """CIFAR ResNet-depth: 3x3 stride-1 stem conv (``num_filters[0]`` channels) + BN + ReLU,
    three stages of n blocks (widths ``num_filters[1:]``, strides 1/2/2), global average pool,
    linear head ``fc``.

    Features: ``feats[0]`` is the stem after ReLU (``preact_feats[0]`` its BN output),
    ``feats[i]`` the output of stage i after its last block's final ReLU and ``preact_feats[i]``
    that block's residual sum before the ReLU (RepDistiller's ``f{i}_pre``), so ``feats[i] ==
    relu(preact_feats[i])``. ``bn_before_relu()`` gives the last BN of each stage's last block,
    as RepDistiller's ``get_bn_before_relu``; the shortcut is added after it, so OFD's margin
    from it is the usual approximation (as for resnet18/34/50).

    The pool is adaptive: at 32x32 it is the reference's ``AvgPool2d(8)`` exactly; the
    reference's fixed 8x8 pool does not give a vector at 64x64, this one does (the global mean).
    """

    head = "fc"  # the reference's classifier name

    def __init__(self, depth: int, num_filters: list[int], num_classes: int, width_mult: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"the depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        widths = [scaled(w, width_mult) for w in num_filters]
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[1], n, 1)
        self.layer2 = self._make_layer(widths[2], n, 2)
        self.layer3 = self._make_layer(widths[3], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self._stage_channels = widths[1:]

        for m in self.modules():  # the reference's init (the linear layer keeps PyTorch's)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3]

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [stage[-1].last_bn for stage in self.stages]


THIN, WIDE = [16, 16, 32, 64], [32, 64, 128, 256]
VARIANTS = {  # name -> (depth, num_filters), all with BasicBlocks (as the reference registers)
    "resnet8": (8, THIN), "resnet14": (14, THIN), "resnet20": (20, THIN),
    "resnet32": (32, THIN), "resnet44": (44, THIN), "resnet56": (56, THIN),
    "resnet110": (110, THIN), "resnet8x4": (8, WIDE), "resnet32x4": (32, WIDE),
}


def _factory(depth: int, num_filters: list[int]):
    def factory(num_classes: int, params: WidthParams) -> ResNet3Stage:
        return ResNet3Stage(depth, num_filters, num_classes, params.width_mult)

    return factory


@hookimpl
def kdbench_register_models(register):
    for name, (depth, filters) in VARIANTS.items():
        n = (depth - 2) // 6
        kind = "4x wide, " if filters is WIDE else ""
        register(name, _factory(depth, filters), params=WidthParams,
                 help=f"CIFAR ResNet-{depth} of He et al., 3 stages x {n} BasicBlocks, "
                      f"{kind}widths {'/'.join(map(str, filters[1:]))} (RepDistiller "
                      f"resnet.py {name})")
