"""DKD (Zhao et al. 2022): TCKD/NCKD against a plain-loop float64 derivation and against the
reference's own formulation (softmax sums, −1000 target mask), values by hand, the warm-up at
given epochs, gradients (student logits only; float64 gradcheck), logit standardisation, bf16.

Tolerances: float32 loss vs float64 loops rel 1e-5 (measured ≤ 2.2e-7); hand values rel 1e-6;
gradcheck in float64 at its defaults (eps 1e-6, atol 1e-5, rtol 1e-3)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.api import Batch, ModelOutput, UserError
from kdbench_plugins.students.dkd import DKD, DKDParams, dkd_terms, warmup_factor
from stand_ins import assert_gradients_route, make_pair, make_setup, setup_from_nets

torch.set_num_threads(1)
RTOL = 1e-5


def out(logits):
    return ModelOutput(logits, [], [], torch.zeros(logits.shape[0], 1))


def make(**kw):
    return DKD(DKDParams(**kw), make_setup(None, None))


def run(method, s, t, y, epoch=100, epochs=200):
    batch = Batch(x=torch.zeros(len(y), 3, 4, 4), y=y, index=torch.arange(len(y)), epoch=epoch,
                  epochs=epochs)
    return method(out(s), out(t), batch, {})


def fixed(b=6, c=7, seed=3, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(b, c, generator=g) * scale, torch.randn(b, c, generator=g) * scale
    return s, t, torch.randint(0, c, (b,), generator=g)


# ------------------------------------------------------------------------------ float64 loops
def np_softmax(v):
    e = [math.exp(x - max(v)) for x in v]
    return [x / sum(e) for x in e]


def np_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def loop_dkd(s, t, y, T):
    """(TCKD, NCKD) from the definitions, one sample at a time, in float64."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    tckd = nckd = 0.0
    for i in range(len(y)):
        ps, pt = np_softmax(list(s[i] / T)), np_softmax(list(t[i] / T))
        k = int(y[i])
        tckd += np_kl([pt[k], 1 - pt[k]], [ps[k], 1 - ps[k]])
        others = [j for j in range(len(ps)) if j != k]
        qs = np_softmax([s[i, j] / T for j in others])
        qt = np_softmax([t[i, j] / T for j in others])
        nckd += np_kl(qt, qs)
    b = len(y)
    return T * T * tckd / b, T * T * nckd / b


def np_reference_formula(s, t, y, T):
    """The reference's formulation in numpy: summed softmax masses, log of them, and the
    non-target softmax by subtracting 1000 from the target logit."""
    s, t = np.asarray(s, dtype=np.float64) / T, np.asarray(t, dtype=np.float64) / T
    b, c = s.shape
    gt = np.zeros((b, c), dtype=bool)
    gt[np.arange(b), np.asarray(y)] = True

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    ps, pt = softmax(s), softmax(t)
    bs = np.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = np.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = (bt * (np.log(bt) - np.log(bs))).sum() * T * T / b
    qs, qt = softmax(s - 1000.0 * gt), softmax(t - 1000.0 * gt)
    with np.errstate(divide="ignore", invalid="ignore"):
        nckd = np.where(qt > 0, qt * (np.log(qt) - np.log(qs)), 0.0).sum() * T * T / b
    return tckd, nckd


# ------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("b,c,T,seed", [(6, 7, 4.0, 3), (5, 10, 1.0, 1), (8, 3, 2.5, 2),
                                        (3, 2, 4.0, 0)])
def test_terms_match_the_loop_and_the_reference_formulation(b, c, T, seed):
    s, t, y = fixed(b, c, seed)
    tckd, nckd = dkd_terms(s, t, y, T)
    ref_t, ref_n = loop_dkd(s, t, y, T)
    assert tckd.item() == pytest.approx(ref_t, rel=RTOL)
    assert nckd.item() == pytest.approx(ref_n, rel=RTOL, abs=1e-7)  # c = 2: NCKD = 0
    alt_t, alt_n = np_reference_formula(s, t, y, T)
    assert (alt_t, alt_n) == pytest.approx((ref_t, ref_n), rel=1e-9, abs=1e-12)


def test_values_by_hand():
    """3 classes, target 0, uniform student: b^s = (1/3, 2/3), p̂^s = (1/2, 1/2).
    Teacher z/T = (ln 2, 0, 0): p^t = (1/2, 1/4, 1/4), b^t = (1/2, 1/2), p̂^t = p̂^s:
    TCKD = T²·(½ ln(3/2) + ½ ln(3/4)) = T²·½ ln(9/8), NCKD = 0.
    Teacher z/T = (0, ln 3, 0): p^t = (1/5, 3/5, 1/5), b^t = (1/5, 4/5), p̂^t = (3/4, 1/4):
    TCKD = T²·(⅕ ln(3/5) + ⅘ ln(6/5)), NCKD = T²·(¾ ln(3/2) + ¼ ln(1/2))."""
    T = 2.0
    s = torch.zeros(2, 3)
    t = torch.tensor([[T * math.log(2), 0, 0], [0, T * math.log(3), 0]])
    y = torch.zeros(2, dtype=torch.long)
    tckd_1 = T * T * 0.5 * math.log(9 / 8)
    tckd_2 = T * T * (0.2 * math.log(0.6) + 0.8 * math.log(1.2))
    nckd_2 = T * T * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    tckd, nckd = dkd_terms(s, t, y, T)
    assert tckd.item() == pytest.approx((tckd_1 + tckd_2) / 2, rel=1e-6)
    assert nckd.item() == pytest.approx(nckd_2 / 2, rel=1e-6)
    terms = run(make(temperature=T, alpha=1.0, beta=8.0), s, t, y)
    assert terms["dkd_tckd"].item() == pytest.approx((tckd_1 + tckd_2) / 2, rel=1e-6)
    assert terms["dkd_nckd"].item() == pytest.approx(8 * nckd_2 / 2, rel=1e-6)


def test_alpha_beta_weight_their_terms():
    s, t, y = fixed()
    tckd, nckd = dkd_terms(s, t, y, 4.0)
    terms = run(make(alpha=0.5, beta=6.0), s, t, y)
    assert terms["dkd_tckd"].item() == pytest.approx(0.5 * tckd.item(), rel=1e-6)
    assert terms["dkd_nckd"].item() == pytest.approx(6.0 * nckd.item(), rel=1e-6)


def test_identical_logits_give_zero():
    s, _, y = fixed()
    terms = run(make(), s, s.clone(), y)
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in terms.values())


def test_confident_target_stays_finite():
    """p_target = 1 in float32 (gap 200 at T = 4): the reference's log(1 − p) would be −inf;
    here log(1 − p_target) is the logsumexp of the non-target log-probabilities."""
    s = torch.tensor([[800.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
    t = torch.tensor([[5.0, 1.0, 0.0], [1.0, 0.0, 3.0]])
    y = torch.tensor([0, 1])
    tckd, nckd = dkd_terms(s.requires_grad_(), t, y, 4.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd)
    (tckd + nckd).backward()
    assert torch.isfinite(s.grad).all()


# ------------------------------------------------------------------------------ warm-up
@pytest.mark.parametrize("epoch,expected", [(0, 1 / 20), (1, 2 / 20), (9, 10 / 20), (18, 19 / 20),
                                            (19, 1.0), (20, 1.0), (239, 1.0)])
def test_warmup_is_mdistillers_on_one_based_epochs(epoch, expected):
    """mdistiller: min(epoch / 20, 1) with epochs 1, 2, ...; kdbench's epoch e is its e + 1."""
    assert warmup_factor(epoch, 20) == pytest.approx(expected, rel=1e-12)
    s, t, y = fixed()
    full = run(make(), s, t, y, epoch=100)
    got = run(make(), s, t, y, epoch=epoch)
    for k in full:
        assert got[k].item() == pytest.approx(expected * full[k].item(), rel=1e-6), k


def test_no_warmup():
    assert warmup_factor(0, 0) == 1.0
    s, t, y = fixed()
    a, b = run(make(warmup_epochs=0), s, t, y, epoch=0), run(make(), s, t, y, epoch=50)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ gradients
def test_gradcheck_float64():
    s, t, y = fixed(4, 5, 7)
    s = s.double().requires_grad_()
    t = t.double()
    assert torch.autograd.gradcheck(lambda z: torch.stack(dkd_terms(z, t, y, 4.0)), (s,))


def test_gradients_reach_only_the_student():
    student, teacher = make_pair(0)
    setup = setup_from_nets(student, teacher)
    method = DKD(DKDParams(), setup)
    assert len(list(method.parameters())) == 0
    x = torch.randn(6, 3, 8, 8)
    student.train()
    s_out = student(x)
    with torch.no_grad():
        t_out = teacher(x)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    batch = Batch(x=x, y=y, index=torch.arange(6), epoch=0, epochs=2)
    terms = method(s_out, t_out, batch, {})
    sum(terms.values()).backward()
    assert_gradients_route(student, teacher, untouched=())  # classifier included: logits only


def test_teacher_logits_get_no_gradient_even_if_they_require_it():
    s, t, y = fixed()
    t = t.requires_grad_()
    sum(run(make(), s.requires_grad_(), t, y).values()).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ options, contract
def test_logit_standardisation_matches_the_loop_on_z_scored_logits():
    s, t, y = fixed(6, 7, 5)
    method = make(logit_standardize=True)
    assert method.temperature == 2.0 and method.ls_factor == 9.0  # the LS reference's DKD
    terms = run(method, s, t, y)

    def z(a):
        a = np.asarray(a, dtype=np.float64)
        return (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-7)

    ref_t, ref_n = loop_dkd(z(s), z(t), y, 2.0)
    assert terms["dkd_tckd"].item() == pytest.approx(9.0 * 1.0 * ref_t, rel=RTOL)
    assert terms["dkd_nckd"].item() == pytest.approx(9.0 * 8.0 * ref_n, rel=RTOL)
    # the option at its default changes nothing
    a, b = run(make(), s, t, y), run(make(logit_standardize=False), s, t, y)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_inputs_are_upcast():
    s, t, y = fixed()
    ref = run(make(), s.bfloat16().float(), t.bfloat16().float(), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(make(), s.bfloat16(), t.bfloat16(), y)
    for k in ref:
        assert got[k].dtype == torch.float32
        assert got[k].item() == pytest.approx(ref[k].item(), rel=2e-6), k


def test_params_defaults_and_errors():
    p = DKDParams()
    assert (p.alpha, p.beta, p.temperature, p.warmup_epochs) == (1.0, 8.0, 4.0, 20)
    assert DKD.default_weight == 1.0 and DKD.teacher_logits_only and DKD.views == ()
    for bad in ({"temperature": 0}, {"beta": -1}, {"warmup_epochs": -1}, {"bogus": 1}):
        with pytest.raises(Exception):
            DKDParams(**bad)
    with pytest.raises(UserError, match="classes"):
        dkd_terms(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), 4.0)


def test_registered_as_dkd():
    from kdbench.registry import load_registry

    plugin = load_registry().find("student_method", "dkd")
    assert plugin.factory is DKD and plugin.params is DKDParams
