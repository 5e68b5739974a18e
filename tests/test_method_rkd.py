"""RKD (Park et al. 2019): distance and angle terms vs plain-Python loops, gradients, state."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from kdbench_plugins.students.rkd import RKD, RKDParams
from stand_ins import (TinyNet, assert_gradients_route, batch_of, make_setup, pooled_out, run,
                       setup_from_nets)

torch.set_num_threads(1)


# ------------------------------------------------------------------------ plain-Python reference
def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1.0 else d - 0.5


def ref_rkd(s, t, squared=False):
    """Park et al. Eq. 4-7 with the reference conventions (mean over all B² / B³ entries)."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    b = len(s)

    def dist(e):
        d = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                if i != j:
                    sq = max(float(((e[i] - e[j]) ** 2).sum()), 1e-12)
                    d[i, j] = sq if squared else math.sqrt(sq)
        valid = [d[i, j] for i in range(b) for j in range(b) if i != j and d[i, j] > 0]
        return d / (sum(valid) / len(valid))

    def angles(e):
        out = []
        for j in range(b):  # the vertex
            for i in range(b):
                for k in range(b):
                    u, v = e[i] - e[j], e[k] - e[j]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    out.append(0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv)))
        return out

    ds, dt = dist(s), dist(t)
    loss_d = sum(smooth_l1(ds[i, j], dt[i, j]) for i in range(b) for j in range(b)) / b**2
    a_s, a_t = angles(s), angles(t)
    loss_a = sum(smooth_l1(x, y) for x, y in zip(a_s, a_t)) / b**3
    return 25 * loss_d, 50 * loss_a


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("squared", [False, True])
def test_terms_match_reference(squared):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    t = torch.randn(6, 9, generator=gen, dtype=torch.float64) * 3  # other width, other scale
    s[4] = s[1]  # a duplicated student sample: a zero distance, excluded from the mean
    method = RKD(RKDParams(squared=squared), make_setup(pooled_out(s), pooled_out(t)))
    terms = method(pooled_out(s), pooled_out(t), batch_of(6), {})
    assert set(terms) == {"rkd_distance", "rkd_angle"}
    want_d, want_a = ref_rkd(s.numpy(), t.numpy(), squared)
    assert terms["rkd_distance"].item() == pytest.approx(want_d, rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(want_a, rel=1e-5)
    assert want_d > 0.1 and want_a > 0.1


def test_coincident_student_samples_give_bounded_gradients():
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(5, 4, generator=gen)
    s[3] = s[0]  # the student maps two samples to the same point, the teacher does not
    s.requires_grad_(True)
    t = torch.randn(5, 4, generator=gen)
    method = RKD(RKDParams(), make_setup(pooled_out(s.detach()), pooled_out(t)))
    sum(method(pooled_out(s), pooled_out(t), batch_of(5), {}).values()).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e3


def test_weights_and_scale_invariance():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    setup = make_setup(pooled_out(s), pooled_out(t))
    terms = RKD(RKDParams(), setup)(pooled_out(s), pooled_out(t), batch_of(5), {})
    terms2 = RKD(RKDParams(distance_weight=1, angle_weight=2), setup)(
        pooled_out(s * 10), pooled_out(t), batch_of(5), {}
    )  # distances are mean-normalised, angles scale-free: the raw terms do not change
    want_d = terms["rkd_distance"].item() / 25
    assert terms2["rkd_distance"].item() == pytest.approx(want_d, rel=1e-4)
    assert terms2["rkd_angle"].item() == pytest.approx(terms["rkd_angle"].item() / 25, rel=1e-4)
    # identical relations give zero loss
    zero = RKD(RKDParams(), setup)(pooled_out(t * 3), pooled_out(t), batch_of(5), {})
    assert zero["rkd_distance"].item() < 1e-10 and zero["rkd_angle"].item() < 1e-10
    # a single sample has no valid pair: finite (zero) loss, no NaN
    one = RKD(RKDParams(), setup)(pooled_out(s[:1]), pooled_out(t[:1]), batch_of(1), {})
    assert all(torch.isfinite(v) for v in one.values())


def test_gradients_reach_student_not_teacher():
    torch.manual_seed(0)
    student = TinyNet(4, [6, 8], [1, 2])
    teacher = TinyNet(4, [8, 12], [2, 2])
    method = RKD(RKDParams(), setup_from_nets(student, teacher))
    terms, _, _ = run(method, student, teacher, torch.randn(6, 3, 8, 8))
    sum(terms.values()).backward()
    assert_gradients_route(student, teacher, method)  # pooled does not depend on the classifier
    assert list(method.parameters()) == []


def test_inference_mode_teacher_and_state():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(4, 6, generator=gen, requires_grad=True)
    with torch.inference_mode():
        t = torch.randn(4, 6, generator=gen)
    method = RKD(RKDParams(), make_setup(pooled_out(s.detach()), pooled_out(t.clone())))
    sum(method(pooled_out(s), pooled_out(t), batch_of(4), {}).values()).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    # RKD has no persistent state: an empty state dict survives a save/load round trip
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert len(state) == 0
    fresh = RKD(RKDParams(), make_setup(pooled_out(s.detach()), pooled_out(t.clone())))
    fresh.load_state_dict(state)
