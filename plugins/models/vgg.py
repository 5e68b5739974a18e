"""CIFAR VGG with BatchNorm (RepDistiller / mdistiller ``vgg.py``: ``vgg8_bn``, ``vgg11_bn``,
``vgg13_bn``, ``vgg16_bn``, ``vgg19_bn``, registered there as vgg8/11/13/16/19)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.api import KDModel, ModelOutput, hookimpl

from ._common import WidthParams, init_repdistiller, scaled

CFG = {  # conv widths per group; the RepDistiller cfg letter in the comment
    "vgg8": [[64], [128], [256], [512], [512]],  # "S": one conv per group
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],  # "A"
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],  # "B"
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],  # "D"
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512],
              [512, 512, 512, 512]],  # "E"
}


def _group(widths: list[int], cin: int) -> nn.Sequential:
    """conv(bias) + BN (+ ReLU between convs); the group ends at the BN (ReLU is applied by the
    model, so the group's output is the stage's pre-activation)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(KDModel):
    """VGG for CIFAR as in RepDistiller: five conv groups (the first is the "stem"), max-pool
    after groups 0-2 (and after group 3 when the input is 64x64 or larger, as the reference does
    for 64x64 inputs), adaptive average pool, a single linear head (no FC layers).

    ``preact_feats[i]`` is group i's output (its last BN), ``feats[i] = relu(preact_feats[i])``,
    and ``bn_before_relu()`` returns the last BN of groups 1-4: exact for OFD.
    """

    def __init__(self, cfg: list[list[int]], num_classes: int, width_mult: float = 1.0):
        super().__init__()
        cfg = [[scaled(w, width_mult) for w in g] for g in cfg]
        cins = [3] + [g[-1] for g in cfg[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _group(g, c) for g, c in zip(cfg, cins)
        )
        self.pool = nn.MaxPool2d(2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        self._stage_channels = [g[-1] for g in cfg[1:]]
        init_repdistiller(self)

    @property
    def blocks(self) -> list[nn.Sequential]:
        return [self.block0, self.block1, self.block2, self.block3, self.block4]

    def stage_channels(self) -> list[int]:
        return list(self._stage_channels)

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [b[-1] for b in self.blocks[1:]]

    def forward(self, x: Tensor) -> ModelOutput:
        big = x.shape[-2] >= 64
        feats, preacts = [], []
        out = x
        for i, block in enumerate(self.blocks):
            if i in (1, 2, 3) or (i == 4 and big):
                out = self.pool(out)
            pre = block(out)
            out = F.relu(pre)
            feats.append(out)
            preacts.append(pre)
        pooled = self.avgpool(out).flatten(1)
        return ModelOutput(self.classifier(pooled), feats, preacts, pooled)


def _factory(cfg):
    def factory(num_classes: int, params: WidthParams) -> VGG:
        return VGG(cfg, num_classes, params.width_mult)

    return factory


@hookimpl
def kdbench_register_models(register):
    register("vgg13", _factory(CFG["vgg13"]), params=WidthParams,
             help="CIFAR VGG13 with BN (RepDistiller vgg13_bn)")
    register("vgg8", _factory(CFG["vgg8"]), params=WidthParams,
             help="CIFAR VGG8 with BN, one conv per group (RepDistiller vgg8_bn)")
    for depth in (11, 16, 19):
        register(f"vgg{depth}", _factory(CFG[f"vgg{depth}"]), params=WidthParams,
                 help=f"CIFAR VGG{depth} with BN (RepDistiller vgg{depth}_bn)")
