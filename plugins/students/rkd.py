"""RKD — Park, Kim, Lu & Cho 2019, "Relational knowledge distillation".

On the pooled penultimate vectors s_i (student) and t_i (teacher) of a batch of B samples:

* distance term: ψ_D(x_i, x_j) = ‖x_i − x_j‖₂ / μ, with μ the mean of the distances over the
  valid pairs (off-diagonal, > 0);
  L_D = smooth_L1( ψ_D(s), ψ_D(t) ), averaged over all B² entries (diagonal entries are 0 on
  both sides).
* angle term: ψ_A(x_i, x_j, x_k) = ⟨e_ij, e_kj⟩ with e_ij = (x_i − x_j)/‖x_i − x_j‖ (the cosine of
  the angle at x_j); L_A = smooth_L1( ψ_A(s), ψ_A(t) ), averaged over all B³ triplets.
  Degenerate triplets (i = j or k = j) give a zero vector, so a cosine of 0 on both sides.

    L_RKD = 25 · L_D + 50 · L_A     (returned as terms "rkd_distance" and "rkd_angle")

smooth-L1 has β = 1. Distances are non-squared, sqrt(clamp(‖x_i − x_j‖², eps)) with eps = 1e-12;
teacher relations are computed without gradient. Defaults from the method card
(mdistiller ``RKD`` config): distance weight 25, angle weight 50, eps 1e-12, non-squared,
recipe weight 1.0 (``default_weight``; CE 1.0 is the separate ``ce`` method).

Deviations from the reference (mdistiller / RepDistiller ``RKDLoss``): squared distances are
summed from explicit differences (B×B×D, the size the angle term needs anyway) instead of the
expansion ‖a‖² + ‖b‖² − 2a·b, which in float32 leaves spurious distances of ~1e-3 between
identical samples (counted as "valid" pairs by the reference); the mean over valid pairs
is computed as Σd / #(d > 0) (the same number, without a host sync), and it is clamped below by
eps so that a batch with no valid pair (B = 1, or all samples equal) gives a zero distance term
instead of NaN. The unit vectors of the angle term are exactly zero *with zero gradient* for
coincident samples (``F.normalize`` in the reference has a 1/eps = 1e12 gradient there, which
blows up when two student samples coincide but their teacher features do not). Everything is
computed in float32 with autocast disabled (distances and cosines are not bf16-safe).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kdbench.api import Params, StudentMethod, hookimpl, saveable


class RKDParams(Params):
    distance_weight: float = Field(25.0, ge=0, description="weight of the distance term")
    angle_weight: float = Field(50.0, ge=0, description="weight of the angle term")
    eps: float = Field(1e-12, gt=0, description="clamp of the squared distances")
    squared: bool = Field(False, description="use squared Euclidean distances")


def pairwise_distance(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    d = (e.unsqueeze(1) - e.unsqueeze(0)).pow(2).sum(dim=2).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def normalised_distance(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    d = pairwise_distance(e, squared, eps)
    count = (d > 0).sum().clamp(min=1)
    mean = (d.sum() / count).clamp(min=eps)
    return d / mean


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖ along the last dim; exactly 0, with zero gradient, for zero vectors."""
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, x / n.clamp(min=1e-12), torch.zeros_like(x))


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # diff[j, i] = e_i − e_j
    unit = _unit(diff)
    return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)


def rkd_terms(f_s, f_t, distance_weight=25.0, angle_weight=50.0, squared=False, eps=1e-12):
    """Return (weighted distance term, weighted angle term)."""
    device_type = f_s.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        s = f_s.reshape(f_s.shape[0], -1).float()
        with torch.no_grad():
            t = f_t.reshape(f_t.shape[0], -1).float()
            t_d = normalised_distance(t, squared, eps)
            t_a = triplet_angles(t)
        loss_d = F.smooth_l1_loss(normalised_distance(s, squared, eps), t_d)
        loss_a = F.smooth_l1_loss(triplet_angles(s), t_a)
    return distance_weight * loss_d, angle_weight * loss_a


class RKD(StudentMethod):
    default_weight = 1.0

    def __init__(self, params: RKDParams, setup):
        super().__init__()
        self.distance_weight = params.distance_weight
        self.angle_weight = params.angle_weight
        self.squared = params.squared
        self.eps = params.eps

    def forward(self, student, teacher, batch, extra):
        t = saveable(teacher.pooled)
        d, a = rkd_terms(
            student.pooled, t, self.distance_weight, self.angle_weight, self.squared, self.eps
        )
        return {"rkd_distance": d, "rkd_angle": a}


@hookimpl
def kdbench_register_student_methods(register):
    register(
        "rkd",
        RKD,
        params=RKDParams,
        help="Relational KD on pooled features: distance (25) + angle (50) smooth-L1 terms",
    )
