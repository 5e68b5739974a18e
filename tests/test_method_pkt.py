"""PKT (Passalis & Tefas 2018): cosine-kernel probabilities and their KL vs plain loops and a hand
value, gradients (finite for an all-zero sample), state, errors.

Tolerances: the loss against the float64 plain-loop re-derivation, rel 1e-9 (float64 inputs);
against the hand-computed value (which ignores ε = 1e-7), rel 1e-6.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from kdbench.api import ModelOutput, UserError
from kdbench_plugins.students.pkt import PKT, PKTParams
from stand_ins import (assert_gradients_route, batch_of, make_pair, make_setup, pooled_out, run,
                       setup_from_nets)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ plain reference
def pkt_loops(s, t, eps=1e-7):
    """Passalis & Tefas Eq. 9-10 with the reference's ε placement, plain Python loops."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    b = len(s)

    def probabilities(x):
        unit = []
        for row in x:
            n = math.sqrt(sum(v * v for v in row))
            unit.append([v / (n + eps) for v in row])
        k = [[(sum(a * c for a, c in zip(unit[i], unit[j])) + 1.0) / 2.0 for j in range(b)]
             for i in range(b)]
        return [[k[i][j] / sum(k[i]) for j in range(b)] for i in range(b)]

    p_s, p_t = probabilities(s), probabilities(t)
    return sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps))
               for i in range(b) for j in range(b)) / b**2


# ------------------------------------------------------------------------------ tests
def test_class_attributes():
    assert PKT.default_weight == 30000.0  # run_cifar_distill.sh -b 30000, mdistiller PKT
    assert PKT.needs_teacher and PKT.views == ()
    assert not PKT.teacher_train_mode and not PKT.teacher_logits_only
    assert PKTParams().eps == 1e-7


def test_hand_value():
    # student e1, e2: K = [[1, ½], [½, 1]], P_s = [[⅔, ⅓], [⅓, ⅔]];
    # teacher e1, e1: P_t = ½ everywhere
    # L = ¼ (2·½·log(¾) + 2·½·log(3/2)) = ¼ log(9/8)
    s = pooled_out(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    t = pooled_out(torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    got = PKT(PKTParams(), make_setup(s, t))(s, t, batch_of(2), {})["pkt"].item()
    assert got == pytest.approx(math.log(9 / 8) / 4, rel=1e-6)


@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_loss_matches_loops(eps):
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(7, 5, generator=gen, dtype=torch.float64)
    t = torch.rand(7, 12, generator=gen, dtype=torch.float64) * 4  # other width, other scale
    s[3] = 0.0  # an all-zero student sample: its unit vector is 0 (0 / (0 + ε))
    method = PKT(PKTParams(eps=eps), make_setup(pooled_out(s), pooled_out(t)))
    got = method(pooled_out(s), pooled_out(t), batch_of(7), {})["pkt"].item()
    want = pkt_loops(s.numpy(), t.numpy(), eps)
    assert want > 1e-4
    assert got == pytest.approx(want, rel=1e-9)


def test_identical_directions_give_zero():
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(5, 4, generator=gen)
    s = t * (0.5 + torch.rand(5, 1, generator=gen))  # per-sample positive scales: same cosines
    method = PKT(PKTParams(), make_setup(pooled_out(s), pooled_out(t)))
    assert abs(method(pooled_out(s), pooled_out(t), batch_of(5), {})["pkt"].item()) < 1e-6


def test_zero_sample_gives_finite_gradients():
    gen = torch.Generator().manual_seed(2)
    s = torch.rand(4, 3, generator=gen)
    s[1] = 0.0  # dead pooled features: sqrt'(0) makes the reference's gradient NaN
    s.requires_grad_(True)
    t = torch.rand(4, 6, generator=gen)
    method = PKT(PKTParams(), make_setup(pooled_out(s.detach()), pooled_out(t)))
    method(pooled_out(s), pooled_out(t), batch_of(4), {})["pkt"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_gradients_reach_student_not_teacher_or_classifier():
    student, teacher = make_pair(seed=3, s_chans=(3, 4), t_chans=(5, 6))
    method = PKT(PKTParams(), setup_from_nets(student, teacher))
    terms, _, _ = run(method, student, teacher, torch.randn(6, 3, 8, 8))
    assert set(terms) == {"pkt"}
    terms["pkt"].backward()
    assert_gradients_route(student, teacher, method)  # pooled does not depend on the classifier
    assert list(method.parameters()) == []


def test_inference_mode_teacher_and_empty_state():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(4, 6, generator=gen, requires_grad=True)
    with torch.inference_mode():
        t = torch.randn(4, 6, generator=gen)
    method = PKT(PKTParams(), make_setup(pooled_out(s.detach()), pooled_out(t)))
    method(pooled_out(s), pooled_out(t), batch_of(4), {})["pkt"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    assert len(torch.load(buf, weights_only=True)) == 0  # PKT has no state


def test_errors_name_the_problem():
    good = pooled_out(torch.randn(2, 4))
    with pytest.raises(UserError, match=r"teacher's pooled vector \(B, D\); it has None"):
        PKT(PKTParams(), make_setup(good, ModelOutput(torch.zeros(2, 5), [], [], None)))
    method = PKT(PKTParams(), make_setup(good, good))
    with pytest.raises(UserError, match=r"student batch 2 != teacher batch 3"):
        method(good, pooled_out(torch.randn(3, 4)), batch_of(2), {})
    with pytest.raises(ValueError):
        PKTParams(eps=0)


def test_registers_under_name_pkt():
    from kdbench_plugins.students import pkt

    seen = {}
    pkt.kdbench_register_student_methods(lambda name, factory, **kw: seen.update({name: factory}))
    assert seen == {"pkt": PKT}
