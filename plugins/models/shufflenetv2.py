"""ShuffleNetV2 for CIFAR (RepDistiller / mdistiller ``ShuffleNetv2.py``, ``ShuffleV2`` = net
size 1.0), after Ma et al. 2018."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.api import KDModel, ModelOutput, hookimpl

from ._common import WidthParams, scaled

CONFIGS = {  # net size -> (stage out channels + final 1x1 conv channels, blocks per stage)
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


class ShuffleNetV2Params(WidthParams):
    net_size: Literal[0.5, 1.0, 1.5, 2.0] = 1.0


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _shuffle_list(items: list, groups: int = 2) -> list:
    """Where each channel of ``channel_shuffle`` comes from, on a list of per-channel labels."""
    c = len(items) // groups
    return [items[(k % groups) * c + k // groups] for k in range(len(items))]


def _dw(c: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False)


def _pw(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=False)


class DownBlock(nn.Module):
    """Stride-2 unit: left dw-BN, pw-BN-ReLU; right pw-BN-ReLU, dw-BN, pw-BN-ReLU; concat,
    shuffle."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = _dw(cin, 2), nn.BatchNorm2d(cin)
        self.conv2, self.bn2 = _pw(cin, mid), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = _pw(cin, mid), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = _dw(mid, 2), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = _pw(mid, mid), nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (output, pre-activation); output == relu(pre-activation)."""
        left = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn5(self.conv5(self.bn4(self.conv4(right))))
        pre = channel_shuffle(torch.cat([left, right], 1))
        return F.relu(pre), pre


class BasicBlock(nn.Module):
    """Stride-1 unit: split channels in half; the first half passes through, the second goes
    pw-BN-ReLU, dw-BN, pw-BN-ReLU; concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.conv1, self.bn1 = _pw(c, c), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = _dw(c, 1), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = _pw(c, c), nn.BatchNorm2d(c)

    def forward(self, x: Tensor, x_pre: Tensor) -> tuple[Tensor, Tensor]:
        """``x_pre`` is the pre-activation of ``x`` (``x == relu(x_pre)``). The pass-through half
        carries its own pre-activation along, so the returned pair keeps output == relu(pre)."""
        c = x.shape[1] // 2
        branch = F.relu(self.bn1(self.conv1(x[:, c:])))
        branch = self.bn3(self.conv3(self.bn2(self.conv2(branch))))
        out = channel_shuffle(torch.cat([x[:, :c], F.relu(branch)], 1))
        pre = channel_shuffle(torch.cat([x_pre[:, :c], branch], 1))
        return out, pre


class ShuffleNetV2(KDModel):
    """CIFAR ShuffleNetV2 as in RepDistiller: 1x1 stem conv (24 channels) + BN + ReLU, no
    max-pool, three stages (a stride-2 DownBlock then 3/7/3 BasicBlocks), 1x1 conv-BN-ReLU to
    1024 channels, adaptive average pool, linear head. PyTorch default init, as the reference.

    Feature convention: every channel of a stage output is the ReLU of one BN channel (in the
    stage's last block, or in an earlier block whose half passed through unchanged).
    ``preact_feats[i]`` holds, per channel, that BN output (carried along through the
    pass-through halves and shuffles in the same forward), so ``feats[i] == relu(preact_feats[i])``
    exactly. RepDistiller's ``f_pre`` instead mixes post-ReLU pass-through channels with
    pre-ReLU ones, unshuffled, so its channel order differs from ``feats``.

    ``bn_before_relu()``: no single BN feeds a stage's ReLU here (the reference raises
    NotImplementedError -- **defect**: OFD fails with this net). Each returned BatchNorm2d is a
    frozen *snapshot* assembled channel by channel from the source BN channels (weight, bias,
    running stats), so per-channel margins (OFD) are exact. It is not a submodule: it is not
    trained or saved; call again after the model's weights change.
    """

    def __init__(self, num_classes: int, net_size: float = 1.0, width_mult: float = 1.0):
        super().__init__()
        out_channels, num_blocks = CONFIGS[net_size]
        out_channels = [scaled(c, width_mult, 2) for c in out_channels]
        stem = scaled(24, width_mult, 2)
        self.conv1, self.bn1 = nn.Conv2d(3, stem, 1, bias=False), nn.BatchNorm2d(stem)
        cin = stem
        layers = []
        for cout, n in zip(out_channels[:3], num_blocks):
            blocks = [DownBlock(cin, cout)] + [BasicBlock(cout) for _ in range(n)]
            layers.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = layers
        self.conv2 = nn.Conv2d(cin, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)
        self._stage_channels = list(out_channels[:3])

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3]

    def stage_channels(self) -> list[int]:
        return list(self._stage_channels)

    def _channel_sources(self, stage: nn.Sequential) -> list[tuple[nn.BatchNorm2d, int]]:
        """(BN, channel) whose output, through ReLU, is each channel of the stage's output."""
        down = stage[0]
        mid = down.bn2.num_features
        src = [(down.bn2, j) for j in range(mid)] + [(down.bn5, j) for j in range(mid)]
        src = _shuffle_list(src)
        for blk in stage[1:]:
            c = len(src) // 2
            src = _shuffle_list(src[:c] + [(blk.bn3, j) for j in range(blk.bn3.num_features)])
        return src

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [_gather_bn(self._channel_sources(stage)) for stage in self.stages]

    def forward(self, x: Tensor) -> ModelOutput:
        pre = self.bn1(self.conv1(x))
        out = F.relu(pre)
        feats, preacts = [out], [pre]
        for stage in self.stages:
            out, pre = stage[0](out)
            for blk in stage[1:]:
                out, pre = blk(out, pre)
            feats.append(out)
            preacts.append(pre)
        pooled = self.avgpool(F.relu(self.bn2(self.conv2(out)))).flatten(1)
        return ModelOutput(self.linear(pooled), feats, preacts, pooled)


@torch.no_grad()
def _gather_bn(sources: list[tuple[nn.BatchNorm2d, int]]) -> nn.BatchNorm2d:
    """A BatchNorm2d whose channel c copies channel ``sources[c][1]`` of BN ``sources[c][0]``."""
    mods = list(dict.fromkeys(m for m, _ in sources))
    offset, total = {}, 0
    for m in mods:
        offset[m], total = total, total + m.num_features
    idx = torch.tensor([offset[m] + j for m, j in sources], device=mods[0].weight.device)
    ref = mods[0]
    bn = nn.BatchNorm2d(len(sources), eps=ref.eps, momentum=ref.momentum,
                        device=ref.weight.device, dtype=ref.weight.dtype)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, name).copy_(torch.cat([getattr(m, name) for m in mods])[idx])
    bn.requires_grad_(False)
    return bn.eval()


def _factory(num_classes: int, params: ShuffleNetV2Params) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes, params.net_size, params.width_mult)


@hookimpl
def kdbench_register_models(register):
    register(
        "shufflenetv2", _factory, params=ShuffleNetV2Params,
        help="CIFAR ShuffleNetV2, net size 1.0 (RepDistiller ShuffleV2)",
    )
