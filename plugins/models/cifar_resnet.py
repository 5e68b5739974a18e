"""CIFAR ResNet18/34/50 ("resnetv2" style of RepDistiller / mdistiller ``resnetv2.py``)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.api import KDModel, ModelOutput, hookimpl

from ._common import StemStagesNet, WidthParams, scaled


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        """Returns the pre-activation (residual sum before the final ReLU)."""
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + self.shortcut(x)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        """Returns the pre-activation (residual sum before the final ReLU)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + self.shortcut(x)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class CifarResNet(StemStagesNet):
    """CIFAR ResNet as in RepDistiller/mdistiller ``resnetv2.py``: 3x3 stride-1 stem conv + BN +
    ReLU, no max-pool, four stages of widths 64/128/256/512 (x expansion), adaptive average pool,
    linear head.

    Features: ``feats[0]`` is the stem after ReLU, ``feats[i]`` the output of stage i after the
    last block's final ReLU; ``preact_feats[i]`` is that block's residual sum before the ReLU
    (stem: the BN output), so ``feats[i] == relu(preact_feats[i])``. ``bn_before_relu()`` gives
    the last BN of each stage's last block (as RepDistiller and the official OFD code); the
    identity shortcut is added after it, so OFD's margin from it is the usual approximation.
    """

    def __init__(self, block, num_blocks: list[int], num_classes: int, width_mult: float = 1.0):
        super().__init__()
        widths = [scaled(w, width_mult) for w in (64, 128, 256, 512)]
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(block, widths[0], num_blocks[0], 1)
        self.layer2 = self._make_layer(block, widths[1], num_blocks[1], 2)
        self.layer3 = self._make_layer(block, widths[2], num_blocks[2], 2)
        self.layer4 = self._make_layer(block, widths[3], num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3] * block.expansion, num_classes)
        self._stage_channels = [w * block.expansion for w in widths]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [stage[-1].last_bn for stage in self.stages]



_VARIANTS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], "CIFAR ResNet18 (resnetv2), BasicBlock [2,2,2,2]"),
    "resnet34": (BasicBlock, [3, 4, 6, 3], "CIFAR ResNet34 (resnetv2), BasicBlock [3,4,6,3]"),
    "resnet50": (Bottleneck, [3, 4, 6, 3], "CIFAR ResNet50 (resnetv2), Bottleneck [3,4,6,3]"),
}


def _factory(block, num_blocks):
    def factory(num_classes: int, params: WidthParams) -> CifarResNet:
        return CifarResNet(block, num_blocks, num_classes, params.width_mult)

    return factory


@hookimpl
def kdbench_register_models(register):
    for name, (block, num_blocks, help_) in _VARIANTS.items():
        register(name, _factory(block, num_blocks), params=WidthParams, help=help_)
