"""ReviewKD (Chen et al. 2021): HCL, ABF, whole-method loss, warm-up, gradients, state."""
from __future__ import annotations

import io
import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from kdbench_plugins.students.reviewkd import (ABF, ReviewKD, ReviewKDParams, hcl_loss,
                                               warmup_factor)
from stand_ins import adaptive_avg_pool_np, assert_gradients_route, setup_from_nets
from stand_ins import batch as _batch
from stand_ins import make_pair as _make_pair
from stand_ins import run as _run

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ stand-ins
make_pair = partial(_make_pair, t_strides=(2, 2))  # teacher maps half the student's
batch = partial(_batch, epochs=100)
run = partial(_run, epochs=100)


# ------------------------------------------------------------------------------ numpy maths
def hcl_np(fs_list, ft_list):
    """Paper/official HCL: full-res MSE (weight 1) + pools 4, 2, 1 (those smaller than h) with
    weights 1/2, 1/4, 1/8 given in order of use, divided by the sum of the weights used."""
    total = 0.0
    for fs, ft in zip(fs_list, ft_list):
        h = fs.shape[2]
        terms, weights = [((fs - ft) ** 2).mean()], [1.0]
        w = 1.0
        for level in (4, 2, 1):
            if level >= h:
                continue
            w /= 2
            ps, pt = adaptive_avg_pool_np(fs, level, level), adaptive_avg_pool_np(ft, level, level)
            terms.append(((ps - pt) ** 2).mean())
            weights.append(w)
        total += sum(a * b for a, b in zip(weights, terms)) / sum(weights)
    return total


def conv_np(x, w, b=None, pad=0):
    n, c_in, h, wd = x.shape
    c_out, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_h, out_w = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    y = np.zeros((n, c_out, out_h, out_w))
    for o in range(c_out):
        for i in range(c_in):
            for dy in range(kh):
                for dx in range(kw):
                    y[:, o] += w[o, i, dy, dx] * xp[:, i, dy:dy + out_h, dx:dx + out_w]
        if b is not None:
            y[:, o] += b[o]
    return y


def bn_train_np(y, gamma, beta, eps=1e-5):
    mean = y.mean(axis=(0, 2, 3), keepdims=True)
    var = ((y - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    return (y - mean) / np.sqrt(var + eps) * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)


def nearest_np(x, out_h, out_w):
    h, w = x.shape[2:]
    rows = [(i * h) // out_h for i in range(out_h)]
    cols = [(j * w) // out_w for j in range(out_w)]
    return x[:, :, rows][:, :, :, cols]


def sigmoid_np(v):
    return 1.0 / (1.0 + np.exp(-v))


def abf_np(x, y, p, out_size):
    """ABF from the paper with weights p (numpy dict), BNs in train mode."""
    h, w = x.shape[2:]
    x = bn_train_np(conv_np(x, p["w1"]), p["g1"], p["b1"])
    if p.get("wa") is not None:
        y = nearest_np(y, h, w)
        z = sigmoid_np(conv_np(np.concatenate([x, y], axis=1), p["wa"], p["ba"]))
        x = x * z[:, 0:1] + y * z[:, 1:2]
    if (h, w) != tuple(out_size):
        x = nearest_np(x, *out_size)
    return bn_train_np(conv_np(x, p["w2"], pad=1), p["g2"], p["b2"]), x


def abf_params_np(abf):
    t = lambda v: v.detach().double().numpy()
    p = {"w1": t(abf.conv1[0].weight), "g1": t(abf.conv1[1].weight), "b1": t(abf.conv1[1].bias),
         "w2": t(abf.conv2[0].weight), "g2": t(abf.conv2[1].weight), "b2": t(abf.conv2[1].bias)}
    if abf.att_conv is not None:
        p["wa"], p["ba"] = t(abf.att_conv[0].weight), t(abf.att_conv[0].bias)
    return p


def reviewkd_np(method, s_out, t_out, epoch, warmup=20.0):
    k = method.num_levels
    s_lv = [f.detach().double().numpy() for f in s_out.feats[1:]]
    s_lv.append(s_out.pooled.detach().double().numpy()[:, :, None, None])
    t_lv = [f.detach().double().numpy() for f in t_out.preact_feats[1:]]
    t_lv.append(t_out.pooled.detach().double().numpy()[:, :, None, None])
    s_lv, t_lv = s_lv[-k:], t_lv[-k:]
    outs = [None] * k
    residual = None
    for j, abf in zip(range(k - 1, -1, -1), method.abfs):  # deepest first
        outs[j], residual = abf_np(s_lv[j], residual, abf_params_np(abf), t_lv[j].shape[2:])
    return hcl_np(outs, t_lv) * min(epoch / warmup, 1.0)


def randomize_abf_affine(method, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in method.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


# ------------------------------------------------------------------------------ tests
def test_defaults():
    p = ReviewKDParams()
    assert ReviewKD.default_weight == 5.0 and p.warmup_epochs == 20 and p.max_mid_channels == 512
    assert ReviewKD.teacher_train_mode is False and ReviewKD.views == ()


def test_hcl_matches_numpy_with_hand_pooling():
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 8, 8), (2, 3, 5, 5), (2, 4, 4, 4), (2, 2, 2, 2), (2, 6, 1, 1)]
    fs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ft = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    got = hcl_loss(fs, ft).item()
    want = hcl_np([f.numpy() for f in fs], [f.numpy() for f in ft])
    assert got == pytest.approx(want, rel=1e-12)
    # per-level checks
    for a, b in zip(fs, ft):
        assert hcl_loss([a], [b]).item() == pytest.approx(hcl_np([a.numpy()], [b.numpy()]),
                                                          rel=1e-12)
    # a constant offset c gives c^2 at every pool, so c^2 per level whatever the weights
    base = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    assert hcl_loss([base + 0.5], [base]).item() == pytest.approx(0.25, rel=1e-12)
    # weights used for an 8x8 map: 1, .5, .25, .125 over full, 4, 2, 1; for 4x4: 1, .5, .25
    a = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    b = torch.zeros_like(a)
    b[0, 0, 0, 0] = 4.0  # full MSE 1; pool2 [1,0,0,0] -> .25; pool1 .25*.25=.0625
    assert hcl_loss([a], [b]).item() == pytest.approx(
        (1.0 + 0.5 * 0.25 + 0.25 * 0.0625) / 1.75, rel=1e-12)


def _set_abf_known(abf):
    with torch.no_grad():
        abf.conv1[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(2, 2, 1, 1))
        abf.att_conv[0].weight.zero_()
        abf.att_conv[0].bias.copy_(torch.tensor([0.0, math.log(3.0)]))  # z = (1/2, 3/4)
        w2 = torch.zeros(1, 2, 3, 3)
        w2[0, 0, 1, 1], w2[0, 1, 1, 1], w2[0, 0, 0, 0] = 1.0, 1.0, 1.0  # centre + up-left tap
        abf.conv2[0].weight.copy_(w2)
        for bn in (abf.conv1[1], abf.conv2[1]):  # eval-mode BN made the identity
            bn.weight.fill_(1.0), bn.bias.zero_(), bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    abf.eval()


def test_abf_forward_matches_hand_computation():
    abf = ABF(2, 2, 1, fuse=True)
    _set_abf_known(abf)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.5, -1.0], [0.0, 1.0]]]])
    y = torch.tensor([[[[2.0]], [[-4.0]]]])  # deeper fused map, 1x1 -> nearest to 2x2
    out, fused = abf(x, y, (2, 2))
    # conv1: ch0 = x0, ch1 = 2*x1; fused = 0.5*conv1 + 0.75*y
    f0 = [[0.5 * 1 + 1.5, 0.5 * 2 + 1.5], [0.5 * 3 + 1.5, 0.5 * 4 + 1.5]]  # [[2, 2.5], [3, 3.5]]
    f1 = [[0.5 * 1 - 3.0, 0.5 * -2 - 3.0], [0.5 * 0 - 3.0, 0.5 * 2 - 3.0]]  # [[-2.5,-4],[-3,-2]]
    assert fused[0, 0].flatten().tolist() == pytest.approx(np.array(f0).ravel().tolist(), abs=1e-5)
    assert fused[0, 1].flatten().tolist() == pytest.approx(np.array(f1).ravel().tolist(), abs=1e-5)
    # conv2 (padding 1): out[i,j] = f0[i,j] + f1[i,j] + f0[i-1,j-1]
    want = [[2 - 2.5, 2.5 - 4], [3 - 3, 3.5 - 2 + 2]]
    assert out[0, 0].flatten().tolist() == pytest.approx(np.array(want).ravel().tolist(), abs=1e-5)
    # resize to a larger teacher map (4x4): fused map repeated 2x2, then the same conv2
    out4, fused4 = abf(x, y, (4, 4))
    big0 = np.repeat(np.repeat(np.array(f0), 2, 0), 2, 1)
    big1 = np.repeat(np.repeat(np.array(f1), 2, 0), 2, 1)
    assert fused4[0, 0].detach().numpy() == pytest.approx(big0, abs=1e-5)
    want4 = big0 + big1
    want4[1:, 1:] += big0[:-1, :-1]
    assert out4[0, 0].detach().numpy() == pytest.approx(want4, abs=1e-5)
    # the deepest ABF does not fuse
    deep = ABF(2, 2, 1, fuse=False)
    assert deep.att_conv is None
    assert deep(x, None, (2, 2))[0].shape == (1, 1, 2, 2)


@pytest.mark.parametrize(
    "s_strides,t_strides",
    [((1, 2), (2, 2)),  # teacher maps smaller: nearest-downsampled before conv2
     ((2, 2), (1, 2)),  # teacher maps larger
     ((1, 2), (1, 2))],  # same sizes
)
def test_method_loss_matches_numpy(s_strides, t_strides):
    student, teacher = make_pair(seed=1, s_strides=s_strides, t_strides=t_strides)
    method = ReviewKD(ReviewKDParams(), setup_from_nets(student, teacher))
    randomize_abf_affine(method, seed=2)
    assert method.num_levels == 3 and method.mid_channels == 4
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for epoch in (7, 30):
        terms, s_out, t_out = run(method, student, teacher, x, epoch)
        want = reviewkd_np(method, s_out, t_out, epoch)
        assert want > 0
        assert terms["reviewkd"].item() == pytest.approx(want, rel=1e-5)


def test_warmup_factor():
    assert warmup_factor(0, 20) == 0.0  # official train.py: 0-based epoch, min(1, epoch/20)
    assert warmup_factor(5, 20) == 0.25
    assert warmup_factor(19, 20) == 0.95
    assert warmup_factor(20, 20) == 1.0
    assert warmup_factor(200, 20) == 1.0
    assert warmup_factor(0, 0) == 1.0
    student, teacher = make_pair(seed=4)
    method = ReviewKD(ReviewKDParams(warmup_epochs=20), setup_from_nets(student, teacher))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    values = {e: run(method, student, teacher, x, e)[0]["reviewkd"].item() for e in (0, 10, 20, 50)}
    assert values[0] == 0.0
    assert values[20] > 0
    assert values[10] == pytest.approx(0.5 * values[20], rel=1e-6)
    assert values[50] == pytest.approx(values[20], rel=1e-6)
    no_warm = ReviewKD(ReviewKDParams(warmup_epochs=0), setup_from_nets(student, teacher))
    assert run(no_warm, student, teacher, x, 0)[0]["reviewkd"].item() > 0


@pytest.mark.parametrize("s_chans,t_chans,k", [((3, 4, 5), (6, 7), 3), ((3, 4), (5, 6, 7), 3),
                                                ((3,), (5, 6, 7), 2)])
def test_stage_count_mismatch_uses_deepest_levels(s_chans, t_chans, k):
    student, teacher = make_pair(seed=6, s_chans=s_chans, t_chans=t_chans,
                                 s_strides=[1] * len(s_chans), t_strides=[2] * len(t_chans))
    method = ReviewKD(ReviewKDParams(), setup_from_nets(student, teacher))
    assert method.num_levels == k
    # abfs are deepest first: pooled level first
    assert [a.conv1[0].in_channels for a in method.abfs] == [s_chans[-1]] + list(
        s_chans[::-1][: k - 1])
    assert [a.conv2[0].out_channels for a in method.abfs] == [t_chans[-1]] + list(
        t_chans[::-1][: k - 1])
    assert [a.att_conv is None for a in method.abfs] == [True] + [False] * (k - 1)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    terms, s_out, t_out = run(method, student, teacher, x, 25)
    assert terms["reviewkd"].item() == pytest.approx(reviewkd_np(method, s_out, t_out, 25),
                                                     rel=1e-5)


def test_mid_channels_cap():
    student, teacher = make_pair(seed=8, s_chans=(3, 20))
    method = ReviewKD(ReviewKDParams(max_mid_channels=8), setup_from_nets(student, teacher))
    assert method.mid_channels == 8
    assert all(a.conv1[0].out_channels == 8 for a in method.abfs)
    method = ReviewKD(ReviewKDParams(), setup_from_nets(student, teacher))
    assert method.mid_channels == 20  # min(512, student's pooled dim)


def test_gradients_reach_student_and_abfs_not_teacher():
    student, teacher = make_pair(seed=9)
    method = ReviewKD(ReviewKDParams(), setup_from_nets(student, teacher))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    terms, _, _ = run(method, student, teacher, x, epoch=25)
    sum(terms.values()).backward()
    assert_gradients_route(student, teacher, method)  # logits are not used by ReviewKD


def test_state_round_trip():
    student, teacher = make_pair(seed=11)
    method = ReviewKD(ReviewKDParams(), setup_from_nets(student, teacher))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(12))
    run(method, student, teacher, x, 25)  # BN running stats move
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    torch.manual_seed(123)
    fresh = ReviewKD(ReviewKDParams(), setup_from_nets(student, teacher))
    assert not torch.equal(fresh.abfs[1].conv1[0].weight, method.abfs[1].conv1[0].weight)
    fresh.load_state_dict(loaded)
    for key, value in method.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    method.eval(), fresh.eval(), student.eval()
    with torch.no_grad():
        s_out, t_out = student(x), teacher(x)
        a = method(s_out, t_out, batch(x, 25), {})["reviewkd"]
        b = fresh(s_out, t_out, batch(x, 25), {})["reviewkd"]
    assert torch.equal(a, b)


def test_registers_under_name_reviewkd():
    from kdbench_plugins.students import reviewkd

    seen = {}
    reviewkd.kdbench_register_student_methods(
        lambda name, factory, params=None, **kw: seen.update({name: (factory, params)}))
    assert seen == {"reviewkd": (ReviewKD, ReviewKDParams)}
