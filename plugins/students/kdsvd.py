"""KD-SVD — Lee, Kim & Song 2018, "Self-supervised knowledge distillation using singular value
decomposition".

Each matched stage's post-ReLU map of a sample is read as a matrix X (H·W positions × C channels)
with SVD X = U Σ Vᵀ; its right singular vectors (one entry per channel) carry the knowledge. With
k = 1 by default, for stage i:

* teacher: V_t = the first k right singular vectors (unit columns, each signed so that its
  entries sum to ≥ 0), σ̂ = (σ_1 … σ_k) / ‖·‖₂;
* student: the first k + 3 right singular vectors, each teacher vector j paired with the student
  vector of largest |cosine| to it, sign-flipped to agree (``align_rsv``): Ṽ_s[:, j];
* both scaled by the *teacher's* σ̂: D_t = V_t · diag(σ̂), D_s = Ṽ_s · diag(σ̂);
* between consecutive matched stages (i − 1, i), a Gaussian kernel per channel pair and vector::

      R_{b,c,c',j} = exp( −(D_i[b, c, j] − D_{i−1}[b, c', j])² / 8 )

      L_KDSVD = (1/B) Σ_{i ≥ 1} Σ_{b,c,c',j} ( R^s_{b,c,c',j} − R^t_{b,c,c',j} )²

  with non-finite entries set to 0, the teacher's kernel without gradient.

Features (RepDistiller ``train_student.py`` ``--distill kdsvd``: ``feat_s[1:-1]``, the post-ReLU
stage outputs; mdistiller KDSVD: ``feats[1:]``): ``feats[1:]`` of both nets. The channel space
is compared entry by entry, so **every matched stage needs the same channel count in both nets**
(the reference fails on other pairs too: its ``align_rsv`` matmul does not fit); the set-up
refuses other pairs with a :class:`UserError`. Spatial sizes may differ (the vectors do not
depend on H·W). Defaults from the references: k = 1 (``KDSVD(k=1)``, mdistiller ``KDSVD.K``),
recipe weight 1 (``default_weight``: mdistiller ``KDSVD.LOSS.FEAT_WEIGHT`` 1.0; RepDistiller's
``scripts/run_cifar_distill.sh`` has no KDSVD line and its README no KDSVD result); CE 1.0 is
the separate ``ce`` method.

Reference followed: RepDistiller ``distiller_zoo/KDSVD.py`` (commit 1e2f8169), ``helper/loops.py``
(1143dfea). mdistiller ``mdistiller/distillers/KDSVD.py`` (e8c5bb33) reshapes the NCHW map as
``view(B, C·H, W)``, a literal transcription of the TensorFlow original's NHWC
``reshape([-1, H·W, C])`` that mixes channels with rows; RepDistiller's
``view(B, C, H·W).transpose`` is the original's matrix, and is what this file uses.

Deviations from the reference:

* The SVD's gradient. Autograd through ``torch.svd`` / ``torch.linalg.svd`` is NaN as soon as two
  singular values coincide — e.g. a sample with two channels that are 0 everywhere (dead ReLUs),
  which gives two zero singular values — even though the loss uses only the first k + 3 vectors
  and does not depend on how the discarded ones are rotated among themselves. The student's
  vectors come from a custom backward (the standard SVD gradient, Townsend 2016) in which every
  term coupling two equal singular values is 0 (exact for pairs of discarded vectors, whose term
  is 0/0 with a zero numerator; a choice for the ill-defined retained/discarded ties), as are the
  1/σ terms of zero singular values. Where the reference's gradient is finite the two agree.
* The teacher vectors' signs. A singular vector is defined up to its sign, and the reference
  takes whatever the SVD library returns; the loss is not invariant to it (flipping the teacher
  vector of one stage but not of the next changes every kernel entry; the student is aligned to
  the teacher, so only the teacher's signs matter). LAPACK on the CPU returns the top vector of
  a non-negative tall (H·W > C) matrix with negative entries and of a wide one with positive
  entries (numpy's LAPACK build: negative for both), so an early and a late stage of the same
  net can disagree, and the loss depends on the library and device. Here each teacher vector is
  flipped so that its entries sum to ≥ 0 (for post-ReLU features and k = 1 the top vector is
  then the non-negative Perron vector at every stage). Where the library returns the same sign
  at the two stages of a pair, the value is the reference's.
* ``torch.linalg.svd`` instead of the deprecated ``torch.svd`` (same factors); the matrix is
  (H·W × C) for non-square maps too (the reference writes ``size[2] * size[2]``).
* Different stage counts (never the case on the reference pairs, which ``zip`` from the
  shallowest stage): the deepest min(n_s, n_t) stages are paired, as OFD and VID here do. Fewer
  than two matched stages (no consecutive pair, an identically zero loss) is refused.
* Inputs are up-cast to fp32 and the SVD and kernels run with autocast off (the reference trains
  in fp32; there is no bf16 SVD).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdbench.api import Params, StudentMethod, UserError, at_least_fp32, hookimpl, saveable


class KDSVDParams(Params):
    k: int = Field(1, ge=1, description="number of teacher singular vectors distilled per stage")



def _finite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class TopRightSingular(torch.autograd.Function):
    """``(S[..., :n], V[..., :n])`` of a batch of real matrices x (..., m, c), x = U S Vᵀ, with
    the SVD gradient in which the terms of coinciding singular values (and 1/σ of σ = 0) are 0."""

    @staticmethod
    def forward(ctx, x: Tensor, n: int):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.transpose(-2, -1)
        n = min(n, s.shape[-1])
        ctx.save_for_backward(u, s, v)
        ctx.n = n
        return s[..., :n].contiguous(), v[..., :n].contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_s: Tensor | None, g_v: Tensor | None):
        u, s, v = ctx.saved_tensors
        n = ctx.n
        gs = torch.zeros_like(s)
        gv = torch.zeros_like(v)
        if g_s is not None:
            gs[..., :n] = g_s
        if g_v is not None:
            gv[..., :n] = g_v
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        s2 = s * s
        gap = s2.unsqueeze(-2) - s2.unsqueeze(-1)  # [..., i, j] = σ_j² − σ_i²
        f = torch.where(gap != 0, gap.reciprocal(), zero)
        vt = v.transpose(-2, -1)
        vtgv = vt @ gv
        inner = torch.diag_embed(gs) + s.unsqueeze(-1) * (f * (vtgv - vtgv.transpose(-2, -1)))
        gx = u @ inner @ vt
        if v.shape[-2] > v.shape[-1]:  # more columns than singular values: V is not square
            s_inv = torch.where(s > 0, s.reciprocal(), zero)
            gvt = gv.transpose(-2, -1)
            gx = gx + u @ (s_inv.unsqueeze(-1) * (gvt - (gvt @ v) @ vt))
        return gx, None


def right_singular(feat: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Normalised first n singular values (B, n) and unit right singular vectors (B, C, n) of
    each sample's (H·W × C) matrix, with the signs the SVD library returns."""
    b, c, h, w = feat.shape
    x = feat.reshape(b, c, h * w).transpose(1, 2)
    s, v = TopRightSingular.apply(x, n)
    return F.normalize(_finite(s), dim=1), F.normalize(_finite(v), dim=1)


def canonical_sign(v: Tensor) -> Tensor:
    """Each column of v (B, C, n) flipped so that its entries sum to >= 0."""
    return torch.where(v.sum(1, keepdim=True) < 0, -v, v)


def align_rsv(v_s: Tensor, v_t: Tensor) -> Tensor:
    """For each teacher vector, the student vector of largest |cosine| to it, signed to agree."""
    cosine = (v_s.transpose(-2, -1) @ v_t).detach()
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ mask


def _rbf(d: Tensor, d_prev: Tensor) -> Tensor:
    return torch.exp(-(d.unsqueeze(2) - d_prev.unsqueeze(1)).pow(2) / 8)


def kdsvd_loss(g_s: list[Tensor], g_t: list[Tensor], k: int) -> Tensor:
    """Σ over consecutive stage pairs of the squared kernel differences, over the batch size; in
    float32 with autocast off."""
    with torch.autocast(device_type=g_s[0].device.type, enabled=False):
        total = None
        prev_s = prev_t = None
        for f_s, f_t in zip(g_s, g_t):
            f_s, f_t = at_least_fp32(f_s), at_least_fp32(saveable(f_t))
            with torch.no_grad():
                sigma_t, v_t = right_singular(f_t, k)
                v_t = canonical_sign(v_t)
            _, v_s = right_singular(f_s, k + 3)
            v_s = align_rsv(v_s, v_t)
            d_t = v_t * sigma_t.unsqueeze(1)
            d_s = v_s * sigma_t.unsqueeze(1)
            if prev_s is not None:
                l2 = (_rbf(d_s, prev_s) - _rbf(d_t, prev_t).detach()).pow(2)
                stage = _finite(l2).sum()
                total = stage if total is None else total + stage
            prev_s, prev_t = d_s, d_t
        if total is None:  # a single stage: no consecutive pair
            return at_least_fp32(g_s[0]).sum() * 0.0
        return total / g_s[0].shape[0]


class KDSVD(StudentMethod):
    default_weight = 1.0

    def __init__(self, params: KDSVDParams, setup):
        super().__init__()
        self.k = params.k
        s_feats, t_feats = setup.student_out.feats[1:], setup.teacher_out.feats[1:]
        self.num_stages = min(len(s_feats), len(t_feats))
        if self.num_stages < 2:
            raise UserError(
                f"kdsvd compares consecutive stages: it needs at least two stages in feats[1:] of "
                f"both nets (student has {len(s_feats)}, teacher {len(t_feats)})"
            )
        n = self.num_stages
        offset_s, offset_t = len(s_feats) - n + 1, len(t_feats) - n + 1
        for i, (f_s, f_t) in enumerate(zip(s_feats[-n:], t_feats[-n:])):
            i_s, i_t = offset_s + i, offset_t + i
            for name, idx, f in (("student", i_s, f_s), ("teacher", i_t, f_t)):
                if f.dim() != 4:
                    raise UserError(f"kdsvd: {name} feats[{idx}] has shape {tuple(f.shape)}; "
                                    "KD-SVD needs (B, C, H, W) maps")
            c_s, c_t = int(f_s.shape[1]), int(f_t.shape[1])
            if c_s != c_t:
                raise UserError(
                    f"kdsvd: student feats[{i_s}] has {c_s} channels but teacher feats[{i_t}] has "
                    f"{c_t}; KD-SVD compares the right singular vectors (one entry per channel) "
                    "stage by stage, so every matched stage needs the same channel count in both "
                    "nets (RepDistiller's KDSVD fails on such pairs too)"
                )
            rank_t = min(c_t, int(f_t.shape[2] * f_t.shape[3]))
            if self.k > rank_t:
                raise UserError(
                    f"kdsvd: k = {self.k} singular vectors, but teacher feats[{i_t}] "
                    f"({c_t} channels × {f_t.shape[2]}×{f_t.shape[3]} positions) has only {rank_t}"
                )

    def forward(self, student, teacher, batch, extra):
        n = self.num_stages
        return {"kdsvd": kdsvd_loss(student.feats[1:][-n:], teacher.feats[1:][-n:], self.k)}


@hookimpl
def kdbench_register_student_methods(register):
    register("kdsvd", KDSVD, params=KDSVDParams,
             help="KD-SVD: RBF kernels of right singular vectors of consecutive feats[1:] (k 1)")
