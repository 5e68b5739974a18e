"""logit_mse: the loss against numpy, its gradient, and that only the student is trained."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdbench.api import Batch, ModelOutput
from kdbench_example.logit_mse import LogitMSE, LogitMSEParams, logit_mse

torch.set_num_threads(1)


def out(logits: torch.Tensor) -> ModelOutput:
    b = logits.shape[0]
    return ModelOutput(logits=logits, feats=[], preact_feats=[], pooled=torch.zeros(b, 1))


def reference(s: np.ndarray, t: np.ndarray, center: bool) -> float:
    """1/(2B) Σ_b Σ_c (s_bc − t_bc)², in float64."""
    s, t = s.astype(np.float64), t.astype(np.float64)
    if center:
        s = s - s.mean(axis=1, keepdims=True)
        t = t - t.mean(axis=1, keepdims=True)
    return float(0.5 * ((s - t) ** 2).sum(axis=1).mean())


@pytest.mark.parametrize("center", [False, True])
def test_loss_matches_numpy(center):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 10, generator=g) * 3
    t = torch.randn(8, 10, generator=g) * 3 + 1.5
    method = LogitMSE(LogitMSEParams(center=center))
    batch = Batch(x=torch.zeros(8, 3, 4, 4), y=torch.zeros(8, dtype=torch.long),
                  index=torch.arange(8))
    terms = method(out(s), out(t), batch, {})
    assert set(terms) == {"logit_mse"}
    np.testing.assert_allclose(terms["logit_mse"].item(), reference(s.numpy(), t.numpy(), center),
                               rtol=1e-5)


def test_centering_ignores_a_per_sample_shift():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    shift = torch.randn(4, 1, generator=g) * 10
    assert logit_mse(s + shift, t, center=True).item() == pytest.approx(
        logit_mse(s, t, center=True).item(), rel=1e-5)
    assert logit_mse(s + shift, t).item() > logit_mse(s, t).item()
    assert logit_mse(t.clone(), t).item() == 0.0


def test_gradient_is_the_residual_over_batch_size():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(6, 7, generator=g, requires_grad=True)
    t = torch.randn(6, 7, generator=g)
    logit_mse(s, t).backward()
    expected = (s.detach().numpy() - t.numpy()) / 6
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_gradients_reach_only_the_student():
    torch.manual_seed(3)
    student, teacher = nn.Linear(12, 5), nn.Linear(12, 5)
    x = torch.randn(4, 12)
    # The teacher is deliberately left trainable: the loss itself must not send it gradients.
    method = LogitMSE(LogitMSEParams())
    loss = method(out(student(x)), out(teacher(x)), None, {})["logit_mse"]
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert student.bias.grad is not None
    assert teacher.weight.grad is None and teacher.bias.grad is None
    assert list(method.parameters()) == []  # nothing of its own to train


def test_params_reject_unknown_keys():
    assert LogitMSEParams.model_validate({}).center is False
    with pytest.raises(Exception):
        LogitMSEParams.model_validate({"centre": True})


def test_kdbench_finds_it_through_the_entry_point(monkeypatch):
    from importlib import metadata

    try:
        dist = metadata.distribution("kdbench-example")
    except metadata.PackageNotFoundError:
        pytest.skip("kdbench-example is not installed (pip install -e examples/kdbench-example)")
    from kdbench.registry import load_registry

    monkeypatch.setenv("KDBENCH_ONLY_DISTS", f"kdbench,{dist.name}")
    reg = load_registry()
    assert [b for b in reg.broken if b.dist == dist.name] == []
    plugin = reg.find("student_method", "logit_mse")
    assert plugin.factory is LogitMSE and plugin.params is LogitMSEParams
    assert plugin.dist == dist.name and plugin.version == dist.version
