"""AB (Heo et al. 2019): the alternative L2 vs a plain loop and a hand value, the stage weights,
the connectors' geometry, what trains in the init stage (connectors and the student's feature
layers, never the classifier or the teacher), no main-stage term, state, errors, and a real run
whose init stage comes before the main schedule.

Tolerances: hand value rel 1e-12 (float64); the plain loop over every element (float64) rel 1e-9
(the same sums in another order).
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from kdbench.api import ModelOutput, UserError
from kdbench_plugins.students.ab import AB, ABParams, Connector
from stage_runs import pair_outputs, run as run_recipe, stage_recipe, student_record
from stand_ins import batch, batch_of, make_pair, make_setup, setup_from_nets

torch.set_num_threads(1)


def outputs(maps):
    """A ModelOutput whose preact_feats (and feats) are ``maps`` (stem first)."""
    return ModelOutput(torch.zeros(maps[0].shape[0], 5), list(maps), list(maps), maps[-1].mean((2, 3)))


def ab_loop(sources, targets, margin=1.0):
    """Σ_i 2^(i−k+1) / B · 3/1000 · Σ_elements of the alternative L2, one element at a time."""
    k, b = len(sources), sources[0].shape[0]
    total = 0.0
    for i, (s, t) in enumerate(zip(sources, targets)):
        c = 0.0
        for sv, tv in zip(np.asarray(s, dtype=np.float64).ravel(), np.asarray(t, dtype=np.float64).ravel()):
            if tv <= 0 and sv > -margin:
                c += (sv + margin) ** 2
            elif tv > 0 and sv <= margin:
                c += (sv - margin) ** 2
        total += 2.0 ** (i - k + 1) * c / b * 3 / 1000
    return total


def test_class_attributes_and_defaults():
    assert AB.default_weight == 1.0  # run_cifar_distill.sh -b 1
    assert AB.needs_teacher and AB.views == () and not AB.teacher_train_mode
    p = ABParams()
    assert (p.margin, p.init_epochs, p.init_lr) == (1.0, 30, None)


def test_hand_value():
    # s = (0.5, −2, 0.5, 2), t = (1, −1, −1, 2), m = 1: (0.5 − 1)² + 0 + (0.5 + 1)² + 0 = 2.5;
    # one stage (weight 1), B = 1: 2.5 · 3/1000 = 0.0075
    stem = torch.zeros(1, 4, 1, 1, dtype=torch.float64)
    s = outputs([stem, torch.tensor([0.5, -2, 0.5, 2], dtype=torch.float64).view(1, 4, 1, 1)])
    t = outputs([stem, torch.tensor([1.0, -1, -1, 2], dtype=torch.float64).view(1, 4, 1, 1)])
    method = AB(ABParams(), make_setup(s, t))
    assert isinstance(method.connectors[0].map, nn.Identity)  # equal channels and size
    got = method.stage_loss(s, t, batch_of(1))["ab"].item()
    assert got == pytest.approx(0.0075, rel=1e-12)


@pytest.mark.parametrize("margin", [1.0, 0.3])
def test_loss_matches_a_plain_loop_with_stage_weights(margin):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 2, 8, 8), (3, 4, 8, 8), (3, 5, 4, 4), (3, 6, 2, 2)]  # three stages, equal to the teacher's
    s = outputs([torch.randn(*sh, generator=gen, dtype=torch.float64) for sh in shapes])
    t = outputs([torch.randn(*sh, generator=gen, dtype=torch.float64) for sh in shapes])
    method = AB(ABParams(margin=margin), make_setup(s, t))
    got = method.stage_loss(s, t, batch_of(3))["ab"].item()
    want = ab_loop([f.numpy() for f in s.feats[1:]], [f.numpy() for f in t.feats[1:]], margin)
    assert want > 1e-3 and got == pytest.approx(want, rel=1e-9)
    # The weights 1/4, 1/2, 1 (deepest 1): the deepest stage alone is ab_loop of one pair.
    deep = ab_loop([s.feats[3].numpy()], [t.feats[3].numpy()], margin)
    shallow = ab_loop([s.feats[1].numpy()], [t.feats[1].numpy()], margin) / 4
    mid = ab_loop([s.feats[2].numpy()], [t.feats[2].numpy()], margin) / 2
    assert got == pytest.approx(deep + mid + shallow, rel=1e-9)


@pytest.mark.parametrize("s_hw,t_hw,pooled", [(8, 8, False), (8, 4, False), (4, 8, False), (8, 6, False),
                                             (4, 12, True)])
def test_connector_geometry(s_hw, t_hw, pooled):
    conn = Connector((2, 3, s_hw, s_hw), (2, 5, t_hw, t_hw))
    t = torch.randn(2, 5, t_hw, t_hw)
    out, target = conn(torch.randn(2, 3, s_hw, s_hw)), conn.target(t)
    assert out.shape == target.shape
    assert (conn.pool_teacher is not None) == pooled
    assert not any(isinstance(m, nn.ReLU) for m in conn.modules())  # pre-ReLU targets: no ReLU


def test_connected_loss_matches_a_plain_loop_on_the_connector_outputs():
    student, teacher = make_pair(seed=1, s_chans=(3, 4), t_chans=(5, 6), s_strides=(2, 2), t_strides=(1, 2))
    method = AB(ABParams(), setup_from_nets(student, teacher))
    x = torch.randn(4, 3, 8, 8)
    method.train()
    s_out, t_out = pair_outputs(student, teacher, x)
    got = method.stage_loss(s_out, t_out, batch(x))["ab"].item()
    sources = [c(f).detach().numpy() for c, f in zip(method.connectors, s_out.preact_feats[1:])]
    targets = [c.target(f).numpy() for c, f in zip(method.connectors, t_out.preact_feats[1:])]
    assert got == pytest.approx(ab_loop(sources, targets), rel=1e-5)  # float32 nets


def test_init_stage_trains_connectors_and_student_features_only():
    student, teacher = make_pair(seed=2, s_chans=(3, 4), t_chans=(5, 6))
    method = AB(ABParams(init_epochs=2, init_lr=0.02), setup_from_nets(student, teacher))
    stage = method.init_stage()
    assert (stage.epochs, stage.lr, stage.student_train_mode) == (2, 0.02, True)
    assert stage.modules[0] is method.connectors and stage.modules[1] is student
    assert not any(p is q for p in method.parameters() for q in student.parameters())
    x = torch.randn(4, 3, 8, 8)
    s_out, t_out = pair_outputs(student, teacher, x)
    terms = stage.loss(s_out, t_out, batch(x))
    assert set(terms) == {"ab"}
    terms["ab"].backward()
    for name, p in list(student.named_parameters()) + list(method.named_parameters()):
        if name.startswith("fc."):
            assert p.grad is None, name  # the classifier is not trained by the stage
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())
    # No stage at init_epochs = 0.
    assert AB(ABParams(init_epochs=0), setup_from_nets(student, teacher)).init_stage() is None


def test_main_stage_adds_no_term():
    student, teacher = make_pair(seed=3)
    method = AB(ABParams(), setup_from_nets(student, teacher))
    x = torch.randn(2, 3, 8, 8)
    assert method(student(x), teacher(x), batch(x), {}) == {}


def test_state_round_trip():
    student, teacher = make_pair(seed=4, s_chans=(3, 4), t_chans=(5, 6))
    setup = setup_from_nets(student, teacher)
    method = AB(ABParams(), setup)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p))
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(99)
    other = AB(ABParams(), setup)
    other.load_state_dict(torch.load(buf, weights_only=True))
    method.eval(), other.eval(), student.eval()
    x = torch.randn(3, 3, 8, 8)
    s_out, t_out = student(x), teacher(x)
    a, b = method.stage_loss(s_out, t_out, batch(x))["ab"], other.stage_loss(s_out, t_out, batch(x))["ab"]
    assert a.item() == b.item() and math.isfinite(a.item())


def test_errors_name_the_problem():
    stem_only = outputs([torch.rand(2, 3, 4, 4)])
    two = outputs([torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)])
    with pytest.raises(UserError, match=r"ab needs at least one stage in preact_feats\[1:\].*student has 0"):
        AB(ABParams(), make_setup(stem_only, two))
    with pytest.raises(ValueError):
        ABParams(margin=0)


def test_a_run_trains_the_stage_first(tiny_recipe, tmp_path):
    """Through the engine: the stage's epoch is recorded before the main schedule's, with the
    AB term; the main schedule has CE only."""
    out = tmp_path / "ab_runs"
    recipe = stage_recipe(tiny_recipe, "ab", '{ name = "ab", init_epochs = 1 }', out)
    assert run_recipe(recipe) == 0
    rec = student_record(out)
    (epoch,) = rec["init_stages"]["ab"]["epochs"]
    assert epoch["epoch"] == 1 and math.isfinite(epoch["loss_ab"]) and epoch["loss_ab"] > 0
    assert "test_top1" in epoch
    assert {k for k in rec["epochs"][0] if k.startswith("loss_")} == {"loss_ce"}


def test_registers_under_name_ab():
    from kdbench_plugins.students import ab

    seen = {}
    ab.kdbench_register_student_methods(lambda name, factory, **kw: seen.update({name: factory}))
    assert seen == {"ab": AB}
