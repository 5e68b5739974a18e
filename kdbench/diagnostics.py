"""Teacher diagnostics on a labelled set (normally the test set): how rich are its soft labels,
how spread are its classes in embedding space, and Section 4's losses and Theorem 1 of the
intra-class paper measured on a real teacher. Generic: works on any KDModel and knows no
objective; the caller may pass the representation an objective trained.

For N samples with logits ℓ and labels y:

* ``top1`` — accuracy in percent (as the engine's ``test_top1``).
* ``entropy`` / ``entropy_T`` — mean entropy, in nats, of softmax(ℓ) and softmax(ℓ / T).
* ``nontarget_mass`` / ``nontarget_mass_T`` — mean 1 − p^y at T = 1 and at T: the probability
  mass the soft label puts on the other classes (the "dark knowledge").
* ``temperature`` (the T used) and ``n`` (the number of samples).

Pair statistics of a representation φ, with s(x, x') = φ(x)ᵀφ(x') (Sec. 4): at the top level for
φ = pooled / ‖pooled‖₂ (the normalised penultimate feature of Sec. 4.1; s ∈ [0, 1] for the zoo's
post-ReLU features), and under ``"trained"`` for the representation the objective trained (e.g.
the unnormalised logits, s ∈ ℝ), with its name under ``"trained"["embedding"]``:

* ``d_intra`` = mean of exp(s(x, x')) over ordered same-class pairs x ≠ x'; ``d_inter`` = the
  same over ordered pairs of different classes; ``d_intra_over_inter`` their ratio (Sec. 4.2).
  These are *similarities* despite the paper's name "distance": a larger d_intra means a
  tighter class. (Eq. 11 of the appendix writes the ratio with the two expectations swapped;
  we follow the definitions of Sec. 4.2.) ``log_d_intra`` / ``log_d_inter`` /
  ``log_d_intra_over_inter``: the same in log space, finite where exp(s) overflows (unnormalised
  logits).
* ``cos_intra`` / ``cos_inter`` — the same pair means of s itself (no exp).
* ``L_intra`` / ``L_inter`` — Eq. 8's two losses: the mean over anchors x of
  −log e^{s⁺} / (e^{s⁺} + Σ_k e^{s(x, x_k⁻)}), with the negatives every other sample of x's class
  (L_intra, m = n_c − 1 of them) or every sample of another class (L_inter, n = N − n_c), and
  the positive x⁺ the horizontally flipped image (deterministic; training views are random
  crops + flips); ``s_pos`` = the mean s⁺. ``L_intra_over_inter`` is Theorem 2's ratio.
* Theorem 1: ``theorem1_K`` = mean n/m over anchors, ``theorem1_rhs`` = K·e^{L_intra}/e^{L_inter}
  (the theorem's right-hand side, to compare with ``d_intra_over_inter``; the theorem holds as
  n, m → ∞), ``theorem1_rhs_eq12`` = K·(e^{L_intra} − 1)/(e^{L_inter} − 1) (Eq. 12, before the
  1s are dropped; Eq. 12 is exact for one anchor, here it is taken at the mean losses),
  ``log_theorem1_rhs`` = log K + L_intra − L_inter.

Exact over all N² pairs, by chunked matrix products (memory O(chunk · N + N · D)); the
similarities are float32 matrix products, everything after them float64. The model runs in eval
mode under ``torch.no_grad()``; its previous mode is restored. Forward passes happen in the
caller's autocast context, if any.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.api import ModelOutput


def normalized_pooled(out: ModelOutput) -> Tensor:
    """Sec. 4.1's φ: the pooled penultimate feature, L2-normalised, float32."""
    return F.normalize(out.pooled.float().flatten(1), dim=1)


@torch.no_grad()
def teacher_diagnostics(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                        temperature: float = 4.0, chunk_size: int = 1024,
                        representation: Callable[[ModelOutput], Tensor] | None = None,
                        representation_name: str | None = None) -> dict:
    """``batches`` yields (normalised images, labels); they are moved to the model's device.
    ``representation``: the objective's f(x) (e.g. ``objective.representation``); its pair
    statistics go under ``"trained"``."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    reps = {"pooled": normalized_pooled}
    if representation is not None:
        reps["trained"] = representation
    logits_l, labels_l = [], []
    emb = {k: ([], []) for k in reps}  # (anchors, positives)
    try:
        for x, y in batches:
            x = x.to(device)
            out, pos = model(x), model(x.flip(-1))
            logits_l.append(out.logits.float())
            labels_l.append(y.to(device).long())
            for k, f in reps.items():
                emb[k][0].append(f(out).float().flatten(1))
                emb[k][1].append(f(pos).float().flatten(1))
    finally:
        model.train(was_training)
    if not labels_l:
        raise ValueError("teacher_diagnostics: no batches")
    logits, y = torch.cat(logits_l), torch.cat(labels_l)
    n = y.shape[0]
    with torch.autocast(device_type=device.type, enabled=False):  # full precision from here on
        stats = _soft_label_stats(logits, y, temperature)
        pair = {k: pair_stats(torch.cat(a), torch.cat(p), y, chunk_size) for k, (a, p) in emb.items()}
    stats.update(pair["pooled"])
    stats["temperature"] = torch.tensor(float(temperature), dtype=torch.float64, device=device)
    stats["n"] = torch.tensor(float(n), dtype=torch.float64, device=device)
    keys = list(stats)
    trained = list(pair.get("trained", {}).items())
    values = torch.stack([stats[k].double() for k in keys] + [v.double() for _, v in trained]).tolist()
    result = dict(zip(keys, values[:len(keys)]))  # one host read for everything
    if representation is not None:
        result["trained"] = {"embedding": representation_name or "trained",
                             **dict(zip([k for k, _ in trained], values[len(keys):]))}
    return result


def _soft_label_stats(logits: Tensor, y: Tensor, temperature: float) -> dict[str, Tensor]:
    out = {"top1": 100.0 * (logits.argmax(1) == y).double().mean()}
    for suffix, t in (("", 1.0), ("_T", float(temperature))):
        logp = F.log_softmax(logits.double() / t, dim=1)
        p = logp.exp()
        out["entropy" + suffix] = -(p * logp).sum(1).mean()
        out["nontarget_mass" + suffix] = (1.0 - p.gather(1, y[:, None]).squeeze(1)).mean()
    return out


def pair_stats(emb: Tensor, pos: Tensor, y: Tensor, chunk_size: int = 1024) -> dict[str, Tensor]:
    """Section 4's pair statistics (see the module docstring) of anchors ``emb`` (N, D) with
    positives ``pos`` (N, D) and labels ``y`` (N,); exact over all ordered pairs, in chunks."""
    n = y.shape[0]
    f64 = dict(dtype=torch.float64, device=emb.device)
    neg_inf = torch.tensor(float("-inf"), **f64)
    lse_same, lse_other, l_intra, l_inter = [], [], [], []
    same_cos, other_cos, s_pos_sum = (torch.zeros((), **f64) for _ in range(3))
    for start in range(0, n, chunk_size):
        rows = emb[start:start + chunk_size]
        r = rows.shape[0]
        sim = (rows @ emb.t()).double()  # (r, N)
        same = y[start:start + r, None] == y[None, :]
        other = ~same
        same[torch.arange(r, device=emb.device), start + torch.arange(r, device=emb.device)] = False
        row_same = torch.where(same, sim, neg_inf).logsumexp(1)  # log Σ_same e^s per anchor
        row_other = torch.where(other, sim, neg_inf).logsumexp(1)
        same_cos += (sim * same).sum()
        other_cos += (sim * other).sum()
        s_pos = (rows.double() * pos[start:start + r].double()).sum(1)
        lse_same.append(row_same)
        lse_other.append(row_other)
        # −log e^{s⁺} / (e^{s⁺} + Σ e^{s⁻}) = log(e^{s⁺} + Σ e^{s⁻}) − s⁺ (−inf sums: no negatives)
        l_intra.append(torch.logaddexp(s_pos, row_same) - s_pos)
        l_inter.append(torch.logaddexp(s_pos, row_other) - s_pos)
        s_pos_sum += s_pos.sum()
    lse_same, lse_other = torch.cat(lse_same), torch.cat(lse_other)
    l_intra, l_inter = torch.cat(l_intra), torch.cat(l_inter)
    counts = torch.bincount(y).double()
    m_i = counts[y] - 1  # same-class negatives per anchor
    n_i = float(n) - counts[y]  # other-class negatives per anchor
    n_same, n_other = m_i.sum(), n_i.sum()
    nan = torch.tensor(float("nan"), **f64)
    log_d_intra = torch.where(n_same > 0, lse_same.logsumexp(0) - n_same.clamp(min=1).log(), nan)
    log_d_inter = torch.where(n_other > 0, lse_other.logsumexp(0) - n_other.clamp(min=1).log(), nan)
    has_m, has_n = m_i > 0, n_i > 0
    L_intra = torch.where(has_m.any(), (l_intra * has_m).sum() / has_m.sum().clamp(min=1), nan)
    L_inter = torch.where(has_n.any(), (l_inter * has_n).sum() / has_n.sum().clamp(min=1), nan)
    both = has_m & has_n
    K = torch.where(both.any(), (n_i / m_i.clamp(min=1) * both).sum() / both.sum().clamp(min=1), nan)
    log_rhs = K.log() + L_intra - L_inter
    return {
        "d_intra": log_d_intra.exp(),
        "d_inter": log_d_inter.exp(),
        "d_intra_over_inter": (log_d_intra - log_d_inter).exp(),
        "log_d_intra": log_d_intra,
        "log_d_inter": log_d_inter,
        "log_d_intra_over_inter": log_d_intra - log_d_inter,
        "cos_intra": torch.where(n_same > 0, same_cos / n_same.clamp(min=1), nan),
        "cos_inter": torch.where(n_other > 0, other_cos / n_other.clamp(min=1), nan),
        "s_pos": s_pos_sum / n,
        "L_intra": L_intra,
        "L_inter": L_inter,
        "L_intra_over_inter": L_intra / L_inter,
        "theorem1_K": K,
        "theorem1_rhs": log_rhs.exp(),
        "theorem1_rhs_eq12": (K.log() + _log_expm1(L_intra) - _log_expm1(L_inter)).exp(),
        "log_theorem1_rhs": log_rhs,
    }


def _log_expm1(v: Tensor) -> Tensor:
    """log(e^v − 1) for v > 0, without overflow for large v."""
    return v + torch.log(-torch.expm1(-v))
