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
