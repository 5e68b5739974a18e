"""ReviewKD — Chen, Liu, Zhao & Jia 2021, "Distilling knowledge via knowledge review".

Student levels (shallowest first) ``S = feats[1:] + [pooled as an (N, D, 1, 1) map]``; teacher
levels ``T = preact_feats[1:] + [pooled]`` (as the official CIFAR code and mdistiller). Review
mechanism: attention-based fusion (ABF) modules run deepest first; ABF_j of level j takes the
student map x_j and the already-fused deeper map y (none for the deepest level)::

    x = BN(conv1x1_{in->mid}(x_j))
    if fusing:  y = nearest_upsample(y, size of x)
                z = sigmoid(conv1x1_{2mid->2}([x, y]) + b)          (2 attention maps)
                x = x · z_0 + y · z_1
    if size(x) != size(T_j): x = nearest_resize(x, size(T_j))
    out_j = BN(conv3x3_{mid->out}(x));   x is passed on as the next (shallower) level's y

Hierarchical context loss, per level, exactly as the official ``hcl``::

    HCL(F, G) = [ MSE(F, G) + Σ_{l in (4, 2, 1), l < h} 2^-(rank) MSE(avgpool_l(F), avgpool_l(G)) ]
                / (1 + Σ of the pool weights used)

i.e. weights 1, 0.5, 0.25, 0.125 for full res and pools 4, 2, 1, normalised by the sum of the
weights actually used; a pool size l >= the map height h is skipped (so the 1x1 pooled level is
a plain MSE, and a 4x4 map uses full res + pools 2, 1 with weights 1, 0.5, 0.25). MSE is the
mean over all elements. The term is ``Σ_levels HCL · min(epoch / warmup_epochs, 1)``.

Defaults (method card / official ``script/reviewKD.sh``): recipe weight 5.0 (``default_weight``)
for most pairs; the official scripts use 8.0 for ShuffleNetV2 students (set ``weight = 8.0`` in
the recipe for WRN-40-2 -> ShuffleNetV2), 1.0 for resnet110 -> resnet32 and 0.6 for
resnet56 -> resnet20. Warm-up 20 epochs; mid channels = min(512, student's deepest-level
channel count = pooled dim) (``max_mid_channels``). CE 1.0 is the separate ``ce`` method.

Choices and deviations (documented):

* Shapes: in/out channels and spatial sizes of every level come from the setup's dummy forward
  (official code and mdistiller hard-code tables per student family).
* Warm-up epoch convention: the official ``train.py`` loops ``for epoch in range(epochs)``
  (0-based) and uses ``min(1, epoch / 20)``, so the review loss is 0 during the first epoch and
  full from epoch index 20. ``batch.epoch`` is 0-based, so ``min(batch.epoch / warmup_epochs, 1)``
  reproduces the official code exactly. (mdistiller counts epochs from 1, i.e. is one epoch
  ahead: factor 1/20 in the first epoch, full from index 19.) ``warmup_epochs = 0`` disables it.
* Different level counts (e.g. VGG with 4 stages vs another net with 3): the deepest k =
  min(n_s, n_t) levels of each are matched (pooled always pairs with pooled); shallower extra
  levels are dropped, as mdistiller's ``zip`` truncation does for its student stem.
* Student features are post-ReLU ``feats`` (mdistiller ``STU_PREACT = False``, the official
  backbones' default).
* ABF init as the official code: kaiming_uniform(a=1) on both conv weights, PyTorch defaults for
  the attention conv and the BNs.
* HCL's skip test uses the map height (as the official code); all zoo maps are square.
* Inputs are up-cast to fp32 before the loss (the reference trains in fp32): the ABF modules may
  run under bf16 autocast, their outputs and the teacher levels are up-cast and HCL (MSEs and
  pooling) runs in fp32 with autocast off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import Params, StudentMethod, UserError, at_least_fp32, hookimpl


class ReviewKDParams(Params):
    warmup_epochs: float = Field(
        20.0, ge=0, description="loss factor min(epoch / warmup_epochs, 1), 0-based epochs"
    )
    max_mid_channels: int = Field(
        512, gt=0, description="ABF mid channels = min(this, student's pooled dim)"
    )


class ABF(nn.Module):
    """Attention-based fusion module of ReviewKD."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channel),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channel),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid())
            if fuse
            else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, y: Tensor | None, out_size: tuple[int, int]):
        """Returns (output for the loss, fused map passed on to the next shallower level)."""
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (h, w), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, tuple(out_size), mode="nearest")
        return self.conv2(x), x



def hcl_loss(fstudent: list[Tensor], fteacher: list[Tensor]) -> Tensor:
    """Σ over levels of the hierarchical context loss; bf16/fp16 maps are up-cast, the MSEs and
    poolings run in float32 with autocast off."""
    with torch.autocast(device_type=fstudent[0].device.type, enabled=False):
        total = at_least_fp32(fstudent[0]).new_zeros(())
        for fs, ft in zip(fstudent, fteacher):
            fs, ft = at_least_fp32(fs), at_least_fp32(ft)
            h = fs.shape[2]
            loss = F.mse_loss(fs, ft, reduction="mean")
            cnt, tot = 1.0, 1.0
            for level in (4, 2, 1):
                if level >= h:
                    continue
                cnt /= 2.0
                loss = loss + cnt * F.mse_loss(
                    F.adaptive_avg_pool2d(fs, (level, level)),
                    F.adaptive_avg_pool2d(ft, (level, level)),
                    reduction="mean",
                )
                tot += cnt
            total = total + loss / tot
        return total


def warmup_factor(epoch: int, warmup_epochs: float) -> float:
    if warmup_epochs <= 0:
        return 1.0
    return min(epoch / warmup_epochs, 1.0)


def _student_levels(out) -> list[Tensor]:
    return list(out.feats[1:]) + [out.pooled.reshape(out.pooled.shape[0], -1, 1, 1)]


def _teacher_levels(out) -> list[Tensor]:
    return list(out.preact_feats[1:]) + [out.pooled.reshape(out.pooled.shape[0], -1, 1, 1)]


class ReviewKD(StudentMethod):
    default_weight = 5.0

    def __init__(self, params: ReviewKDParams, setup):
        super().__init__()
        s_levels = _student_levels(setup.student_out)
        t_levels = _teacher_levels(setup.teacher_out)
        k = min(len(s_levels), len(t_levels))
        s_levels, t_levels = s_levels[-k:], t_levels[-k:]
        if any(f.dim() != 4 for f in s_levels + t_levels):
            raise UserError("ReviewKD needs 4-D (N, C, H, W) stage features")
        self.num_levels = k
        self.warmup_epochs = params.warmup_epochs
        in_channels = [f.shape[1] for f in s_levels]
        out_channels = [f.shape[1] for f in t_levels]
        self.out_sizes = [tuple(f.shape[-2:]) for f in t_levels]
        self.mid_channels = min(params.max_mid_channels, in_channels[-1])
        abfs = [
            ABF(c_in, self.mid_channels, c_out, fuse=idx < k - 1)
            for idx, (c_in, c_out) in enumerate(zip(in_channels, out_channels))
        ]
        self.abfs = nn.ModuleList(abfs[::-1])  # deepest first

    def review(self, s_levels: list[Tensor], out_sizes) -> list[Tensor]:
        """ABF outputs for the student levels (given and returned shallowest first)."""
        xs = s_levels[::-1]
        sizes = list(out_sizes)[::-1]
        results = []
        residual = None
        for x, abf, size in zip(xs, self.abfs, sizes):
            out, residual = abf(x, residual, size)
            results.insert(0, out)
        return results

    def forward(self, student, teacher, batch, extra):
        k = self.num_levels
        s_levels = _student_levels(student)[-k:]
        t_levels = [t.detach() for t in _teacher_levels(teacher)[-k:]]
        results = self.review(s_levels, [tuple(t.shape[-2:]) for t in t_levels])
        factor = warmup_factor(batch.epoch, self.warmup_epochs)
        return {"reviewkd": hcl_loss(results, t_levels) * factor}


@hookimpl
def kdbench_register_student_methods(register):
    register(
        "reviewkd",
        ReviewKD,
        params=ReviewKDParams,
        help="ReviewKD: ABF review of student stages + hierarchical context loss (weight 5)",
    )
