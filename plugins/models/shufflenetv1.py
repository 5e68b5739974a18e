"""ShuffleNetV1 for CIFAR (RepDistiller / mdistiller ``ShuffleNetv1.py``, ``ShuffleV1``: groups 3,
stage widths 240/480/960, 4/8/4 blocks), after Zhang et al. 2018."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.api import KDModel, ModelOutput, hookimpl

from ._common import StemStagesNet, WidthParams, scaled

GROUPS = 3
OUT_PLANES = (240, 480, 960)
NUM_BLOCKS = (4, 8, 4)
STEM = 24


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[N, g*c, H, W] -> channel k*g + j of the output is channel j*c + k of the input."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """ShuffleNet unit: grouped 1x1 conv-BN-ReLU, channel shuffle, 3x3 depthwise conv(stride)-BN-
    ReLU, grouped 1x1 conv-BN; + the identity (stride 1) or concatenated with a 3x3 stride-2
    average pool of the input (stride 2, ``out_planes`` then counts only the new channels).

    ``first``: the network's very first unit, whose first 1x1 conv is not grouped (its input is
    the 24-channel stem; the reference tests ``in_planes == 24``, which is the same unit).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first: bool):
        super().__init__()
        mid = out_planes // 4
        self.stride = stride
        self.g1 = 1 if first else groups
        self.groups = groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor) -> Tensor:
        """Returns the pre-activation (the sum or concatenation before the unit's final ReLU)."""
        out = F.relu(self.bn1(self.conv1(x)))
        if self.g1 > 1:
            out = channel_shuffle(out, self.g1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
        return out + x


class ShuffleNetV1(StemStagesNet):
    """CIFAR ShuffleNetV1 as in RepDistiller: 1x1 stem conv (24 channels) + BN + ReLU, no
    max-pool, three stages (a stride-2 unit, then stride-1 units), global average pool, linear
    head. PyTorch default init, as the reference.

    Features: ``feats[0]`` is the stem after ReLU (``preact_feats[0]`` its BN output);
    ``feats[i]`` the output of stage i after its last unit's final ReLU, ``preact_feats[i]``
    that unit's sum before the ReLU (RepDistiller's ``f{i}_pre``), so ``feats[i] ==
    relu(preact_feats[i])``. ``bn_before_relu()``: the last unit of every stage is a stride-1
    unit (``bn3`` + identity), so this gives that ``bn3``, with the identity added after it as
    in the ResNets (OFD's margin from it is the usual approximation). RepDistiller and
    mdistiller raise NotImplementedError there, so OFD could not use this net.

    The pool is adaptive: at 32x32 it is the reference's ``avg_pool2d(out, 4)`` exactly; that
    fixed 4x4 pool does not give a vector at 64x64, this one does (the global mean).
    ``width_mult`` scales the stem and stage widths to multiples of 12 (so that every grouped
    conv and the shuffle still divide evenly); 1.0 is the published net.
    """

    def __init__(self, num_classes: int, width_mult: float = 1.0):
        super().__init__()
        stem = scaled(STEM, width_mult, 4 * GROUPS)
        widths = [scaled(w, width_mult, 4 * GROUPS) for w in OUT_PLANES]
        if not stem < widths[0] < widths[1] < widths[2]:
            raise ValueError(f"width_mult {width_mult} is too small for ShuffleNetV1 "
                             f"(stem {stem}, stages {widths})")
        self.conv1 = nn.Conv2d(3, stem, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        cin = stem
        layers = []
        for k, (cout, n) in enumerate(zip(widths, NUM_BLOCKS)):
            blocks = [Bottleneck(cin, cout - cin, 2, GROUPS, first=k == 0)]
            blocks += [Bottleneck(cout, cout, 1, GROUPS, first=False) for _ in range(1, n)]
            layers.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[2], num_classes)
        self._stage_channels = widths

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3]

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [stage[-1].bn3 for stage in self.stages]



def _factory(num_classes: int, params: WidthParams) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes, params.width_mult)


@hookimpl
def kdbench_register_models(register):
    register(
        "shufflenetv1", _factory, params=WidthParams,
        help="CIFAR ShuffleNetV1, groups 3, widths 240/480/960 (RepDistiller ShuffleV1)",
    )
