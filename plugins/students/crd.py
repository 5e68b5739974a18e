"""CRD — Tian, Krishnan & Isola 2019, "Contrastive representation distillation".

The pooled vectors of both nets are embedded, v_s = g_s(s), v_t = g_t(t), with g = Linear (input
size inferred from the set-up's pooled shapes) → feat_dim 128 → L2 normalisation. Every training
sample i has a slot in two memory banks, M_s[i] (student embeddings) and M_t[i] (teacher
embeddings). For an anchor i of the batch with negatives j_1..j_K:

    h_s(i, j) = exp( v_s(i) · M_t[j] / τ ) / Z_s          (student anchor vs the teacher bank)
    h_t(i, j) = exp( v_t(i) · M_s[j] / τ ) / Z_t          (teacher anchor vs the student bank)

and the NCE loss of the reference ``ContrastLoss`` (paper Eq. 18 with noise P_n = 1/N, m = K):

    L(h) = −(1/B) Σ_i [ log( h(i,i) / (h(i,i) + m·P_n + ε) )
                        + Σ_k log( m·P_n / (h(i,j_k) + m·P_n + ε) ) ],   ε = 1e-7
    L_CRD = L(h_s) + L(h_t)                                  (returned as term "crd")

After the scores are taken, the banks are updated (no gradient) at the batch's dataset indices:
M[i] ← normalise( μ·M[i] + (1 − μ)·v(i) ), μ = 0.5. The banks start uniform in [−σ, σ] with
σ = 1/sqrt(feat_dim/3), as in RepDistiller's ``ContrastMemory``.

Normalisation constants: as in the reference, Z_s and Z_t are estimated once, on the first batch,
as N · mean over the (B, K+1) exponentiated scores (positives included), and then kept fixed. They
are registered buffers (``z_s``, ``z_t``; −1 = not yet estimated), so they travel with
checkpoints and a resumed run does not re-estimate them. The estimate is taken without a host
sync (``torch.where`` on the device).

Negatives: K = min(nce_k, N − 1) per anchor (capped for small data sets), drawn on the device with
the global torch RNG (the engine seeds it) or ``self.generator`` if set, vectorised over the
batch: random keys for all N samples, the disallowed ones masked, top-K kept (uniform sampling
without replacement, like the reference's ``np.random.choice(..., replace=False)``). The anchor
itself is never a negative. ``mode="exact"`` (the default) draws only from samples of other
classes (``setup.train_labels``), which is what RepDistiller's CIFAR-100 ``CIFAR100InstanceSample``
loader does (also used by mdistiller; its ``mode="exact"`` refers to the positive being the anchor
itself; its negatives always come from other classes); ``mode="uniform"`` draws from every other
sample, same-class ones included (about 1% of negatives on CIFAR-100, 10% on CIFAR-10). Until
kdbench 0.1's engine-seams release the default was "uniform": CRD run ids changed with it. When K exceeds the number of
allowed negatives of some class (tiny data in "exact" mode) the sampler draws with replacement
(``torch.multinomial``), as the reference does in that case; ``replacement=True`` forces that.

Defaults from the method card: feat_dim 128, K 16384, τ 0.07, momentum 0.5, recipe weight 0.8
(``default_weight``; CE 1.0 is the separate ``ce`` method).

Deviations from the references:
* embedding input sizes come from the nets (**defect** in one reference: fixed at 256);
* scores are computed as (v @ Mᵀ) gathered at the sampled indices, the same numbers as the
  reference's index_select + bmm but O(B·N) memory instead of O(B·(K+1)·feat_dim);
* the banks are replaced out of place when updated (a new tensor registered under the same buffer
  name) so the tensor saved for backward is never modified in place;
* the negatives come from the method, not the data loader, and are sampled on the device;
  the reference's unused AliasMethod (which could draw the anchor) is not reproduced;
* the contrast runs in float32 with autocast disabled (exp(score/τ) is not bf16-safe): inputs
  are up-cast to fp32 before the loss (the reference trains in fp32); the embedding linears may
  run in bf16, their outputs are normalised in fp32, and the memory banks stay fp32;
* per-step cost of the sampler is O(B·N) (fine for CIFAR / Tiny ImageNet).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdbench.api import Params, StudentMethod, UserError, hookimpl, saveable

NCE_EPS = 1e-7


class CRDParams(Params):
    feat_dim: int = Field(128, gt=0, description="embedding dimension")
    nce_k: int = Field(16384, gt=0, description="negatives per anchor (capped at N − 1)")
    nce_t: float = Field(0.07, gt=0, description="temperature τ")
    nce_m: float = Field(0.5, ge=0, lt=1, description="momentum of the memory-bank update")
    mode: Literal["uniform", "exact"] = Field(
        "exact", description="negatives: only samples of other classes ('exact', the reference's "
        "CIFAR loader), or any other sample ('uniform')"
    )
    replacement: bool = Field(False, description="draw negatives with replacement")


class Embed(nn.Module):
    """Linear + L2 normalisation (the L2 norm in float32)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.linear(x.reshape(x.shape[0], -1))  # may run in bf16 under autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.normalize(x.float(), p=2, dim=1)


def nce_loss(p: torch.Tensor, n_data: int) -> torch.Tensor:
    """RepDistiller ``ContrastLoss``: p is (B, K+1), positive in column 0."""
    bsz, m = p.shape[0], p.shape[1] - 1
    mpn = m / float(n_data)
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + mpn + NCE_EPS))
    log_d0 = torch.log(mpn / (p[:, 1:] + mpn + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / bsz


class CRD(StudentMethod):
    default_weight = 0.8

    def __init__(self, params: CRDParams, setup):
        super().__init__()
        n = int(setup.num_train_samples)
        if n < 2:
            raise UserError("crd needs at least 2 training samples")
        s_dim = int(setup.student_out.pooled[0].numel())
        t_dim = int(setup.teacher_out.pooled[0].numel())
        self.embed_s = Embed(s_dim, params.feat_dim)
        self.embed_t = Embed(t_dim, params.feat_dim)
        self.num_data = n
        self.k = min(params.nce_k, n - 1)
        self.temperature = params.nce_t
        self.momentum = params.nce_m
        self.mode = params.mode
        self.generator: torch.Generator | None = None  # None: the global RNG of the device
        self.last_neg_idx: torch.Tensor | None = None  # the negatives of the last step

        if self.mode == "exact":
            labels = torch.as_tensor(setup.train_labels).long().reshape(-1).cpu()
            if labels.numel() != n:
                raise UserError(f"crd: {labels.numel()} train labels for {n} training samples")
            available = n - int(torch.bincount(labels).max())
            if available < 1:
                raise UserError("crd mode 'exact' needs at least two classes in the training set")
            self.register_buffer("train_labels", labels, persistent=False)
        else:
            available = n - 1
            self.train_labels = None
        self.replacement = bool(params.replacement or self.k > available)

        stdv = 1.0 / math.sqrt(params.feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n, params.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n, params.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))

    # ------------------------------------------------------------------ sampling
    def sample_negatives(self, idx: torch.Tensor, generator: torch.Generator | None = None):
        """(B, K) dataset indices of negatives for anchors ``idx``; never the anchor itself."""
        generator = generator if generator is not None else self.generator
        idx = idx.reshape(-1).long()
        bsz, dev = idx.shape[0], self.memory_s.device
        idx = idx.to(dev)
        if self.mode == "exact":
            labels = self.train_labels
            allowed = labels.unsqueeze(0) != labels[idx].unsqueeze(1)
        else:
            allowed = torch.ones(bsz, self.num_data, dtype=torch.bool, device=dev)
        allowed.scatter_(1, idx.unsqueeze(1), False)
        if self.replacement:
            return torch.multinomial(allowed.float(), self.k, replacement=True, generator=generator)
        keys = torch.rand(bsz, self.num_data, device=dev, generator=generator)
        keys.masked_fill_(~allowed, -1.0)  # keys of allowed samples are in [0, 1)
        return keys.topk(self.k, dim=1).indices

    # ------------------------------------------------------------------ loss
    def contrast_loss(
        self,
        v_s: torch.Tensor,
        v_t: torch.Tensor,
        idx: torch.Tensor,
        neg_idx: torch.Tensor,
        update_memory: bool = True,
    ) -> torch.Tensor:
        """NCE loss of embedded (normalised) v_s, v_t for anchors ``idx`` with negatives
        ``neg_idx`` (B, K); sets Z on first use and updates the banks (unless told not to)."""
        idx = idx.reshape(-1).long().to(self.memory_s.device)
        with torch.autocast(device_type=v_s.device.type, enabled=False):
            v_s, v_t = v_s.float(), v_t.float()
            all_idx = torch.cat([idx.unsqueeze(1), neg_idx.long()], dim=1)  # positive first
            e_s = torch.exp(torch.gather(v_s @ self.memory_t.t(), 1, all_idx) / self.temperature)
            e_t = torch.exp(torch.gather(v_t @ self.memory_s.t(), 1, all_idx) / self.temperature)
            with torch.no_grad():
                self.z_s.copy_(torch.where(self.z_s < 0, e_s.mean() * self.num_data, self.z_s))
                self.z_t.copy_(torch.where(self.z_t < 0, e_t.mean() * self.num_data, self.z_t))
            loss = nce_loss(e_s / self.z_s.clone(), self.num_data) + nce_loss(
                e_t / self.z_t.clone(), self.num_data
            )
            if update_memory:
                self.update_memory(v_s.detach(), v_t.detach(), idx)
        return loss

    @torch.no_grad()
    def update_memory(self, v_s: torch.Tensor, v_t: torch.Tensor, idx: torch.Tensor):
        """M[i] <- normalise(μ·M[i] + (1 − μ)·v(i)); out of place (a new buffer tensor). The
        banks stay float32 (v is up-cast; autocast off)."""
        with torch.autocast(device_type=v_s.device.type, enabled=False):
            for name, v in (("memory_s", v_s), ("memory_t", v_t)):
                bank = getattr(self, name)
                new = bank.index_select(0, idx) * self.momentum + v.float() * (1 - self.momentum)
                new = new / new.pow(2).sum(1, keepdim=True).sqrt()
                setattr(self, name, bank.index_copy(0, idx, new))

    def forward(self, student, teacher, batch, extra):
        t = saveable(teacher.pooled)
        v_s = self.embed_s(student.pooled)
        v_t = self.embed_t(t)
        neg = self.sample_negatives(batch.index)
        self.last_neg_idx = neg
        return {"crd": self.contrast_loss(v_s, v_t, batch.index, neg)}

    def epoch_stats(self) -> dict[str, float]:
        return {"crd_z_s": float(self.z_s), "crd_z_t": float(self.z_t)}


@hookimpl
def kdbench_register_student_methods(register):
    register(
        "crd",
        CRD,
        params=CRDParams,
        help="Contrastive representation distillation: NCE with memory banks (K=16384, τ=0.07)",
    )
