"""Intra-class contrastive teacher — "Enriching Knowledge Distillation with Intra-Class
Contrastive Learning", Sec. 3.2, Eq. 4–5.

    L_Teacher = CE(y, p_t) + λ · L_Intra                                              (Eq. 5)

    L_Intra(x) = −log  exp(s⁺/τ) / ( exp(s⁺/τ) + Σ_k exp(s_k⁻/τ) ),   s = f(x)ᵀ f(·)    (Eq. 4)

The positive x⁺ is a second, independent crop+flip view of the same image (engine view
``"second"``); the negatives x_k⁻ are every *other* sample of the same class in the batch, in both
views (neither x itself nor x⁺). Every sample of both views is an anchor (2B anchors). L_Intra is
the mean over the anchors that have at least one same-class negative; an anchor whose class
occurs once in the batch contributes nothing (its "loss" would be −log 1 = 0 and would only
dilute the mean). If no anchor has a negative the term is an exact 0 that is still connected
to the graph, so ``backward`` works and the number of reported terms never changes.

Representation f (``embedding``), with the range of s = f(x)ᵀf(x'):
  * ``"pooled_normalized"`` (default) — the L2-normalised pooled penultimate feature, the φ of
    Sec. 4.1 (‖φ‖₂ = 1, d > c), which the paper introduces "for the convenience of the
    theoretical analysis". Every zoo model's pooled feature comes after a ReLU (all entries
    ≥ 0), so s ∈ [0, 1], not [−1, 1]: the equality case of Theorem 2's bounds (s⁻ = −1) cannot
    be reached. (A model whose pooled feature can be negative gives [−1, 1].) It is the default
    because the literal reading below does not train (measured, next item).
  * ``"logits"`` — the teacher's logits, unnormalised: Eq. 4 as printed. In the paper f is the
    classifier (Sec. 3.1, "each f ∈ F is a classifier"; Algorithm 1, line 4,
    p_t = Softmax(f_θ(x))), so this is the literal reading, and the term shapes exactly the
    vector the soft labels are made of. s ∈ ℝ, unbounded (it grows with the logits' norm); the
    loss is computed stably as logsumexp({s⁺} ∪ {s⁻}) − s⁺ in float32, which cannot overflow.
    Measured (issue 15), margin teacher, δ = 0.5, P = 16, λ = 0.02, real Fashion-MNIST, seed 0,
    recipes/fashion_mnist_cpu.toml's VGG13 (×0.5) teacher, its first 5 epochs (lr 0.05, as the
    15-epoch schedule's first 10), final code: test accuracy 39.8% after
    epoch 1 (before the gate lets anything in), then 9.0 / 10.0 / 12.8 / 10.0% at epochs 2–5
    (chance: every test image one class, softmax entropy 0.05) while train accuracy rose to
    61.7% and the pass rate to 0.33; the same teacher with ``"pooled_normalized"`` had 31 / 29 /
    64 / 63% at epochs 2–5 and 79.57% at epoch 15 (CE: 81.03%). With the earlier, running-
    statistics version of the margin pipeline's re-encoding the literal logits went to chance at
    epoch 2 and NaN at epoch 4. The term rewards growing the logits (s⁺ − s⁻ scales with their
    norm squared): in the failed teacher s⁺ ≈ 86 on the test set. A documented option, not the
    default.
  * ``"logits_normalized"`` — the L2-normalised logits: s ∈ [−1, 1] (the cosine in class space).
  * ``"projection"`` — a SimCLR-style head Linear(D, D)–ReLU–Linear(D, 128) on the pooled
    feature, L2-normalised: s ∈ [−1, 1]; the head's parameters join the teacher's optimizer. Not
    in the paper.
  ``"pooled"`` still works, with a FutureWarning: it is the old name of ``"pooled_normalized"``.
  (Until issue 15 ``"logits"`` meant the normalised logits, now ``"logits_normalized"``; README,
  "Changes that gave some runs new ids".)
``temperature`` τ = 1 reproduces the paper's equation (no temperature appears there).

Defaults: λ = 0.02 (the paper uses 0.01–0.03, Sec. 5.1), pooled_normalized, τ = 1.
Deviation: the default f is Sec. 4.1's normalised φ, not Algorithm 1's classifier (above).
Deviation/unspecified in the paper: which two views and which negatives per anchor are not
spelled out beyond "its augmented view is the positive, other samples of the same class are
negatives"; we use the symmetric two-view form above. The two views are two separate forwards
in train mode (as any second view in the engine), so BatchNorm normalises each view with its
own statistics (both views hold every class of the batch) and updates its running statistics
once per view.

The core, :func:`tuple_loss_terms`, is shared with ``margin_intra`` (one implementation of
Eq. 4); it takes the negative mask as an argument so the same code path gives the inter-class
(n+1)-tuple loss of Eq. 1 / Eq. 8 when handed other-class negatives.

Diagnostics: :meth:`IntraClass.representation` is the f above, so a finished teacher's record
holds Section 4's quantities (L_Intra, L_Inter, d_intra, d_inter, Theorem 1) for it as well as
for the normalised pooled feature (:mod:`kdbench.diagnostics`).

Precision: the logits of CE, the embeddings (after the projection head, which may run in bf16
under autocast) and the similarities are up-cast to fp32 before the loss, autocast off.
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from kdbench.api import ModelOutput, Params, TeacherObjective, hookimpl
from kdbench_plugins.teachers.ce import fp32_cross_entropy

Embedding = Literal["logits", "logits_normalized", "pooled_normalized", "projection"]
# Old value names -> new ones (accepted with a FutureWarning naming the new one).
RENAMED_EMBEDDINGS = {"pooled": "pooled_normalized"}
EMBEDDING_HELP = ("f in s = f(x)ᵀf(x'): pooled_normalized (Sec. 4.1's φ; after a ReLU, "
                  "s ∈ [0, 1]), logits (unnormalised, Eq. 4 as printed, s ∈ ℝ; its margin "
                  "teacher fell to chance in our measurement), logits_normalized (s ∈ [−1, 1]) or "
                  "projection (a 2-layer head to 128, normalised, s ∈ [−1, 1])")


def renamed_embedding(value):
    """``embedding``'s validator: an old value name still works, with a FutureWarning; the one
    value whose meaning changed ("logits") says so (its runs have new ids: ``revision``)."""
    if isinstance(value, str) and value in RENAMED_EMBEDDINGS:
        new = RENAMED_EMBEDDINGS[value]
        warnings.warn(f'embedding = "{value}" is deprecated: it is now called "{new}" '
                      f'(use embedding = "{new}")', FutureWarning, stacklevel=2)
        return new
    if value == "logits":
        warnings.warn('embedding = "logits" now means the unnormalised logits (Eq. 4 as printed); '
                      'until issue 15 it meant the normalised ones, now "logits_normalized"',
                      FutureWarning, stacklevel=2)
    return value


# --------------------------------------------------------------------------------------------
# Eq. 4 (shared with margin_intra)
# --------------------------------------------------------------------------------------------
def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def pair_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """For the 2N stacked anchors [view 0; view 1] of N samples with ``labels`` (N,):
    ``pos_index`` (2N,) — the row of each anchor's other view — and ``neg_mask`` (2N, 2N) —
    same label, not the anchor itself, not its positive (the intra-class negatives of Eq. 4)."""
    n = labels.shape[0]
    idx = torch.arange(2 * n, device=labels.device)
    pos_index = (idx + n) % (2 * n)
    lab2 = torch.cat([labels, labels])
    neg_mask = lab2[:, None] == lab2[None, :]
    neg_mask[idx, idx] = False
    neg_mask[idx, pos_index] = False
    return pos_index, neg_mask


def tuple_loss_terms(z: Tensor, pos_index: Tensor, neg_mask: Tensor,
                     temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(n+1)-tuple loss per anchor, Eq. 1 / Eq. 4, for every row of ``z``.

    ``z`` (M, D) are the embeddings (already normalised if wanted), ``pos_index`` (M,) the row
    of each anchor's positive, ``neg_mask`` (M, M) bool the negatives of each anchor. Returns
    ``(loss, valid)``: loss (M,) float32 = logsumexp({s⁺} ∪ {s⁻}) − s⁺ with s = zᵢᵀzⱼ/τ, and
    valid (M,) bool = the anchor has at least one negative (loss is exactly 0 where it has
    none). Computed in float32 with autocast off.
    """
    with _no_autocast(z.device):
        z = z.float()
        sim = (z @ z.t()) / temperature
        rows = torch.arange(z.shape[0], device=z.device)
        s_pos = sim[rows, pos_index]
        keep = neg_mask.clone()
        keep[rows, pos_index] = True
        logits = sim.masked_fill(~keep, float("-inf"))
        loss = torch.logsumexp(logits, dim=1) - s_pos
        valid = neg_mask.any(dim=1)
        return loss, valid


def intra_class_loss_terms(z1: Tensor, z2: Tensor, labels: Tensor,
                           temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Eq. 4 for the 2N anchors [z1; z2] (two views of N samples, positives = the other view,
    negatives = the other samples with the same ``labels``, both views). Returns per-anchor
    ``(loss, valid)`` as :func:`tuple_loss_terms`."""
    pos_index, neg_mask = pair_masks(labels)
    return tuple_loss_terms(torch.cat([z1, z2]), pos_index, neg_mask, temperature)


def masked_mean(loss: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``loss`` over ``valid`` anchors; an exact, graph-connected 0 when none is valid
    (no host synchronisation)."""
    v = valid.to(loss.dtype)
    return (loss * v).sum() / v.sum().clamp(min=1.0)


def intra_class_loss(z1: Tensor, z2: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """L_Intra (Eq. 4) averaged over the anchors that have a same-class negative."""
    return masked_mean(*intra_class_loss_terms(z1, z2, labels, temperature))


# --------------------------------------------------------------------------------------------
# Embedding f
# --------------------------------------------------------------------------------------------
class Embedder(nn.Module):
    """f(x) for the chosen ``embedding`` (see the module docstring), float32; normalised except
    for ``"logits"``."""

    def __init__(self, kind: str, model_out: ModelOutput, proj_dim: int = 128):
        super().__init__()
        self.kind = kind
        if kind == "projection":
            d = model_out.pooled.shape[1]
            self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))
        else:
            self.head = None

    def forward(self, out: ModelOutput) -> Tensor:
        if self.kind in ("logits", "logits_normalized"):
            z = out.logits
        elif self.kind == "pooled_normalized":
            z = out.pooled
        else:
            z = self.head(out.pooled)
        with _no_autocast(z.device):
            z = z.float().flatten(1)
            return z if self.kind == "logits" else F.normalize(z, dim=1)


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------
class IntraClassParams(Params):
    lambda_: float = Field(0.02, alias="lambda", ge=0,
                           description="weight λ of L_Intra (paper: 0.01–0.03)")
    embedding: Embedding = Field("pooled_normalized", description=EMBEDDING_HELP)
    temperature: float = Field(1.0, gt=0, description="τ in exp(s/τ); 1 = the paper's Eq. 4")

    _renamed = field_validator("embedding", mode="before")(renamed_embedding)


class IntraClass(TeacherObjective):
    views = ("second",)
    revision = 1  # issue 15: embedding = "logits" no longer means the normalised logits

    def __init__(self, params: IntraClassParams, setup):
        super().__init__()
        self.lam = float(params.lambda_)
        self.temperature = float(params.temperature)
        self.embed = Embedder(params.embedding, setup.model_out)
        self.representation_name = params.embedding
        # Per-epoch statistics, on the device, read only in epoch_stats().
        self.register_buffer("_stat_loss", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_stat_valid", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_stat_anchors", torch.zeros((), dtype=torch.float64), persistent=False)

    def forward(self, out, batch, extra, encode):
        ce = fp32_cross_entropy(out.logits, batch.y)
        z1 = self.embed(out)
        z2 = self.embed(extra["second"])
        loss, valid = intra_class_loss_terms(z1, z2, batch.y, self.temperature)
        intra = masked_mean(loss, valid)
        with torch.no_grad():
            self._stat_loss += (loss.detach() * valid).sum().double()
            self._stat_valid += valid.sum().double()
            self._stat_anchors += valid.numel()
        return {"ce": ce, "intra": self.lam * intra}

    def representation(self, out: ModelOutput) -> Tensor:
        """The f(x) this objective trains (for the teacher diagnostics)."""
        return self.embed(out)

    def epoch_stats(self):
        loss, valid, anchors = torch.stack(
            [self._stat_loss, self._stat_valid, self._stat_anchors]).tolist()
        for b in (self._stat_loss, self._stat_valid, self._stat_anchors):
            b.zero_()
        return {
            "intra_loss": loss / valid if valid else 0.0,  # unweighted mean L_Intra
            "intra_anchor_frac": valid / anchors if anchors else 0.0,  # anchors with a negative
        }


@hookimpl
def kdbench_register_teacher_objectives(register):
    register("intra_class", IntraClass, params=IntraClassParams,
             help="CE + λ·intra-class contrastive loss (Eq. 4–5), positives = second view")
