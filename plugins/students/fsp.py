"""FSP — Yim, Joo, Bae & Kim 2017, "A gift from knowledge distillation: fast optimization, network
minimization and transfer learning".

The "flow of solution procedure" between two consecutive feature maps of a net is their
position-averaged channel outer product: for maps F1 (C1 × H·W) and F2 (C2 × H·W) of a sample
(the larger of the two average-pooled to the smaller's H × W)::

    G[j, i] = (1 / (H·W)) Σ_p F2[j, p] · F1[i, p]                (C2 × C1)

    L_FSP = Σ_l  mean_{b, j, i} ( G^s_l[b, j, i] − G^t_l[b, j, i] )²

over the consecutive pairs l = (feats[l], feats[l+1]) of ``feats`` (the stem's post-ReLU map
and every stage's: RepDistiller's ``feat[:-1]``). The matrices are compared entry by entry, so
student and teacher need the same number of maps with the same channel counts (the reference
raises ``num of channels not equal``; the set-up here refuses other pairs with a
:class:`UserError`). Spatial sizes may differ between the nets.

FSP is a two-stage method (RepDistiller ``train_student.py`` ``--distill fsp``): L_FSP trains
the student's feature layers in an initialisation stage of ``init_epochs`` (30) epochs,
declared through the contract (:class:`kdbench.api.InitStage`); the main loop then has
``loss_kd = 0`` for ``fsp`` (the student trains on CE, and KD if the set has it, from the other
methods of the set). So in the main schedule this method returns **no term** and its recipe
weight multiplies nothing; ``default_weight = 50`` is RepDistiller's ``-b 50`` for FSP
(``scripts/run_cifar_distill.sh``), recorded as the reference passes it. The stage's loss is
unweighted, as in ``helper/pretrain.py`` (``loss = sum(loss_group)``).

Reference followed: RepDistiller ``distiller_zoo/FSP.py`` (commit 1e2f8169), ``helper/pretrain.py``
(SGD at the student's learning rate, momentum 0.9, weight decay 5e-4, over
``model_s.get_feat_modules()``, teacher in eval mode) and ``train_student.py``
(``--init_epochs 30``). mdistiller has no FSP.

Deviations from the reference:

* The init stage trains the whole student; its classifier gets no gradient from L_FSP (it reads
  feature maps only) and SGD leaves a parameter without gradient untouched (no weight decay, no
  momentum), so this is exactly ``get_feat_modules()``'s training. The student is in train mode
  (the reference's ``model_s.eval()`` is undone by ``init_modules.train()`` on its feature
  modules).
* Pooling to (min H, min W) of the two maps (the reference pools to a square (H, H); equal on
  square maps).
* Inputs are up-cast to fp32 and the matrices are computed with autocast off (the reference
  trains in fp32).
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdbench.api import InitStage, Params, StudentMethod, UserError, at_least_fp32, hookimpl
from kdbench_plugins.students._stages import pool_to_common


class FSPParams(Params):
    init_epochs: int = Field(30, ge=0, description="epochs of the initialisation stage (train_student.py "
                             "--init_epochs); 0: no stage, and then FSP does nothing")
    init_lr: float | None = Field(None, gt=0, description="SGD learning rate of the initialisation "
                                  "stage; None: the student schedule's (pretrain.py: opt.learning_rate)")


def fsp_matrices(maps: list[Tensor]) -> list[Tensor]:
    """(B, C_{l+1}, C_l) FSP matrix of each consecutive pair of ``maps``, in fp32."""
    out = []
    for bottom, top in zip(maps[:-1], maps[1:]):
        bottom, top = pool_to_common(at_least_fp32(bottom), at_least_fp32(top))
        b = bottom.flatten(2)  # (B, C_l, H·W)
        t = top.flatten(2)
        out.append(torch.bmm(t, b.transpose(1, 2)) / b.shape[-1])
    return out


def fsp_loss(s_maps: list[Tensor], t_maps: list[Tensor]) -> Tensor:
    with torch.autocast(device_type=s_maps[0].device.type, enabled=False):
        terms = [(gs - gt).pow(2).mean() for gs, gt in zip(fsp_matrices(s_maps), fsp_matrices(t_maps))]
        return torch.stack(terms).sum()


class FSP(StudentMethod):
    default_weight = 50.0  # run_cifar_distill.sh -b 50; multiplies no term (see the docstring)

    def __init__(self, params: FSPParams, setup):
        super().__init__()
        s_maps, t_maps = setup.student_out.feats, setup.teacher_out.feats
        for name, maps in (("student", s_maps), ("teacher", t_maps)):
            for i, f in enumerate(maps):
                if f.dim() != 4:
                    raise UserError(f"fsp: {name} feats[{i}] has shape {tuple(f.shape)}; FSP needs "
                                    "(B, C, H, W) maps")
        s_ch, t_ch = [f.shape[1] for f in s_maps], [f.shape[1] for f in t_maps]
        if len(s_ch) < 2 or s_ch != t_ch:
            raise UserError(f"fsp compares FSP matrices entry by entry and needs the same channel count "
                            f"in every feature map of both nets, at least two maps (student {s_ch}, "
                            f"teacher {t_ch}); choose a pair with equal widths (e.g. wrn_40_2 -> "
                            "wrn_16_2) or another method")
        self.init_epochs, self.init_lr = params.init_epochs, params.init_lr
        # A list, so that the student is not a submodule of the method (the optimizer would get
        # its parameters twice).
        self._student = [setup.student] if setup.student is not None else []

    def stage_loss(self, student, teacher, batch) -> dict[str, Tensor]:
        return {"fsp": fsp_loss(student.feats, [t.detach() for t in teacher.feats])}

    def init_stage(self) -> InitStage | None:
        if not self.init_epochs:
            return None
        return InitStage(epochs=self.init_epochs, modules=list(self._student), loss=self.stage_loss,
                         lr=self.init_lr, student_train_mode=True)

    def forward(self, student, teacher, batch, extra):
        return {}  # RepDistiller's main loop: loss_kd = 0 for fsp


@hookimpl
def kdbench_register_student_methods(register):
    register("fsp", FSP, params=FSPParams,
             help="FSP: flow matrices between consecutive maps in a 30-epoch init stage; no main-stage term")
