"""AB — Heo, Lee, Yun & Choi 2019, "Knowledge transfer via distillation of activation boundaries
formed by hidden neurons".

AB transfers *where* the teacher's neurons are active, not how strongly. For each matched stage
i (of k) the student's pre-ReLU map goes through a connector r_i and is pushed beyond a margin
m on the side of zero where the teacher's pre-ReLU response lies (the alternative L2 of the
reference, summed over every sample, channel and position)::

    c_i = Σ (r_i(s) + m)² · [r_i(s) > −m] · [t ≤ 0]  +  (r_i(s) − m)² · [r_i(s) ≤ m] · [t > 0]

    L_AB = Σ_i  2^(i − k + 1) · c_i / B · 3 / 1000          (i = 0 .. k−1, shallowest first)

AB is a two-stage method (RepDistiller ``train_student.py`` ``--distill abound``): L_AB trains
the connectors *and the student's feature layers* in an initialisation stage of
``init_epochs`` (30) epochs, declared through the contract (:class:`kdbench.api.InitStage`);
afterwards the connectors are dropped and the student trains on its own terms (RepDistiller's
main loop has ``loss_kd = 0`` for ``abound``; CE, and KD if the set has it, come from the other
methods of the set). So in the main schedule this method returns **no term** and its recipe
weight multiplies nothing; ``default_weight = 1`` is RepDistiller's ``-b 1`` for AB
(``scripts/run_cifar_distill.sh``). A set of ``ab`` alone has no loss in the main schedule:
pair it with ``ce`` (the reference's ``-r 1``) and, optionally, ``kd``.

Reference followed: RepDistiller ``distiller_zoo/AB.py`` (commit 1e2f8169: the loss, its
weights 2^(i−k+1) and the 3/1000 scale), ``models/util.py`` (``Connector``: identity when the
channel count and height agree, else ``ConvReg`` without its ReLU: conv + BN),
``helper/pretrain.py`` (the init stage: SGD at the student's learning rate, momentum 0.9,
weight decay 5e-4, over the connector and ``model_s.get_feat_modules()``, teacher in eval mode,
``preact=True`` features ``feat[1:-1]``, i.e. the stages' pre-ReLU outputs, the stem excluded)
and ``train_student.py`` (``--init_epochs 30``). mdistiller has no AB.

Defaults: margin m = 1 (``ABLoss(feat_num, margin=1.0)``), 30 init epochs, the init stage's
learning rate the student schedule's (``init_lr = None``; the reference's ``opt.learning_rate``:
0.05, 0.01 for MobileNet/ShuffleNet students).

Deviations from the reference:

* The init stage trains the whole student with the connectors; the student's classifier gets
  no gradient from L_AB (it reads pre-ReLU stage maps only), and SGD leaves a parameter without
  gradient untouched (no weight decay, no momentum), so it is exactly ``get_feat_modules()``'s
  training. The student is in train mode (the reference calls ``model_s.eval()`` and then
  ``init_modules.train()``, which puts its feature modules, every BN of the student, back in
  train mode).
* Stage pairing: the deepest min(n_s, n_t) stages of ``preact_feats[1:]`` (the reference
  ``zip``s from the shallowest; equal on its pairs), as OFD and VID here.
* Connector geometry: the reference's ``ConvReg`` rules (student 2× larger: conv 3×3 stride 2;
  2× smaller: transposed conv 4×4 stride 2; larger: conv of kernel 1 + ΔH) and, where the
  reference raises (a student map smaller than the teacher's by another factor, e.g. some
  64-px pairs), a 1×1 conv + BN with the teacher map average-pooled to the student's size.
  The connector uses PyTorch's default initialisation, as the reference.
* Inputs are up-cast to fp32 and the loss runs with autocast off (the reference trains in
  fp32); the connectors may run in bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import InitStage, Params, StudentMethod, UserError, at_least_fp32, hookimpl
from kdbench_plugins.students.fitnet import ConvRegressor


class ABParams(Params):
    margin: float = Field(1.0, gt=0, description="margin m of the alternative L2 (ABLoss margin)")
    init_epochs: int = Field(30, ge=0, description="epochs of the initialisation stage (train_student.py "
                             "--init_epochs); 0: no stage, and then AB does nothing")
    init_lr: float | None = Field(None, gt=0, description="SGD learning rate of the initialisation "
                                  "stage; None: the student schedule's (pretrain.py: opt.learning_rate)")


def ab_loss(sources: list[Tensor], targets: list[Tensor], margin: float) -> Tensor:
    """Σ_i 2^(i−k+1) · c_i / B · 3/1000 over the k (connected student, teacher) pre-ReLU map pairs,
    shallowest first; fp32 with autocast off."""
    k, batch = len(sources), sources[0].shape[0]
    with torch.autocast(device_type=sources[0].device.type, enabled=False):
        total = at_least_fp32(sources[0]).new_zeros(())
        for i, (s, t) in enumerate(zip(sources, targets)):
            s, t = at_least_fp32(s), at_least_fp32(t)
            below = ((s > -margin) & (t <= 0)).to(s.dtype)
            above = ((s <= margin) & (t > 0)).to(s.dtype)
            c = ((s + margin) ** 2 * below + (s - margin) ** 2 * above).sum()
            total = total + 2.0 ** (i - k + 1) * c / batch * 3 / 1000
    return total


class Connector(nn.Module):
    """Student pre-ReLU map (sC, sH, sW) -> the teacher's (tC, tH, tW): identity when channels
    and height agree; else conv (the ConvReg geometry) + BN; else 1×1 conv + BN onto a teacher
    map pooled to the student's size (``pool_teacher``)."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        _, s_c, s_h, s_w = (int(v) for v in s_shape)
        _, t_c, t_h, t_w = (int(v) for v in t_shape)
        self.pool_teacher = None
        if s_c == t_c and s_h == t_h and s_w == t_w:
            self.map = nn.Identity()
            return
        try:
            reg = ConvRegressor(s_shape, t_shape)
            self.map = nn.Sequential(reg.conv, reg.bn)  # the reference's ConvReg(use_relu=False)
        except UserError:  # student smaller by a factor other than 2: compare on its grid
            self.map = nn.Sequential(nn.Conv2d(s_c, t_c, kernel_size=1), nn.BatchNorm2d(t_c))
            self.pool_teacher = (s_h, s_w)

    def forward(self, s: Tensor) -> Tensor:
        return self.map(s)

    def target(self, t: Tensor) -> Tensor:
        return t if self.pool_teacher is None else F.adaptive_avg_pool2d(t, self.pool_teacher)


class AB(StudentMethod):
    default_weight = 1.0  # run_cifar_distill.sh -b 1; multiplies no term (see the docstring)

    def __init__(self, params: ABParams, setup):
        super().__init__()
        s_maps, t_maps = setup.student_out.preact_feats[1:], setup.teacher_out.preact_feats[1:]
        k = min(len(s_maps), len(t_maps))
        if k == 0:
            raise UserError(f"ab needs at least one stage in preact_feats[1:] of both nets (student "
                            f"has {len(s_maps)}, teacher {len(t_maps)})")
        for name, maps in (("student", s_maps), ("teacher", t_maps)):
            for i, f in enumerate(maps, start=1):
                if f.dim() != 4:
                    raise UserError(f"ab: {name} preact_feats[{i}] has shape {tuple(f.shape)}; AB "
                                    "needs (B, C, H, W) maps")
        self.num_stages, self.margin = k, params.margin
        self.init_epochs, self.init_lr = params.init_epochs, params.init_lr
        self.connectors = nn.ModuleList(Connector(s.shape, t.shape)
                                        for s, t in zip(s_maps[-k:], t_maps[-k:]))
        # The student trains in the stage; a list, so that it is not a submodule of the method
        # (its parameters would be handed to the optimizer twice).
        self._student = [setup.student] if setup.student is not None else []

    def stage_loss(self, student, teacher, batch) -> dict[str, Tensor]:
        k = self.num_stages
        pairs = zip(student.preact_feats[1:][-k:], teacher.preact_feats[1:][-k:], self.connectors)
        sources, targets = [], []
        for s, t, conn in pairs:
            sources.append(conn(s))
            targets.append(conn.target(t.detach()))
        return {"ab": ab_loss(sources, targets, self.margin)}

    def init_stage(self) -> InitStage | None:
        if not self.init_epochs:
            return None
        return InitStage(epochs=self.init_epochs, modules=[self.connectors, *self._student],
                         loss=self.stage_loss, lr=self.init_lr, student_train_mode=True)

    def forward(self, student, teacher, batch, extra):
        return {}  # RepDistiller's main loop: loss_kd = 0 for abound


@hookimpl
def kdbench_register_student_methods(register):
    register("ab", AB, params=ABParams,
             help="AB: activation boundaries (pre-ReLU signs) in a 30-epoch init stage; no main-stage term")
