"""DIST (Huang et al. 2022): inter- and intra-class relations against plain-loop float64 Pearson
correlations, values by hand (perfect anti-correlation; a batch of one), gradients (student
logits only; float64 gradcheck), logit standardisation, bf16.

Tolerances: float32 loss vs float64 loops rel 1e-5 (measured ≤ 6e-8); hand values rel 1e-6
(the ε = 1e-8 of the correlation's denominator shifts them by < 1e-7 relative); gradcheck in
float64 at its defaults."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.api import Batch, ModelOutput, UserError
from kdbench_plugins.students.dist import DIST, DISTParams, dist_terms
from stand_ins import assert_gradients_route, make_pair, make_setup, setup_from_nets

torch.set_num_threads(1)
RTOL = 1e-5


def out(logits):
    return ModelOutput(logits, [], [], torch.zeros(logits.shape[0], 1))


def make(**kw):
    return DIST(DISTParams(**kw), make_setup(None, None))


def run(method, s, t):
    y = torch.zeros(len(s), dtype=torch.long)
    batch = Batch(x=torch.zeros(len(s), 3, 4, 4), y=y, index=torch.arange(len(s)))
    return method(out(s), out(t), batch, {})


def fixed(b=6, c=7, seed=1, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * scale, torch.randn(b, c, generator=g) * scale


# ------------------------------------------------------------------------------ float64 loops
def loop_pearson(u, v, eps=1e-8):
    n = len(u)
    mu, mv = sum(u) / n, sum(v) / n
    num = sum((a - mu) * (b - mv) for a, b in zip(u, v))
    nu = math.sqrt(sum((a - mu) ** 2 for a in u))
    nv = math.sqrt(sum((b - mv) ** 2 for b in v))
    return num / (nu * nv + eps)


def loop_softmax(row, T):
    e = [math.exp((x - max(row)) / T) for x in row]
    return [x / sum(e) for x in e]


def loop_dist(s, t, T):
    """(inter, intra) with their τ², from the definitions, in float64."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    ys = [loop_softmax(list(r), T) for r in s]
    yt = [loop_softmax(list(r), T) for r in t]
    b, c = s.shape
    inter = 1 - sum(loop_pearson(ys[i], yt[i]) for i in range(b)) / b
    intra = 1 - sum(loop_pearson([ys[i][k] for i in range(b)], [yt[i][k] for i in range(b)])
                    for k in range(c)) / c
    return T * T * inter, T * T * intra


# ------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("b,c,T,seed", [(6, 7, 4.0, 1), (5, 10, 1.0, 2), (16, 4, 2.0, 3),
                                        (2, 3, 4.0, 4)])
def test_terms_match_the_loop(b, c, T, seed):
    s, t = fixed(b, c, seed)
    inter, intra = dist_terms(s, t, T)
    ref_inter, ref_intra = loop_dist(s, t, T)
    assert inter.item() == pytest.approx(ref_inter, rel=RTOL)
    assert intra.item() == pytest.approx(ref_intra, rel=RTOL)


def test_method_weights_beta_gamma():
    s, t = fixed()
    inter, intra = dist_terms(s, t, 4.0)
    terms = run(make(beta=0.5, gamma=3.0), s, t)
    assert set(terms) == {"dist_inter", "dist_intra"}
    assert terms["dist_inter"].item() == pytest.approx(0.5 * inter.item(), rel=1e-6)
    assert terms["dist_intra"].item() == pytest.approx(3.0 * intra.item(), rel=1e-6)


def test_values_by_hand_anticorrelated():
    """Two classes, two samples, student leaning the opposite way of the teacher on each sample
    and each class: every correlation is −1, so inter = intra = τ²·(1 − (−1)) = 2τ² = 32."""
    t = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    s = torch.tensor([[0.0, 3.0], [3.0, 0.0]])
    inter, intra = dist_terms(s, t, 4.0)
    assert inter.item() == pytest.approx(32.0, rel=1e-6)
    assert intra.item() == pytest.approx(32.0, rel=1e-6)


def test_identical_logits_give_zero():
    s, _ = fixed()
    inter, intra = dist_terms(s, s.clone(), 4.0)
    assert inter.item() == pytest.approx(0.0, abs=1e-5)
    assert intra.item() == pytest.approx(0.0, abs=1e-5)


def test_invariant_to_teacher_shift_but_not_to_a_different_teacher():
    """Y depends on z only up to a per-row shift (softmax), so shifting the teacher's rows
    changes nothing."""
    s, t = fixed()
    a = dist_terms(s, t, 4.0)
    b = dist_terms(s, t + torch.arange(6.0)[:, None] * 5, 4.0)
    assert all(x.item() == pytest.approx(y.item(), rel=1e-5) for x, y in zip(a, b))


def test_batch_of_one():
    """One sample: every class column is constant, ρ = 0/ε = 0, intra = τ² exactly, and it
    gives no gradient; inter is the one correlation."""
    s, t = fixed(1, 5, 6)
    s = s.requires_grad_()
    inter, intra = dist_terms(s, t, 4.0)
    assert intra.item() == pytest.approx(16.0, rel=1e-7)
    assert inter.item() == pytest.approx(loop_dist(s.detach(), t, 4.0)[0], rel=RTOL)
    (g,) = torch.autograd.grad(intra, s, retain_graph=True)
    assert torch.count_nonzero(g) == 0
    (g,) = torch.autograd.grad(inter, s)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ------------------------------------------------------------------------------ gradients
def test_gradcheck_float64():
    s, t = fixed(4, 5, 7)
    s = s.double().requires_grad_()
    t = t.double()
    assert torch.autograd.gradcheck(lambda z: torch.stack(dist_terms(z, t, 4.0)), (s,))


def test_gradients_reach_only_the_student():
    student, teacher = make_pair(0)
    method = DIST(DISTParams(), setup_from_nets(student, teacher))
    assert len(list(method.parameters())) == 0
    x = torch.randn(6, 3, 8, 8)
    student.train()
    s_out = student(x)
    with torch.no_grad():
        t_out = teacher(x)
    batch = Batch(x=x, y=torch.zeros(6, dtype=torch.long), index=torch.arange(6))
    sum(method(s_out, t_out, batch, {}).values()).backward()
    assert_gradients_route(student, teacher, untouched=())


def test_teacher_logits_get_no_gradient_even_if_they_require_it():
    s, t = fixed()
    s, t = s.requires_grad_(), t.requires_grad_()
    sum(run(make(), s, t).values()).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ options, contract
def test_logit_standardisation():
    """No LS reference for DIST: the option z-scores both logits, τ stays 4, ls_scale 1."""
    s, t = fixed(6, 7, 8)
    method = make(logit_standardize=True)
    assert method.temperature == 4.0 and method.ls_factor == 1.0
    terms = run(method, s, t)

    def z(a):
        a = np.asarray(a, dtype=np.float64)
        return (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-7)

    ref_inter, ref_intra = loop_dist(z(s), z(t), 4.0)
    assert terms["dist_inter"].item() == pytest.approx(ref_inter, rel=RTOL)
    assert terms["dist_intra"].item() == pytest.approx(ref_intra, rel=RTOL)
    scaled = run(make(logit_standardize=True, ls_scale=3.0), s, t)
    assert scaled["dist_inter"].item() == pytest.approx(3 * ref_inter, rel=RTOL)


def test_bf16_autocast_inputs_are_upcast():
    s, t = fixed()
    ref = run(make(), s.bfloat16().float(), t.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(make(), s.bfloat16(), t.bfloat16())
    for k in ref:
        assert got[k].dtype == torch.float32
        assert got[k].item() == pytest.approx(ref[k].item(), rel=2e-6), k


def test_params_defaults_and_errors():
    p = DISTParams()
    assert (p.beta, p.gamma, p.temperature) == (1.0, 1.0, 4.0)
    assert DIST.default_weight == 2.0 and DIST.teacher_logits_only and DIST.views == ()
    for bad in ({"temperature": 0}, {"beta": -1}, {"bogus": 1}):
        with pytest.raises(Exception):
            DISTParams(**bad)
    with pytest.raises(UserError, match="classes"):
        dist_terms(torch.zeros(3, 1), torch.zeros(3, 1), 4.0)


def test_registered_as_dist():
    from kdbench.registry import load_registry

    plugin = load_registry().find("student_method", "dist")
    assert plugin.factory is DIST and plugin.params is DISTParams
