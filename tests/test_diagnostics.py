"""kdbench.diagnostics.teacher_diagnostics against a brute-force double loop in numpy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdbench.api import KDModel, ModelOutput
from kdbench.diagnostics import teacher_diagnostics

from stand_ins import OneConvNet

torch.set_num_threads(1)


def TinyNet(num_classes=4, width=5):
    return OneConvNet(num_classes, width)


def brute_force(logits, pooled, y, temperature):
    logits, pooled = logits.astype(np.float64), pooled.astype(np.float64)
    n = len(y)
    phi = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    out = {"top1": 100.0 * np.mean(logits.argmax(1) == y)}
    for suffix, t in (("", 1.0), ("_T", temperature)):
        ent, mass = [], []
        for i in range(n):
            z = logits[i] / t
            p = np.exp(z - z.max())
            p /= p.sum()
            ent.append(-sum(q * math.log(q) for q in p if q > 0))
            mass.append(1.0 - p[y[i]])
        out["entropy" + suffix] = np.mean(ent)
        out["nontarget_mass" + suffix] = np.mean(mass)
    intra, inter, cintra, cinter = [], [], [], []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            s = float(phi[i] @ phi[j])
            (intra if y[i] == y[j] else inter).append(math.exp(s))
            (cintra if y[i] == y[j] else cinter).append(s)
    out["d_intra"], out["d_inter"] = np.mean(intra), np.mean(inter)
    out["d_intra_over_inter"] = out["d_intra"] / out["d_inter"]
    out["cos_intra"], out["cos_inter"] = np.mean(cintra), np.mean(cinter)
    return out


@pytest.mark.parametrize("chunk_size", [1024, 4])
def test_diagnostics_match_brute_force(chunk_size):
    torch.manual_seed(0)
    model = TinyNet()
    model.train()
    # give BN non-trivial running statistics so eval mode differs from train mode
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 3, 6, 6, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2, 2, 2, 3, 0, 1, 1, 0, 3, 3, 2, 0, 1, 2, 0, 3])
    batches = [(x[i:i + 5], y[i:i + 5]) for i in range(0, 23, 5)]
    stats = teacher_diagnostics(model, iter(batches), temperature=3.0, chunk_size=chunk_size)
    assert model.training  # mode restored

    model.eval()
    with torch.no_grad():
        out = model(x)
    want = brute_force(out.logits.numpy(), out.pooled.numpy(), y.numpy(), 3.0)
    for k, v in want.items():
        assert stats[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert stats["n"] == 23 and stats["temperature"] == 3.0
    assert all(isinstance(v, float) for v in stats.values())


def test_diagnostics_known_geometry():
    """Two classes of identical embeddings at opposite poles: d_intra = e, d_inter = 1/e."""

    class Fixed(KDModel):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            pooled = x[:, :2, 0, 0]
            return ModelOutput(pooled * 10, [], [], pooled)

    y = torch.tensor([0, 0, 0, 1, 1])
    x = torch.zeros(5, 2, 1, 1)
    x[y == 0, 0, 0, 0] = 1.0
    x[y == 1, 0, 0, 0] = -1.0
    stats = teacher_diagnostics(Fixed(), [(x, y)], temperature=4.0)
    assert stats["d_intra"] == pytest.approx(math.e)
    assert stats["d_inter"] == pytest.approx(1 / math.e)
    assert stats["cos_intra"] == pytest.approx(1.0) and stats["cos_inter"] == pytest.approx(-1.0)
    assert stats["top1"] == pytest.approx(100.0)  # logits (10, 0) / (-10, 0): both classes right


def lse(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def brute_force_section4(anchors, positives, y):
    """Eq. 8's L_intra / L_inter per anchor (positive = the flipped image, negatives = every other
    sample of its class / every sample of another class), d in log space, Theorem 1: loops."""
    a, p = anchors.astype(np.float64), positives.astype(np.float64)
    n = len(y)
    li, le, ks, same_s, other_s = [], [], [], [], []
    for i in range(n):
        sp = float(a[i] @ p[i])
        same = [float(a[i] @ a[j]) for j in range(n) if j != i and y[j] == y[i]]
        other = [float(a[i] @ a[j]) for j in range(n) if y[j] != y[i]]
        same_s += same
        other_s += other
        li.append(lse([sp] + same) - sp)
        le.append(lse([sp] + other) - sp)
        ks.append(len(other) / len(same))
    out = {"L_intra": np.mean(li), "L_inter": np.mean(le), "theorem1_K": np.mean(ks),
           "log_d_intra": lse(same_s) - math.log(len(same_s)),
           "log_d_inter": lse(other_s) - math.log(len(other_s))}
    out["L_intra_over_inter"] = out["L_intra"] / out["L_inter"]
    out["log_d_intra_over_inter"] = out["log_d_intra"] - out["log_d_inter"]
    out["log_theorem1_rhs"] = math.log(out["theorem1_K"]) + out["L_intra"] - out["L_inter"]
    try:
        out["theorem1_rhs_eq12"] = (out["theorem1_K"] * math.expm1(out["L_intra"])
                                    / math.expm1(out["L_inter"]))
    except OverflowError:  # e^L beyond float range (unnormalised logits): not compared
        pass
    return out


@pytest.mark.parametrize("chunk_size", [1024, 3])
def test_section4_losses_and_theorem1_match_loops(chunk_size):
    """Pooled φ and a 'trained' representation of unnormalised logits (large: exp(s) overflows),
    against Python loops; the positive is the horizontally flipped image."""
    torch.manual_seed(4)
    model = TinyNet()
    model.eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(14, 3, 6, 6, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    scale = 400.0  # logits × 400: s ~ 1e4..1e5
    rep = lambda out: out.logits * scale  # noqa: E731
    stats = teacher_diagnostics(model, [(x[:8], y[:8]), (x[8:], y[8:])], chunk_size=chunk_size,
                                representation=rep, representation_name="logits×400")
    with torch.no_grad():
        out, flipped = model(x), model(x.flip(-1))
    norm = lambda t: (t / t.norm(dim=1, keepdim=True)).numpy()  # noqa: E731
    for got, anchors, positives in ((stats, norm(out.pooled), norm(flipped.pooled)),
                                    (stats["trained"], rep(out).numpy(), rep(flipped).numpy())):
        want = brute_force_section4(anchors, positives, y.tolist())
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        assert all(math.isfinite(got[k]) for k in want)
    assert stats["trained"]["embedding"] == "logits×400"
    assert math.isinf(stats["trained"]["d_intra"])  # exp overflows; the log-space value does not
    # pooled φ: d, the theorem's right-hand side and the log values agree
    assert stats["d_intra_over_inter"] == pytest.approx(math.exp(stats["log_d_intra_over_inter"]))
    assert stats["theorem1_rhs"] == pytest.approx(math.exp(stats["log_theorem1_rhs"]))
    assert stats["theorem1_K"] == pytest.approx((14 - 4) / 3 * (8 / 14) + (14 - 3) / 2 * (6 / 14))
