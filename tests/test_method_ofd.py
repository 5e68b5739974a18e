"""OFD (Heo et al. 2019): margins, partial L2 loss, gradient routing, persistent state."""
from __future__ import annotations

import io
import math
from functools import partial

import numpy as np
import pytest
import torch

from kdbench.api import Batch, NoParams
from kdbench_plugins.students.ofd import OFD
from stand_ins import adaptive_avg_pool_np, assert_gradients_route, run, setup_from_nets
from stand_ins import make_pair as _make_pair

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ stand-ins
make_pair = partial(_make_pair, randomize_teacher_bn=True)  # teacher BN affine random


# ------------------------------------------------------------------------------ independent maths
def margin_reference(gamma: float, beta: float) -> float:
    s, m = abs(gamma), beta
    phi = 0.5 * (1.0 + math.erf((-m / s) / math.sqrt(2.0)))
    if phi > 0.001:
        pdf = math.exp(-0.5 * (m / s) ** 2) / math.sqrt(2.0 * math.pi)
        return m - s * pdf / phi
    return -3.0 * s


def connector_np(x, conv_w, gamma, beta, eps=1e-5):
    """1x1 conv then BatchNorm in train mode (batch statistics, biased variance)."""
    n, c_in, h, w = x.shape
    c_out = conv_w.shape[0]
    y = np.zeros((n, c_out, h, w))
    for o in range(c_out):
        for i in range(c_in):
            y[:, o] += conv_w[o, i, 0, 0] * x[:, i]
    mean = y.mean(axis=(0, 2, 3), keepdims=True)
    var = ((y - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    return (y - mean) / np.sqrt(var + eps) * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)


def ofd_reference(s_feats, t_feats, connectors, margins):
    """Official total: Σ_i partial-L2_i / 2^(k-i-1) / B / 1000, with plain loops."""
    k = len(s_feats)
    total = 0.0
    n = s_feats[0].shape[0]
    for i in range(k):
        conv_w, gamma, beta = connectors[i]
        src = connector_np(s_feats[i], conv_w, gamma, beta)
        tgt = t_feats[i]
        if tgt.shape[2:] != src.shape[2:]:
            tgt = adaptive_avg_pool_np(tgt, *src.shape[2:])
        d = 0.0
        for b in range(n):
            for c in range(src.shape[1]):
                for y in range(src.shape[2]):
                    for x in range(src.shape[3]):
                        t = max(tgt[b, c, y, x], margins[i][c])
                        s = src[b, c, y, x]
                        if s <= t and t <= 0:
                            continue
                        d += (s - t) ** 2
        total += d / 2 ** (k - i - 1)
    return total / n / 1000.0


def reference_from_outputs(method, s_out, t_out, t_bns):
    k = method.num_stages
    s_feats = [f.detach().double().numpy() for f in s_out.preact_feats[1:][-k:]]
    t_feats = [f.detach().double().numpy() for f in t_out.preact_feats[1:][-k:]]
    conns = [(c[0].weight.detach().double().numpy(), c[1].weight.detach().double().numpy(),
              c[1].bias.detach().double().numpy()) for c in method.connectors]
    margins = [[margin_reference(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())]
               for bn in t_bns[-k:]]
    return ofd_reference(s_feats, t_feats, conns, margins)


# ------------------------------------------------------------------------------ tests
def test_class_attributes():
    assert OFD.default_weight == 0.001  # official: distill.sum() / batch / 1000
    assert OFD.teacher_train_mode is True  # official loop calls t_net.train()
    assert OFD.needs_teacher and OFD.views == ()


def test_margins_match_independent_formula_both_branches():
    student, teacher = make_pair()
    bn = teacher.bns[1]  # 6 channels: cover both branches, negative gamma
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.3, 1.0, 0.7]))
        bn.bias.copy_(torch.tensor([0.0, 0.4, -1.0, 1.5, 4.0, -2.0]))  # m/s=4 -> Φ(-4)<0.001
    method = OFD(NoParams(), setup_from_nets(student, teacher))
    got = method.margin1.tolist()
    want = [margin_reference(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())]
    assert want[4] == -3.0  # the -3s branch is exercised
    assert all(w < 0 for w in want)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # hand-checked value: s=1, m=0 -> -φ(0)/Φ(0) = -2/sqrt(2π)
    assert got[0] == pytest.approx(-2 / math.sqrt(2 * math.pi), rel=1e-6)
    # other stage from the randomised BN
    bn0 = teacher.bns[0]
    want0 = [margin_reference(g, b) for g, b in zip(bn0.weight.tolist(), bn0.bias.tolist())]
    np.testing.assert_allclose(method.margin0.tolist(), want0, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "s_strides,t_strides",
    [((1, 2), (1, 2)),  # same sizes
     ((2, 2), (1, 2)),  # teacher maps larger: average pooled down
     ((1, 1), (1, 2))],  # teacher's last map smaller: repeated up (adaptive pool)
)
def test_loss_matches_numpy_loops(s_strides, t_strides):
    student, teacher = make_pair(seed=1, s_strides=s_strides, t_strides=t_strides)
    method = OFD(NoParams(), setup_from_nets(student, teacher))
    with torch.no_grad():  # non-trivial connector BN affine
        for c in method.connectors:
            c[1].weight.uniform_(0.5, 1.5)
            c[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    terms, s_out, t_out = run(method, student, teacher, x)
    got = OFD.default_weight * terms["ofd"].item()
    want = reference_from_outputs(method, s_out, t_out, teacher.bn_before_relu())
    assert want > 0
    assert got == pytest.approx(want, rel=1e-6)


def test_stage_count_mismatch_matches_deepest_stages():
    student, teacher = make_pair(seed=3, s_chans=(3, 4), t_chans=(5, 6, 7),
                                 s_strides=(1, 2), t_strides=(1, 2, 1))
    method = OFD(NoParams(), setup_from_nets(student, teacher))
    assert method.num_stages == 2
    assert [c[0].in_channels for c in method.connectors] == [3, 4]
    assert [c[0].out_channels for c in method.connectors] == [6, 7]
    bn = teacher.bns[2]
    want = [margin_reference(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())]
    np.testing.assert_allclose(method.margin1.tolist(), want, rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    terms, s_out, t_out = run(method, student, teacher, x)
    want_loss = reference_from_outputs(method, s_out, t_out, teacher.bn_before_relu())
    assert OFD.default_weight * terms["ofd"].item() == pytest.approx(want_loss, rel=1e-6)


def test_gradients_reach_student_and_connectors_not_teacher():
    student, teacher = make_pair(seed=5)
    method = OFD(NoParams(), setup_from_nets(student, teacher))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    terms, _, _ = run(method, student, teacher, x)
    sum(terms.values()).backward()
    assert_gradients_route(student, teacher, method)  # logits are not used by OFD
    assert all(not b.requires_grad for b in method.buffers())


def test_state_round_trip():
    student, teacher = make_pair(seed=7)
    method = OFD(NoParams(), setup_from_nets(student, teacher))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    run(method, student, teacher, x)  # update connector BN running stats
    sd = method.state_dict()
    assert {"margin0", "margin1"} <= set(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other_student, other_teacher = make_pair(seed=99)  # different BNs -> different margins
    fresh = OFD(NoParams(), setup_from_nets(other_student, other_teacher))
    assert not torch.allclose(fresh.margin0, method.margin0)
    fresh.load_state_dict(loaded)
    for key, value in method.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    method.eval(), fresh.eval(), student.eval(), teacher.eval()
    with torch.no_grad():
        s_out, t_out = student(x), teacher(x)
        b = Batch(x=x, y=torch.zeros(2, dtype=torch.long), index=torch.arange(2))
        assert torch.equal(method(s_out, t_out, b, {})["ofd"], fresh(s_out, t_out, b, {})["ofd"])


def test_registers_under_name_ofd():
    from kdbench_plugins.students import ofd

    seen = {}
    ofd.kdbench_register_student_methods(lambda name, factory, **kw: seen.update({name: factory}))
    assert seen == {"ofd": OFD}
