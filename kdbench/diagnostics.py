"""Teacher diagnostics on a labelled set (normally the test set): how rich are its soft labels and
how spread are its classes in embedding space? Generic: works on any KDModel, knows no objective.

For N samples with logits ℓ, labels y and φ(x) = pooled / ‖pooled‖₂ (the normalised penultimate
embedding, as in Sec. 4.1 of the intra-class paper):

* ``top1`` — accuracy in percent (as the engine's ``test_top1``).
* ``entropy`` / ``entropy_T`` — mean entropy, in nats, of softmax(ℓ) and softmax(ℓ / T).
* ``nontarget_mass`` / ``nontarget_mass_T`` — mean 1 − p^y at T = 1 and at T: the probability
  mass the soft label puts on the other classes (the "dark knowledge").
* ``d_intra`` = mean of exp(φ(x)ᵀφ(x')) over ordered same-class pairs x ≠ x';
  ``d_inter`` = the same over ordered pairs of different classes; ``d_intra_over_inter`` their
  ratio (Sec. 4.2, Theorem 1). Note these are *similarities* despite the paper's name
  "distance": a larger d_intra means a tighter class. Exact over all N² pairs, computed by
  chunked matrix products (memory O(chunk · N + N · D)), accumulated in float64.
  (Eq. 11 of the paper's appendix writes the ratio with the two expectations swapped; we follow
  the definitions of Sec. 4.2.)
* ``cos_intra`` / ``cos_inter`` — the same pair means of φ(x)ᵀφ(x') itself (no exp).
* ``temperature`` (the T used) and ``n`` (the number of samples).

The model runs in eval mode under ``torch.no_grad()``; its previous mode is restored. Forward
passes happen in the caller's autocast context, if any; everything after them is float32/64.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def teacher_diagnostics(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                        temperature: float = 4.0, chunk_size: int = 1024) -> dict[str, float]:
    """``batches`` yields (normalised images, labels); they are moved to the model's device."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    logits_l, emb_l, labels_l = [], [], []
    try:
        for x, y in batches:
            out = model(x.to(device))
            logits_l.append(out.logits.float())
            emb_l.append(F.normalize(out.pooled.float().flatten(1), dim=1))
            labels_l.append(y.to(device).long())
    finally:
        model.train(was_training)
    if not labels_l:
        raise ValueError("teacher_diagnostics: no batches")
    logits, emb, y = torch.cat(logits_l), torch.cat(emb_l), torch.cat(labels_l)
    n = y.shape[0]
    with torch.autocast(device_type=device.type, enabled=False):  # full precision from here on
        stats = _soft_label_stats(logits, y, temperature)
        stats.update(_pair_stats(emb, y, chunk_size))
    stats["temperature"] = torch.tensor(float(temperature), dtype=torch.float64, device=device)
    stats["n"] = torch.tensor(float(n), dtype=torch.float64, device=device)
    keys = list(stats)
    values = torch.stack([stats[k].double() for k in keys]).tolist()  # one host read
    return dict(zip(keys, values))


def _soft_label_stats(logits: Tensor, y: Tensor, temperature: float) -> dict[str, Tensor]:
    out = {"top1": 100.0 * (logits.argmax(1) == y).double().mean()}
    for suffix, t in (("", 1.0), ("_T", float(temperature))):
        logp = F.log_softmax(logits.double() / t, dim=1)
        p = logp.exp()
        out["entropy" + suffix] = -(p * logp).sum(1).mean()
        out["nontarget_mass" + suffix] = (1.0 - p.gather(1, y[:, None]).squeeze(1)).mean()
    return out


def _pair_stats(emb: Tensor, y: Tensor, chunk_size: int) -> dict[str, Tensor]:
    """Exact sums of exp(φᵢᵀφⱼ) and φᵢᵀφⱼ over same-class (i ≠ j) and other-class ordered pairs."""
    n = y.shape[0]
    f64 = dict(dtype=torch.float64, device=emb.device)
    same_exp, all_exp, same_cos, all_cos, diag_exp, diag_cos = (torch.zeros((), **f64) for _ in range(6))
    for start in range(0, n, chunk_size):
        rows = emb[start:start + chunk_size]
        sim = rows @ emb.t()  # (r, N)
        same = y[start:start + chunk_size, None] == y[None, :]
        e = sim.exp()
        all_exp += e.sum(dtype=torch.float64)
        all_cos += sim.sum(dtype=torch.float64)
        same_exp += (e * same).sum(dtype=torch.float64)
        same_cos += (sim * same).sum(dtype=torch.float64)
        idx = torch.arange(rows.shape[0], device=emb.device)
        d = sim[idx, start + idx]  # φᵢᵀφᵢ (= 1 up to rounding)
        diag_exp += d.exp().sum(dtype=torch.float64)
        diag_cos += d.sum(dtype=torch.float64)
    class_counts = torch.bincount(y).double()
    n_same = (class_counts * (class_counts - 1)).sum()
    n_other = float(n) * n - (class_counts**2).sum()
    nan = torch.tensor(float("nan"), **f64)
    d_intra = torch.where(n_same > 0, (same_exp - diag_exp) / n_same.clamp(min=1), nan)
    d_inter = torch.where(n_other > 0, (all_exp - same_exp) / n_other.clamp(min=1), nan)
    return {
        "d_intra": d_intra,
        "d_inter": d_inter,
        "d_intra_over_inter": d_intra / d_inter,
        "cos_intra": torch.where(n_same > 0, (same_cos - diag_cos) / n_same.clamp(min=1), nan),
        "cos_inter": torch.where(n_other > 0, (all_cos - same_cos) / n_other.clamp(min=1), nan),
    }
