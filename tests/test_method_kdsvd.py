"""KD-SVD (Lee et al. 2018, RepDistiller's code): the loss vs a numpy per-sample re-derivation and
a hand value, teacher sign convention, the SVD gradient (equal to autograd's where that is finite,
finite where it is NaN), stage pairing, gradients, state, errors.

Tolerances: the loss against the float64 numpy re-derivation, rel 1e-8 (two LAPACK SVDs of the
same float64 matrices); against the hand-computed value, rel 1e-12; the custom SVD gradient
against autograd through ``torch.linalg.svd`` (distinct singular values), rel 1e-8 (float64); the
gradient with dead channels against a central finite difference (h = 1e-6, float64), rel 1e-5.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.api import ModelOutput, UserError
from kdbench_plugins.students.kdsvd import KDSVD, KDSVDParams, TopRightSingular, kdsvd_loss
from stand_ins import assert_gradients_route, batch_of, make_pair, make_setup, run, setup_from_nets

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ numpy reference
def outputs(maps):
    return ModelOutput(torch.zeros(maps[0].shape[0], 5), list(maps), list(maps),
                       maps[-1].mean((2, 3)))


def singular_np(f, n):
    """One sample (C, H, W): first n singular values (normalised as a vector) and right singular
    vectors (unit columns) of its (H·W × C) matrix."""
    c = f.shape[0]
    x = f.reshape(c, -1).T
    _, s, vh = np.linalg.svd(x, full_matrices=False)
    s, v = s[:n], vh.T[:, :n]
    return s / max(np.linalg.norm(s), 1e-12), v / np.maximum(np.linalg.norm(v, axis=0), 1e-12)


def positive_sum(stage, v):
    return v * np.where(v.sum(0) < 0, -1.0, 1.0)


def kdsvd_np(s_maps, t_maps, k=1, teacher_sign=positive_sum):
    """Per sample and stage: teacher vectors signed by ``teacher_sign``, student vectors picked
    by the largest |cosine| and signed to agree, both scaled by the teacher's σ̂; the squared
    differences of the exp(−Δ²/8) kernels between consecutive stages, summed, over B."""
    s_maps, t_maps = s_maps[1:], t_maps[1:]
    n = min(len(s_maps), len(t_maps))
    s_maps, t_maps = s_maps[-n:], t_maps[-n:]
    batch = s_maps[0].shape[0]
    total = 0.0
    for b in range(batch):
        prev = None
        for stage, (fs, ft) in enumerate(zip(s_maps, t_maps)):
            sig_t, v_t = singular_np(ft[b], k)
            v_t = teacher_sign(stage, v_t)
            _, v_s = singular_np(fs[b], k + 3)
            d_s = np.zeros_like(v_t)
            for j in range(k):
                cos = v_s.T @ v_t[:, j]
                m = int(np.argmax(np.abs(cos)))
                d_s[:, j] = np.sign(cos[m]) * v_s[:, m] * sig_t[j]
            d_t = v_t * sig_t
            if prev is not None:
                p_s, p_t = prev
                for c in range(d_s.shape[0]):
                    for c2 in range(p_s.shape[0]):
                        for j in range(k):
                            r_s = math.exp(-((d_s[c, j] - p_s[c2, j]) ** 2) / 8)
                            r_t = math.exp(-((d_t[c, j] - p_t[c2, j]) ** 2) / 8)
                            total += (r_s - r_t) ** 2
            prev = (d_s, d_t)
    return total / batch


def rand_maps(gen, shapes):
    return [torch.rand(*s, generator=gen, dtype=torch.float64) for s in shapes]


def plain_autograd_loss(s_maps, t_maps, k=1):
    """The same loss with autograd straight through torch.linalg.svd (as the reference does)."""
    total = 0.0
    prev = None
    for fs, ft in zip(s_maps, t_maps):
        def vectors(f, n):
            b, c = f.shape[:2]
            _, s, vh = torch.linalg.svd(f.reshape(b, c, -1).transpose(1, 2), full_matrices=False)
            return F.normalize(s[:, :n], dim=1), F.normalize(vh.transpose(1, 2)[..., :n], dim=1)
        with torch.no_grad():
            sig_t, v_t = vectors(ft, k)
            v_t = torch.where(v_t.sum(1, keepdim=True) < 0, -v_t, v_t)
        _, v_s = vectors(fs, k + 3)
        cos = (v_s.transpose(1, 2) @ v_t).detach()
        pick = F.one_hot(cos.abs().argmax(1), v_s.shape[-1]).transpose(1, 2).to(cos) * cos.sign()
        d_s, d_t = (v_s @ pick) * sig_t[:, None], v_t * sig_t[:, None]
        if prev is not None:
            r_s = torch.exp(-(d_s[:, :, None] - prev[0][:, None]).pow(2) / 8)
            r_t = torch.exp(-(d_t[:, :, None] - prev[1][:, None]).pow(2) / 8)
            total = total + (r_s - r_t).pow(2).sum()
        prev = (d_s, d_t)
    return total / s_maps[0].shape[0]


# ------------------------------------------------------------------------------ tests
def test_class_attributes():
    assert KDSVD.default_weight == 1.0  # mdistiller KDSVD.LOSS.FEAT_WEIGHT (RepDistiller: none)
    assert KDSVD.needs_teacher and KDSVD.views == ()
    assert not KDSVD.teacher_train_mode and not KDSVD.teacher_logits_only
    assert KDSVDParams().k == 1


def test_hand_value():
    # (H·W × C) matrices X; maps are Xᵀ laid out as (1, C, 1, H·W).
    # teacher: X1 = diag(2, 1) -> v = e1;  X2 = [[0, 3], [1, 0]] -> v = e2   (σ̂ = 1 for k = 1)
    # student: X1 = diag(1, 2) -> vectors e2, e1: e1 is picked;
    #          X2 = [[1, 2], [0, 0]] -> vectors (1, 2)/√5 (σ = √5) and (2, −1)/√5 (σ = 0):
    #          the first is picked (|cos| 2/√5 > 1/√5), with sign +.
    def maps(*xs):
        return [torch.tensor(np.array(x, dtype=np.float64).T[None, :, None, :]) for x in xs]

    t_maps = maps([[1, 1], [1, 1]], [[2, 0], [0, 1]], [[0, 3], [1, 0]])
    s_maps = maps([[1, 1], [1, 1]], [[1, 0], [0, 2]], [[1, 2], [0, 0]])
    r5 = math.sqrt(5)
    want = ((math.exp(-((1 / r5 - 1) ** 2) / 8) - math.exp(-1 / 8)) ** 2   # c=0, c'=0
            + (math.exp(-0.2 / 8) - 1) ** 2                                # c=0, c'=1
            + (math.exp(-((2 / r5 - 1) ** 2) / 8) - 1) ** 2                # c=1, c'=0
            + (math.exp(-0.8 / 8) - math.exp(-1 / 8)) ** 2)                # c=1, c'=1
    s, t = outputs(s_maps), outputs(t_maps)
    got = KDSVD(KDSVDParams(), make_setup(s, t))(s, t, batch_of(1), {})["kdsvd"].item()
    assert got == pytest.approx(want, rel=1e-12)
    assert kdsvd_np([m.numpy() for m in s_maps], [m.numpy() for m in t_maps]) == pytest.approx(
        want, rel=1e-12)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("s_sizes,t_sizes", [
    ([(4, 4), (2, 2), (2, 3)], [(4, 4), (2, 2), (2, 3)]),  # tall, wide, non-square maps
    ([(2, 2), (2, 2), (1, 2)], [(4, 4), (4, 4), (2, 2)]),  # teacher maps larger (no pooling needed)
])
def test_loss_matches_numpy(k, s_sizes, t_sizes):
    gen = torch.Generator().manual_seed(k)
    chans = [4, 6, 5]
    s_maps = rand_maps(gen, [(3, 2, 8, 8)] + [(3, c, h, w) for c, (h, w) in zip(chans, s_sizes)])
    t_maps = rand_maps(gen, [(3, 2, 8, 8)] + [(3, c, h, w) for c, (h, w) in zip(chans, t_sizes)])
    s, t = outputs(s_maps), outputs(t_maps)
    got = KDSVD(KDSVDParams(k=k), make_setup(s, t))(s, t, batch_of(3), {})["kdsvd"].item()
    want = kdsvd_np([m.numpy() for m in s_maps], [m.numpy() for m in t_maps], k)
    assert want > 1e-4
    assert got == pytest.approx(want, rel=1e-8)


def test_teacher_signs_matter_and_are_fixed():
    """Flipping one stage's teacher vector changes the reference's formula; the method's value
    is the one with every teacher vector summing to >= 0, whatever sign the library returns."""
    gen = torch.Generator().manual_seed(5)
    s_maps = rand_maps(gen, [(2, 2, 4, 4), (2, 4, 4, 4), (2, 6, 2, 2)])
    t_maps = rand_maps(gen, [(2, 2, 4, 4), (2, 4, 4, 4), (2, 6, 2, 2)])
    s_np, t_np = [m.numpy() for m in s_maps], [m.numpy() for m in t_maps]
    canonical = kdsvd_np(s_np, t_np)
    flipped_first = kdsvd_np(s_np, t_np, teacher_sign=lambda i, v: -positive_sum(i, v) if i == 0
                             else positive_sum(i, v))
    both_flipped = kdsvd_np(s_np, t_np, teacher_sign=lambda i, v: -positive_sum(i, v))
    assert abs(flipped_first - canonical) > 1e-3 * canonical  # the sign matters ...
    assert both_flipped == pytest.approx(canonical, rel=1e-12)  # ... only relative across stages
    s, t = outputs(s_maps), outputs(t_maps)
    got = KDSVD(KDSVDParams(), make_setup(s, t))(s, t, batch_of(2), {})["kdsvd"].item()
    assert got == pytest.approx(canonical, rel=1e-8)


@pytest.mark.parametrize("shape", [(3, 12, 5), (3, 5, 12)])  # tall and wide
def test_svd_gradient_equals_autograd_where_that_is_finite(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    w_v = torch.randn(3, shape[2], 4, generator=gen, dtype=torch.float64)

    def objective(s, v):  # |v|: independent of the vectors' signs
        return (s * w_s).sum() + (v.abs() * w_v).sum()

    s, v = TopRightSingular.apply(x, 4)
    (g_custom,) = torch.autograd.grad(objective(s, v), x)
    _, s2, vh = torch.linalg.svd(x, full_matrices=False)
    (g_auto,) = torch.autograd.grad(objective(s2[..., :4], vh.transpose(-2, -1)[..., :4]), x)
    torch.testing.assert_close(g_custom, g_auto, rtol=1e-8, atol=1e-10)
    assert torch.autograd.gradcheck(lambda y: TopRightSingular.apply(y, 4)[1].abs(), (x,))


def test_dead_channels_give_finite_gradient_equal_to_finite_differences():
    gen = torch.Generator().manual_seed(1)
    s_maps = rand_maps(gen, [(2, 8, 4, 4), (2, 8, 4, 4)])  # 16 positions × 8 channels: tall
    t_maps = rand_maps(gen, [(2, 8, 4, 4), (2, 8, 4, 4)])
    s_maps[1][:, 5:] = 0.0  # three dead channels: three zero singular values per sample
    s_maps = [m.requires_grad_() for m in s_maps]
    # the reference's path (autograd through torch.linalg.svd) has 0/0 in its gradient
    (g_plain,) = torch.autograd.grad(plain_autograd_loss(s_maps, t_maps), s_maps[1])
    assert not torch.isfinite(g_plain).all()
    loss = kdsvd_loss(s_maps, t_maps, 1)
    assert loss.item() == pytest.approx(plain_autograd_loss(s_maps, t_maps).item(), rel=1e-12)
    (g,) = torch.autograd.grad(loss, s_maps[1])
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    direction = torch.randn(s_maps[1].shape, generator=gen, dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        up = kdsvd_loss([s_maps[0], s_maps[1] + h * direction], t_maps, 1).item()
        down = kdsvd_loss([s_maps[0], s_maps[1] - h * direction], t_maps, 1).item()
    assert (g * direction).sum().item() == pytest.approx((up - down) / (2 * h), rel=1e-5)


def test_stage_count_mismatch_pairs_the_deepest_stages():
    gen = torch.Generator().manual_seed(2)
    s_maps = rand_maps(gen, [(2, 2, 8, 8), (2, 4, 4, 4), (2, 6, 2, 2)])
    t_maps = rand_maps(gen, [(2, 2, 8, 8), (2, 3, 8, 8), (2, 4, 4, 4), (2, 6, 2, 2)])
    s, t = outputs(s_maps), outputs(t_maps)  # the teacher's extra shallow stage has 3 channels
    method = KDSVD(KDSVDParams(), make_setup(s, t))
    assert method.num_stages == 2
    got = method(s, t, batch_of(2), {})["kdsvd"].item()
    assert got == pytest.approx(kdsvd_np([m.numpy() for m in s_maps],
                                         [m.numpy() for m in t_maps]), rel=1e-8)


def test_gradients_reach_student_not_teacher_or_classifier():
    student, teacher = make_pair(seed=3, s_chans=(4, 6), t_chans=(4, 6), s_strides=(1, 2),
                                 t_strides=(1, 1))
    method = KDSVD(KDSVDParams(), setup_from_nets(student, teacher))
    terms, _, _ = run(method, student, teacher, torch.randn(4, 3, 8, 8))
    assert set(terms) == {"kdsvd"}
    terms["kdsvd"].backward()
    # the stem feeds feats[1:], the classifier does not
    assert_gradients_route(student, teacher, method)
    assert list(method.parameters()) == []


def test_inference_mode_teacher_and_empty_state():
    gen = torch.Generator().manual_seed(4)
    shapes = [(2, 2, 4, 4), (2, 3, 4, 4), (2, 4, 2, 2)]
    s_maps = [m.requires_grad_() for m in rand_maps(gen, shapes)]
    with torch.inference_mode():
        t = outputs(rand_maps(gen, [(2, 2, 4, 4), (2, 3, 4, 4), (2, 4, 2, 2)]))
    s = outputs(s_maps)
    method = KDSVD(KDSVDParams(), make_setup(s, t))
    method(s, t, batch_of(2), {})["kdsvd"].backward()
    assert s_maps[1].grad is not None and torch.isfinite(s_maps[1].grad).all()
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    assert len(torch.load(buf, weights_only=True)) == 0  # KD-SVD has no state


def test_errors_name_the_problem():
    def out(*shapes):
        return outputs([torch.rand(*s) for s in shapes])

    s = out((2, 2, 8, 8), (2, 4, 8, 8), (2, 8, 4, 4))
    with pytest.raises(UserError, match=r"student feats\[2\] has 8 channels but teacher "
                                        r"feats\[2\] has 16.*same channel count"):
        KDSVD(KDSVDParams(), make_setup(s, out((2, 2, 8, 8), (2, 4, 8, 8), (2, 16, 4, 4))))
    with pytest.raises(UserError, match=r"at least two stages in feats\[1:\].*student has 1"):
        KDSVD(KDSVDParams(), make_setup(out((2, 2, 8, 8), (2, 8, 4, 4)), s))
    with pytest.raises(UserError, match=r"k = 5 singular vectors, but teacher feats\[1\] "
                                        r"\(4 channels × 8×8 positions\) has only 4"):
        KDSVD(KDSVDParams(k=5), make_setup(s, s))
    flat = ModelOutput(torch.zeros(2, 5), [torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4, 4),
                                           torch.rand(2, 6)], [], None)
    with pytest.raises(UserError, match=r"teacher feats\[2\] has shape \(2, 6\)"):
        KDSVD(KDSVDParams(), make_setup(out((2, 3, 4, 4), (2, 4, 4, 4), (2, 6, 2, 2)), flat))
    with pytest.raises(ValueError):
        KDSVDParams(k=0)


def test_registers_under_name_kdsvd():
    from kdbench_plugins.students import kdsvd

    seen = {}
    kdsvd.kdbench_register_student_methods(lambda name, factory, **kw: seen.update({name: factory}))
    assert seen == {"kdsvd": KDSVD}
