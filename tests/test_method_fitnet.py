"""FitNet (Romero et al. 2014): regressor choice, MSE hint loss vs numpy, gradients, state."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from kdbench.api import UserError
from kdbench_plugins.students.fitnet import FitNet, FitNetParams
from stand_ins import (TinyNet, assert_gradients_route, batch_of, fake_out, make_setup, run,
                       setup_from_nets)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ numpy reference
def np_conv2d(x, w, b, stride, pad):
    n, c_in, h, wd = x.shape
    c_out, _, kh, kw = w.shape
    xp = np.zeros((n, c_in, h + 2 * pad, wd + 2 * pad))
    xp[:, :, pad:pad + h, pad:pad + wd] = x
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, c_out, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            for o in range(c_out):
                out[:, o, i, j] = (patch * w[o]).sum(axis=(1, 2, 3)) + b[o]
    return out


def np_conv_transpose2d(x, w, b, stride, pad):
    # w: (c_in, c_out, kh, kw); each input pixel scatters a weighted kernel
    n, c_in, h, wd = x.shape
    _, c_out, kh, kw = w.shape
    full = np.zeros((n, c_out, (h - 1) * stride + kh, (wd - 1) * stride + kw))
    for i in range(h):
        for j in range(wd):
            for c in range(c_in):
                full[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw] += (
                    x[:, c, i, j][:, None, None, None] * w[c][None]
                )
    oh, ow = (h - 1) * stride - 2 * pad + kh, (wd - 1) * stride - 2 * pad + kw
    return full[:, :, pad:pad + oh, pad:pad + ow] + b[None, :, None, None]


def np_fitnet(s, t, conv, bn, transpose, stride, pad):
    w = conv.weight.detach().double().numpy()
    b = conv.bias.detach().double().numpy()
    z = (np_conv_transpose2d if transpose else np_conv2d)(s, w, b, stride, pad)
    mean = z.mean(axis=(0, 2, 3), keepdims=True)
    var = z.var(axis=(0, 2, 3), keepdims=True)  # training-mode BN: biased batch variance
    gamma = bn.weight.detach().double().numpy()[None, :, None, None]
    beta = bn.bias.detach().double().numpy()[None, :, None, None]
    y = np.maximum((z - mean) / np.sqrt(var + bn.eps) * gamma + beta, 0.0)
    return ((y - t) ** 2).mean()


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(
    "s_hw,t_hw,kind,kernel,stride,pad",
    [
        (8, 4, nn.Conv2d, (3, 3), 2, 1),  # student 2x larger
        (4, 8, nn.ConvTranspose2d, (4, 4), 2, 1),  # student 2x smaller
        (6, 4, nn.Conv2d, (3, 3), 1, 0),  # kernel 1 + sH - tH
        (4, 4, nn.Conv2d, (1, 1), 1, 0),  # equal
    ],
)
def test_loss_matches_numpy(s_hw, t_hw, kind, kernel, stride, pad):
    gen = torch.Generator().manual_seed(s_hw * 10 + t_hw)
    s_shapes = [(3, 2, 8, 8), (3, 3, 8, 8), (3, 3, s_hw, s_hw)]
    t_shapes = [(3, 2, 8, 8), (3, 4, 8, 8), (3, 5, t_hw, t_hw)]
    s_out, t_out = fake_out(s_shapes, gen), fake_out(t_shapes, gen)
    torch.manual_seed(0)
    method = FitNet(FitNetParams(), make_setup(s_out, t_out))
    conv, bn = method.regressor.conv, method.regressor.bn
    assert isinstance(conv, kind) and tuple(conv.kernel_size) == kernel
    assert conv.stride == (stride, stride) and conv.padding == (pad, pad)
    with torch.no_grad():  # non-trivial BN affine
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.3)
    method.train()
    terms = method(s_out, t_out, batch_of(3), {})
    assert set(terms) == {"fitnet"}
    ref = np_fitnet(s_out.feats[2].double().numpy(), t_out.feats[2].double().numpy(),
                    conv, bn, kind is nn.ConvTranspose2d, stride, pad)
    assert terms["fitnet"].item() == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert FitNet.default_weight == 100.0


def test_hint_layer_param_and_bad_shapes():
    gen = torch.Generator().manual_seed(0)
    s_out = fake_out([(2, 2, 8, 8), (2, 3, 4, 4), (2, 3, 2, 2)], gen)
    t_out = fake_out([(2, 2, 8, 8), (2, 4, 4, 4), (2, 5, 8, 8)], gen)
    m = FitNet(FitNetParams(hint_layer=1), make_setup(s_out, t_out))
    assert m.regressor.conv.kernel_size == (1, 1) and m.regressor.conv.out_channels == 4
    with pytest.raises(UserError):  # student 4x smaller: no regressor in the reference either
        FitNet(FitNetParams(), make_setup(s_out, t_out))
    with pytest.raises(UserError):
        FitNet(FitNetParams(hint_layer=3), make_setup(s_out, t_out))


def test_gradients_reach_student_and_regressor_not_teacher():
    torch.manual_seed(0)
    student = TinyNet(4, [6, 8, 10], [1, 2, 2])
    teacher = TinyNet(4, [8, 12, 16], [2, 2, 1])  # teacher feats[2] is 4x4, student's 8x8
    method = FitNet(FitNetParams(), setup_from_nets(student, teacher, size=16))
    assert isinstance(method.regressor.conv, nn.Conv2d) and method.regressor.conv.stride == (2, 2)
    terms, _, _ = run(method, student, teacher, torch.randn(4, 3, 16, 16))
    sum(terms.values()).backward()
    # feats[2] depends on the stem and the first two stages, not on stage 3 nor the classifier
    assert_gradients_route(student, teacher, method, untouched=("convs.2.", "bns.2.", "fc."))


def test_inference_mode_teacher_is_accepted():
    gen = torch.Generator().manual_seed(1)
    s_out = fake_out([(2, 2, 8, 8), (2, 3, 8, 8), (2, 3, 8, 8)], gen)
    with torch.inference_mode():
        t_out = fake_out([(2, 2, 8, 8), (2, 4, 8, 8), (2, 5, 4, 4)], gen)
    method = FitNet(FitNetParams(), make_setup(s_out, t_out))
    s_out.feats[2].requires_grad_(True)
    method(s_out, t_out, batch_of(2), {})["fitnet"].backward()
    assert s_out.feats[2].grad is not None


def test_state_round_trip():
    gen = torch.Generator().manual_seed(2)
    s_out = fake_out([(4, 2, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8)], gen)
    t_out = fake_out([(4, 2, 8, 8), (4, 4, 8, 8), (4, 5, 4, 4)], gen)
    setup = make_setup(s_out, t_out)
    torch.manual_seed(0)
    a = FitNet(FitNetParams(), setup)
    a.train()
    a(s_out, t_out, batch_of(4), {})  # moves the BN running statistics
    a.eval()
    want = a(s_out, t_out, batch_of(4), {})["fitnet"]
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert "regressor.bn.running_mean" in state
    torch.manual_seed(123)
    b = FitNet(FitNetParams(), setup)
    b.load_state_dict(state)
    b.eval()
    assert torch.equal(b(s_out, t_out, batch_of(4), {})["fitnet"], want)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
