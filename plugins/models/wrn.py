"""Wide ResNets WRN-d-w for CIFAR (RepDistiller / mdistiller ``wrn.py``, after Zagoruyko &
Komodakis 2016)."""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from kdbench.api import KDModel, ModelOutput, hookimpl

from ._common import WidthParams, init_repdistiller, scaled


class WRNParams(WidthParams):
    depth: int = Field(16, ge=10)
    widen_factor: int = Field(2, ge=1)
    drop_rate: float = Field(0.0, ge=0, lt=1)

    @field_validator("depth")
    @classmethod
    def _six_n_plus_four(cls, v: int) -> int:
        if (v - 4) % 6:
            raise ValueError("WRN depth must be 6n + 4 (10, 16, 22, 28, 40, ...)")
        return v


class WRNVariantParams(WidthParams):
    drop_rate: float = Field(0.0, ge=0, lt=1)


class PreActBlock(nn.Module):
    """Pre-activation basic block: bn1-relu-conv1-bn2-relu-(dropout)-conv2 + shortcut.

    When the channel count changes, the shortcut (1x1 conv) also takes ``relu(bn1(x))``, as in
    the reference; otherwise it is the identity on the raw ``x``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (  # noqa: N815 -- reference name, keeps checkpoint keys loadable
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)
        )

    def forward(self, x: Tensor, act: Tensor | None = None) -> Tensor:
        """``act`` = ``relu(bn1(x))`` when the caller already computed it (no second BN pass)."""
        if act is None:
            act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.equal_in_out else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """A group of n blocks (kept as ``.layer`` so state-dict keys match the reference)."""

    def __init__(self, n: int, cin: int, cout: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(*[
            PreActBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate)
            for i in range(n)
        ])


class WideResNet(KDModel):
    """WRN-d-w (d = 6n + 4): 3x3 stem conv (16 channels, no BN), three groups of n pre-activation
    blocks with widths 16w/32w/64w, final BN + ReLU, adaptive average pool, linear head.

    Features (pre-activation nets have no ReLU at a block's end): the stage boundary is the
    BN + ReLU that follows each group, i.e. the first ``bn1`` of the next group (the final
    ``bn1`` after group 3; for the stem, the first ``bn1`` of group 1). ``preact_feats[i]`` is
    that BN's output and ``feats[i] = relu(preact_feats[i])`` -- the activation the next group
    (or the pool) actually consumes, computed once and reused by the block.
    ``bn_before_relu()`` = ``[block2.layer[0].bn1, block3.layer[0].bn1, bn1]`` as in RepDistiller
    and the official OFD code, whose pre-ReLU WRN features are exactly these BN outputs.
    Unlike mdistiller, which returns the raw block sums as ``feats`` and re-applies the BN for
    ``preact_feats`` in a second pass (updating its running stats twice in training),
    ``feats`` here are post-ReLU as the kdbench protocol requires. The stem has no BN of its
    own, so stem ``preact_feats[0]``/``feats[0]`` use group 1's first ``bn1`` the same way.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        drop_rate: float = 0.0,
        width_mult: float = 1.0,
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WRN depth must be 6n + 4")
        n = (depth - 4) // 6
        ch = [scaled(c, width_mult) for c in (16, 16 * widen_factor, 32 * widen_factor,
                                              64 * widen_factor)]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        self._stage_channels = ch[1:]
        init_repdistiller(self, linear_std=None)

    @property
    def groups(self) -> list[nn.Sequential]:
        return [self.block1.layer, self.block2.layer, self.block3.layer]

    def stage_channels(self) -> list[int]:
        return list(self._stage_channels)

    def _boundary_bns(self) -> list[nn.BatchNorm2d]:
        """The BN + ReLU after the stem and after each group."""
        return [g[0].bn1 for g in self.groups] + [self.bn1]

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return self._boundary_bns()[1:]

    def forward(self, x: Tensor) -> ModelOutput:
        out = self.conv1(x)
        bns = self._boundary_bns()
        feats, preacts = [], []
        for i, group in enumerate(self.groups):
            pre = bns[i](out)
            act = F.relu(pre)
            feats.append(act)
            preacts.append(pre)
            out = group[0](out, act)
            for blk in group[1:]:
                out = blk(out)
        pre = bns[-1](out)
        act = F.relu(pre)
        feats.append(act)
        preacts.append(pre)
        pooled = self.avgpool(act).flatten(1)
        return ModelOutput(self.fc(pooled), feats, preacts, pooled)


def _wrn(num_classes: int, params: WRNParams) -> WideResNet:
    return WideResNet(
        params.depth, params.widen_factor, num_classes, params.drop_rate, params.width_mult
    )


def _variant(depth: int, widen: int):
    def factory(num_classes: int, params: WRNVariantParams) -> WideResNet:
        return WideResNet(depth, widen, num_classes, params.drop_rate, params.width_mult)

    return factory


@hookimpl
def kdbench_register_models(register):
    register("wrn", _wrn, params=WRNParams,
             help="Wide ResNet WRN-depth-widen_factor for CIFAR (RepDistiller wrn.py)")
    for depth, widen in ((40, 2), (16, 2), (40, 1), (16, 1)):
        register(f"wrn_{depth}_{widen}", _variant(depth, widen), params=WRNVariantParams,
                 help=f"WRN-{depth}-{widen} for CIFAR (RepDistiller wrn.py)")
