"""FSP (Yim et al. 2017): the FSP matrices and loss vs a plain loop and a hand value, pooling
between maps of different sizes, what trains in the init stage (the student's feature layers,
never its classifier or the teacher), no main-stage term, the refusal of unequal channels,
no state, and a real run whose init stage comes before the main schedule.

Tolerances: hand value rel 1e-12 (float64); the plain loop (float64) rel 1e-9.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from kdbench.api import ModelOutput, UserError
from kdbench_plugins.students.fsp import FSP, FSPParams
from stage_runs import pair_outputs, run as run_recipe, stage_recipe, student_record
from stand_ins import adaptive_avg_pool_np, batch, batch_of, make_pair, make_setup, setup_from_nets

torch.set_num_threads(1)


def outputs(maps):
    return ModelOutput(torch.zeros(maps[0].shape[0], 5), list(maps), list(maps), maps[-1].mean((2, 3)))


def fsp_matrix_loop(bottom, top):
    """G[b, j, i] = mean over positions of top[b, j] · bottom[b, i], the larger map pooled."""
    h, w = min(bottom.shape[2], top.shape[2]), min(bottom.shape[3], top.shape[3])
    if bottom.shape[2:] != (h, w):
        bottom = adaptive_avg_pool_np(bottom, h, w)
    if top.shape[2:] != (h, w):
        top = adaptive_avg_pool_np(top, h, w)
    b, c1, c2 = bottom.shape[0], bottom.shape[1], top.shape[1]
    g = np.zeros((b, c2, c1))
    for n in range(b):
        for j in range(c2):
            for i in range(c1):
                g[n, j, i] = sum(top[n, j, y, x] * bottom[n, i, y, x] for y in range(h) for x in range(w)) / (h * w)
    return g


def fsp_loop(s_maps, t_maps):
    total = 0.0
    for l in range(len(s_maps) - 1):
        d = fsp_matrix_loop(s_maps[l], s_maps[l + 1]) - fsp_matrix_loop(t_maps[l], t_maps[l + 1])
        total += float((d ** 2).sum()) / d.size
    return total


def test_class_attributes_and_defaults():
    assert FSP.default_weight == 50.0  # run_cifar_distill.sh -b 50 (multiplies no term)
    assert FSP.needs_teacher and FSP.views == () and not FSP.teacher_train_mode
    assert (FSPParams().init_epochs, FSPParams().init_lr) == (30, None)


def test_hand_value():
    # One sample, maps of one channel at 2 positions: student bottom (1, 2), top (3, 1) ->
    # G = (1·3 + 2·1)/2 = 2.5; teacher bottom (1, 1), top (1, 1) -> G = 1; loss = 1.5² = 2.25
    f = lambda v: torch.tensor(v, dtype=torch.float64).view(1, 1, 1, 2)  # noqa: E731
    s, t = outputs([f([1, 2]), f([3, 1])]), outputs([f([1, 1]), f([1, 1])])
    method = FSP(FSPParams(), make_setup(s, t))
    assert method.stage_loss(s, t, batch_of(1))["fsp"].item() == pytest.approx(2.25, rel=1e-12)


@pytest.mark.parametrize("geometry", ["same", "teacher_larger", "non_square"])
def test_loss_matches_a_plain_loop(geometry):
    gen = torch.Generator().manual_seed(0)
    s_shapes = [(2, 2, 8, 8), (2, 3, 8, 8), (2, 4, 4, 4)]
    t_shapes = {"same": s_shapes, "teacher_larger": [(2, 2, 16, 16), (2, 3, 8, 8), (2, 4, 8, 8)],
                "non_square": [(2, 2, 8, 4), (2, 3, 4, 8), (2, 4, 4, 2)]}[geometry]
    s = outputs([torch.randn(*sh, generator=gen, dtype=torch.float64) for sh in s_shapes])
    t = outputs([torch.randn(*sh, generator=gen, dtype=torch.float64) for sh in t_shapes])
    method = FSP(FSPParams(), make_setup(s, t))
    got = method.stage_loss(s, t, batch_of(2))["fsp"].item()
    want = fsp_loop([f.numpy() for f in s.feats], [f.numpy() for f in t.feats])
    assert want > 1e-3 and got == pytest.approx(want, rel=1e-9)


def test_unequal_channels_or_map_counts_are_refused():
    gen = torch.Generator().manual_seed(1)
    s = outputs([torch.rand(2, 2, 4, 4, generator=gen), torch.rand(2, 3, 4, 4, generator=gen)])
    wider = outputs([torch.rand(2, 2, 4, 4, generator=gen), torch.rand(2, 5, 4, 4, generator=gen)])
    deeper = outputs([*s.feats, torch.rand(2, 3, 2, 2, generator=gen)])
    for t in (wider, deeper):
        with pytest.raises(UserError, match=r"fsp .* same channel count .*student \[2, 3\]"):
            FSP(FSPParams(), make_setup(s, t))
    flat = ModelOutput(torch.zeros(2, 5), [torch.rand(2, 3, 4, 4), torch.rand(2, 6)], [], None)
    with pytest.raises(UserError, match=r"teacher feats\[1\] has shape \(2, 6\)"):
        FSP(FSPParams(), make_setup(s, flat))


def test_init_stage_trains_the_student_features_only():
    student, teacher = make_pair(seed=2, s_chans=(3, 4), t_chans=(3, 4))
    method = FSP(FSPParams(init_epochs=3), setup_from_nets(student, teacher))
    stage = method.init_stage()
    assert (stage.epochs, stage.lr, stage.student_train_mode) == (3, None, True)
    assert stage.modules == [student] and list(method.parameters()) == []
    x = torch.randn(4, 3, 8, 8)
    s_out, t_out = pair_outputs(student, teacher, x)
    terms = stage.loss(s_out, t_out, batch(x))
    assert set(terms) == {"fsp"}
    terms["fsp"].backward()
    for name, p in student.named_parameters():
        if name.startswith("fc."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())
    assert FSP(FSPParams(init_epochs=0), setup_from_nets(student, teacher)).init_stage() is None


def test_main_stage_adds_no_term_and_there_is_no_state():
    student, teacher = make_pair(seed=3, s_chans=(3, 4), t_chans=(3, 4))
    setup = setup_from_nets(student, teacher)
    method = FSP(FSPParams(), setup)
    x = torch.randn(2, 3, 8, 8)
    assert method(student(x), teacher(x), batch(x), {}) == {}
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert len(state) == 0  # the student is not part of the method's state
    FSP(FSPParams(), setup).load_state_dict(state)


def test_a_run_trains_the_stage_first(tiny_recipe, tmp_path):
    out = tmp_path / "fsp_runs"
    recipe = stage_recipe(tiny_recipe, "fsp", '{ name = "fsp", init_epochs = 1 }', out)
    assert run_recipe(recipe) == 0
    rec = student_record(out)
    (epoch,) = rec["init_stages"]["fsp"]["epochs"]
    assert epoch["epoch"] == 1 and math.isfinite(epoch["loss_fsp"]) and epoch["loss_fsp"] > 0
    assert {k for k in rec["epochs"][0] if k.startswith("loss_")} == {"loss_ce"}


def test_registers_under_name_fsp():
    from kdbench_plugins.students import fsp

    seen = {}
    fsp.kdbench_register_student_methods(lambda name, factory, **kw: seen.update({name: factory}))
    assert seen == {"fsp": FSP}
