"""VID (Ahn et al. 2019): Gaussian NLL vs numpy, trained variances, gradients, state."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from kdbench.api import UserError
from kdbench_plugins.students.vid import VID, VIDParams
from stand_ins import (TinyNet, assert_gradients_route, batch_of, fake_out, make_setup, run,
                       setup_from_nets)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ numpy reference
def np_block_mean(x, out_hw):
    n, c, h, w = x.shape
    f = h // out_hw
    return x.reshape(n, c, out_hw, f, out_hw, f).mean(axis=(3, 5))


def np_vid_layer(s, t, ws, alpha, eps):
    """-log N(t | r(s), diag var) per element without the ½ log 2π constant, averaged."""
    if s.shape[2] > t.shape[2]:
        s = np_block_mean(s, t.shape[2])
    elif s.shape[2] < t.shape[2]:
        t = np_block_mean(t, s.shape[2])
    h = s
    for k, w in enumerate(ws):  # conv1x1 without bias = channel mixing at every position
        h = np.einsum("oc,nchw->nohw", w, h)
        if k < 2:
            h = np.maximum(h, 0.0)
    var = np.log1p(np.exp(alpha)) + eps
    total, count = 0.0, 0
    n, c, hh, ww = t.shape
    for b in range(n):
        for ch in range(c):
            for i in range(hh):
                for j in range(ww):
                    err2 = (t[b, ch, i, j] - h[b, ch, i, j]) ** 2
                    total += 0.5 * (math.log(var[ch]) + err2 / var[ch])
                    count += 1
    return total / count


# ------------------------------------------------------------------------------ tests
def test_initial_variance_and_registration():
    gen = torch.Generator().manual_seed(0)
    s_out = fake_out([(2, 2, 8, 8), (2, 3, 8, 8), (2, 4, 4, 4)], gen)
    t_out = fake_out([(2, 2, 8, 8), (2, 5, 8, 8), (2, 6, 4, 4)], gen)
    m = VID(VIDParams(), make_setup(s_out, t_out))
    assert len(m.regressors) == 2 and m.s_idx == [1, 2] and m.t_idx == [1, 2]
    for v, c in zip(m.variances(), (5, 6)):
        assert v.shape == (c,)
        assert torch.allclose(v, torch.full((c,), 5.0), atol=1e-5)
    names = {n for n, _ in m.named_parameters()}
    assert {"log_scales.0", "log_scales.1"} <= names  # registered: trained and checkpointed
    assert "log_scales.0" in m.state_dict()
    convs = [mod for mod in m.regressors[0] if isinstance(mod, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.bias) for c in convs] == [(3, 5, None), (5, 5, None),
                                                                         (5, 5, None)]


def test_loss_matches_numpy():
    gen = torch.Generator().manual_seed(1)
    # layer 1: student map larger (8x8 vs 4x4); layer 2: teacher map larger (4x4 vs 2x2)
    s_out = fake_out([(3, 2, 8, 8), (3, 3, 8, 8), (3, 4, 2, 2)], gen)
    t_out = fake_out([(3, 2, 8, 8), (3, 5, 4, 4), (3, 6, 4, 4)], gen)
    torch.manual_seed(0)
    m = VID(VIDParams(), make_setup(s_out, t_out))
    with torch.no_grad():  # variances away from their initial value, different per channel
        for a in m.log_scales:
            a.copy_(torch.randn(a.shape, generator=gen))
    terms = m(s_out, t_out, batch_of(3), {})
    assert set(terms) == {"vid"}
    want = 0.0
    for layer, (i, reg) in enumerate(zip((1, 2), m.regressors)):
        convs = [c for c in reg if isinstance(c, nn.Conv2d)]
        ws = [c.weight.detach().double().numpy()[:, :, 0, 0] for c in convs]
        want += np_vid_layer(s_out.feats[i].double().numpy(), t_out.feats[i].double().numpy(), ws,
                             m.log_scales[layer].detach().double().numpy(), 1e-5)
    assert terms["vid"].item() == pytest.approx(want, rel=1e-5)
    assert VID.default_weight == 1.0


def test_layer_selection():
    gen = torch.Generator().manual_seed(2)
    s_out = fake_out([(2, 2, 8, 8), (2, 3, 8, 8), (2, 4, 4, 4)], gen)
    t_out = fake_out([(2, 2, 8, 8), (2, 5, 8, 8), (2, 6, 4, 4), (2, 7, 2, 2)], gen)
    m = VID(VIDParams(), make_setup(s_out, t_out))  # 2 student stages vs 3: deepest paired
    assert (m.s_idx, m.t_idx) == ([1, 2], [2, 3])
    m = VID(VIDParams(layers=[2]), make_setup(s_out, t_out))
    assert (m.s_idx, m.t_idx) == ([2], [3])
    m = VID(VIDParams(layers=[1], teacher_layers=[1]), make_setup(s_out, t_out))
    assert (m.s_idx, m.t_idx) == ([1], [1]) and m.regressors[0][0].out_channels == 5
    with pytest.raises(UserError):
        VID(VIDParams(layers=[5]), make_setup(s_out, t_out))
    with pytest.raises(UserError):
        VID(VIDParams(layers=[1, 2], teacher_layers=[1]), make_setup(s_out, t_out))


def test_gradients_and_variance_is_trained():
    torch.manual_seed(0)
    student = TinyNet(4, [6, 8], [1, 2])
    teacher = TinyNet(4, [8, 12], [2, 1])
    method = VID(VIDParams(), setup_from_nets(student, teacher))
    terms, _, _ = run(method, student, teacher, torch.randn(4, 3, 8, 8))
    sum(terms.values()).backward()
    assert_gradients_route(student, teacher, method)  # the variance parameters learn too
    # the engine hands method.parameters() to the optimizer: one step moves the variances
    before = [v.clone() for v in method.variances()]
    torch.optim.SGD(method.parameters(), lr=0.1).step()
    assert all(not torch.allclose(a, b) for a, b in zip(before, method.variances()))


def test_state_round_trip():
    gen = torch.Generator().manual_seed(3)
    s_out = fake_out([(2, 2, 8, 8), (2, 3, 8, 8), (2, 4, 4, 4)], gen)
    t_out = fake_out([(2, 2, 8, 8), (2, 5, 8, 8), (2, 6, 4, 4)], gen)
    setup = make_setup(s_out, t_out)
    torch.manual_seed(0)
    a = VID(VIDParams(), setup)
    with torch.no_grad():
        for p in a.log_scales:
            p.add_(torch.randn(p.shape, generator=gen))
    want = a(s_out, t_out, batch_of(2), {})["vid"]
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    torch.manual_seed(1)
    b = VID(VIDParams(), setup)
    assert not torch.equal(b(s_out, t_out, batch_of(2), {})["vid"], want)
    b.load_state_dict(state)
    assert torch.equal(b(s_out, t_out, batch_of(2), {})["vid"], want)
    for x, y in zip(a.log_scales, b.log_scales):
        assert torch.equal(x, y)
