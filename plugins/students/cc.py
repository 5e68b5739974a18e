"""CC — Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang 2019, "Correlation congruence for knowledge
distillation", as implemented in RepDistiller (``Correlation``: "code emailed to me by the
original author").

The pooled penultimate vectors of both nets go through a linear embedding each (both trained
with the student), e_s = W_s·s + b_s and e_t = W_t·t + b_t (128 dims); with δ_b = |e_s,b − e_t,b|
(elementwise) the loss couples consecutive samples of the batch::

    L_CC = (1 / (B − 1)) Σ_{b=1}^{B−1} Σ_d δ_{b,d} · δ_{b+1,d}

Features and heads (RepDistiller ``train_student.py`` ``--distill correlation``):
``LinearEmbed(feat_s[-1].shape[1], feat_dim)`` and ``LinearEmbed(feat_t[-1].shape[1], feat_dim)``
on ``feat[-1]``, the pooled vector; ``LinearEmbed`` is a bare ``nn.Linear`` (PyTorch's default
initialisation, no normalisation — unlike CRD's ``Embed``). Both heads are in
``trainable_list``, so the teacher's head learns too; the teacher itself does not. Here:
``pooled`` of both nets, heads ``embed_s`` / ``embed_t`` (``nn.Linear``) sized from the setup.
Defaults from the reference: ``feat_dim`` 128 (``--feat_dim``), recipe weight 0.02
(``default_weight``: ``scripts/run_cifar_distill.sh`` ``-b 0.02``); CE 1.0 is the separate
``ce`` method. mdistiller has no CC.

Reference followed: RepDistiller ``distiller_zoo/CC.py`` (commit 1e2f8169), ``models/util.py``
``LinearEmbed`` (eedab9d1), ``train_student.py`` / ``helper/loops.py`` (1143dfea).

Deviations from the reference:

* The loss is RepDistiller's code, not the paper's Gaussian-kernel correlation matrices: the
  published RepDistiller CC numbers come from this code.
* A batch of one sample has no consecutive pair: the reference's ``torch.mean`` of an empty
  tensor is NaN; here the term is 0 (still connected to the graph).
* The heads may run in bf16 under autocast; their outputs are up-cast to fp32 and the loss runs
  with autocast off (the reference trains in fp32).
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import Params, StudentMethod, UserError, at_least_fp32, hookimpl, saveable


class CCParams(Params):
    feat_dim: int = Field(128, ge=1, description="output size of the two linear embedding heads")



def cc_loss(e_s: Tensor, e_t: Tensor) -> Tensor:
    """Mean over consecutive sample pairs of Σ_d |e_s − e_t|_b · |e_s − e_t|_{b+1}, in float32
    with autocast off."""
    with torch.autocast(device_type=e_s.device.type, enabled=False):
        delta = (at_least_fp32(e_s) - at_least_fp32(e_t)).abs()
        products = (delta[:-1] * delta[1:]).sum(1)
        if products.shape[0] == 0:
            return delta.sum() * 0.0
        return products.mean()


class CC(StudentMethod):
    default_weight = 0.02

    def __init__(self, params: CCParams, setup):
        super().__init__()
        dims = []
        for name, out in (("student", setup.student_out), ("teacher", setup.teacher_out)):
            if out.pooled is None or out.pooled.dim() != 2:
                shape = None if out.pooled is None else tuple(out.pooled.shape)
                raise UserError(f"cc needs the {name}'s pooled vector (B, D); it has {shape}")
            dims.append(int(out.pooled.shape[1]))
        self.embed_s = nn.Linear(dims[0], params.feat_dim)
        self.embed_t = nn.Linear(dims[1], params.feat_dim)

    def forward(self, student, teacher, batch, extra):
        e_s = self.embed_s(student.pooled)
        e_t = self.embed_t(saveable(teacher.pooled))
        return {"cc": cc_loss(e_s, e_t)}


@hookimpl
def kdbench_register_student_methods(register):
    register("cc", CC, params=CCParams,
             help="Correlation congruence (RepDistiller code): linear heads on pooled (w 0.02)")
