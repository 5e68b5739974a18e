"""NST (Huang & Wang 2017): polynomial-kernel MMD² of channel maps vs numpy loops (the
reference's broadcast form) and hand values, stage pairing, pooling, gradients, state, errors.

Tolerances: the loss against the float64 numpy re-derivation, rel 1e-9 (float64 inputs);
against the hand-computed values, rel 1e-12.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from kdbench.api import ModelOutput, NoParams, UserError
from kdbench_plugins.students.nst import NST
from stand_ins import (adaptive_avg_pool_np, assert_gradients_route, batch_of, make_pair,
                       make_setup, run, setup_from_nets)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ numpy reference
def outputs(maps):
    return ModelOutput(torch.zeros(maps[0].shape[0], 5), list(maps), list(maps),
                       maps[-1].mean((2, 3)))


def mmd_np(fs, ft):
    """One stage: mean_{b,c,c'} k(t̂,t̂) + mean k(ŝ,ŝ) − 2 mean k(ŝ,t̂), k(x,y) = (x·y)², with
    explicit loops over channel pairs."""
    def unit(f):
        f = f.reshape(f.shape[0], f.shape[1], -1)
        return f / np.maximum(np.linalg.norm(f, axis=2, keepdims=True), 1e-12)

    s, t = unit(fs), unit(ft)

    def kmean(a, b):
        vals = [float(a[n, i] @ b[n, j]) ** 2 for n in range(a.shape[0])
                for i in range(a.shape[1]) for j in range(b.shape[1])]
        return sum(vals) / len(vals)

    return kmean(t, t) + kmean(s, s) - 2 * kmean(s, t)


def nst_np(s_maps, t_maps):
    s_maps, t_maps = s_maps[1:], t_maps[1:]
    k = min(len(s_maps), len(t_maps))
    total = 0.0
    for fs, ft in zip(s_maps[-k:], t_maps[-k:]):
        h, w = min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3])
        fs = adaptive_avg_pool_np(fs, h, w) if fs.shape[2:] != (h, w) else fs
        ft = adaptive_avg_pool_np(ft, h, w) if ft.shape[2:] != (h, w) else ft
        total += mmd_np(fs, ft)
    return total


def rand_maps(gen, shapes):
    return [torch.rand(*s, generator=gen, dtype=torch.float64) for s in shapes]


# ------------------------------------------------------------------------------ tests
def test_class_attributes():
    assert NST.default_weight == 50.0  # run_cifar_distill.sh -b 50, mdistiller NST.FEAT_WEIGHT
    assert NST.needs_teacher and NST.views == ()
    assert not NST.teacher_train_mode and not NST.teacher_logits_only


@pytest.mark.parametrize("student_map,teacher_map,want", [
    # ŝ = e1, t̂ = (1, 1)/√2: 1 + 1 − 2·½ = 1
    ([[[[1.0, 0.0]]]], [[[[1.0, 1.0]]]], 1.0),
    # ŝ = (1, 1)/√2; teacher channels e1, e2: mean k(t,t) = ½, k(s,s) = 1, mean k(s,t) = ½ -> ½
    ([[[[1.0, 1.0]]]], [[[[1.0, 0.0]], [[0.0, 1.0]]]], 0.5),
])
def test_hand_values(student_map, teacher_map, want):
    s_map = torch.tensor(student_map, dtype=torch.float64)
    t_map = torch.tensor(teacher_map, dtype=torch.float64)
    s, t = outputs([s_map, s_map]), outputs([t_map, t_map])
    got = NST(NoParams(), make_setup(s, t))(s, t, batch_of(1), {})["nst"].item()
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("geometry", ["same", "teacher_larger", "student_larger", "non_square"])
def test_loss_matches_numpy(geometry):
    gen = torch.Generator().manual_seed(0)
    s_shapes = [(3, 2, 8, 8), (3, 3, 8, 8), (3, 4, 4, 4)]
    t_shapes = {"same": [(3, 5, 8, 8), (3, 6, 8, 8), (3, 7, 4, 4)],
                "teacher_larger": [(3, 5, 8, 8), (3, 6, 16, 16), (3, 7, 8, 8)],
                "student_larger": [(3, 5, 8, 8), (3, 6, 4, 4), (3, 7, 2, 2)],
                "non_square": [(3, 5, 8, 8), (3, 6, 4, 8), (3, 7, 8, 2)]}[geometry]
    s_maps, t_maps = rand_maps(gen, s_shapes), rand_maps(gen, t_shapes)
    s_maps[1][0, 1] = 0.0  # a dead channel: its normalised map is 0 (F.normalize's 1e-12 floor)
    s, t = outputs(s_maps), outputs(t_maps)
    got = NST(NoParams(), make_setup(s, t))(s, t, batch_of(3), {})["nst"].item()
    want = nst_np([f.numpy() for f in s_maps], [f.numpy() for f in t_maps])
    assert want > 1e-3
    assert got == pytest.approx(want, rel=1e-9)


def test_stage_count_mismatch_pairs_the_deepest_stages():
    gen = torch.Generator().manual_seed(1)
    s_maps = rand_maps(gen, [(2, 2, 8, 8), (2, 3, 8, 8), (2, 4, 4, 4)])
    t_maps = rand_maps(gen, [(2, 2, 8, 8), (2, 3, 16, 16), (2, 5, 8, 8), (2, 6, 4, 4)])
    s, t = outputs(s_maps), outputs(t_maps)
    method = NST(NoParams(), make_setup(s, t))
    assert method.num_stages == 2
    got = method(s, t, batch_of(2), {})["nst"].item()
    assert got == pytest.approx(nst_np([f.numpy() for f in s_maps],
                                       [f.numpy() for f in t_maps]), rel=1e-9)


def test_same_channel_distribution_gives_zero():
    gen = torch.Generator().manual_seed(2)
    m = torch.rand(2, 4, 3, 3, generator=gen)
    perm = m[:, [2, 0, 3, 1]] * 3  # channels permuted and scaled: the same set of unit maps
    s, t = outputs([m, m]), outputs([perm, perm])
    assert abs(NST(NoParams(), make_setup(s, t))(s, t, batch_of(2), {})["nst"].item()) < 1e-6


def test_gradients_reach_student_not_teacher_or_classifier():
    student, teacher = make_pair(seed=3, s_chans=(3, 4), t_chans=(5, 6), s_strides=(2, 2))
    method = NST(NoParams(), setup_from_nets(student, teacher))
    terms, _, _ = run(method, student, teacher, torch.randn(4, 3, 8, 8))
    assert set(terms) == {"nst"}
    terms["nst"].backward()
    assert_gradients_route(student, teacher, method)
    assert list(method.parameters()) == []


def test_teacher_term_carries_no_gradient_and_empty_state():
    gen = torch.Generator().manual_seed(4)
    s_map = torch.rand(2, 3, 4, 4, generator=gen, requires_grad=True)
    t_map = torch.rand(2, 5, 4, 4, generator=gen, requires_grad=True)  # not detached on purpose
    s, t = outputs([s_map, s_map]), outputs([t_map, t_map])
    method = NST(NoParams(), make_setup(s, t))
    method(s, t, batch_of(2), {})["nst"].backward()
    # the teacher map still gets the −2·k(s, t) gradient, never the k(t, t) one: compare with a
    # loss in which the teacher-only term is left out entirely
    g_full = t_map.grad.clone()
    t_map.grad = None
    s_n = torch.nn.functional.normalize(s_map.reshape(2, 3, -1), dim=2)
    t_n = torch.nn.functional.normalize(t_map.reshape(2, 5, -1), dim=2)
    (-2 * torch.bmm(s_n, t_n.transpose(1, 2)).pow(2).mean()).backward()
    torch.testing.assert_close(g_full, t_map.grad, rtol=1e-6, atol=1e-9)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    assert len(torch.load(buf, weights_only=True)) == 0  # NST has no state


def test_errors_name_the_problem():
    stem_only = outputs([torch.rand(2, 3, 4, 4)])
    two = outputs([torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)])
    with pytest.raises(UserError, match=r"nst needs at least one stage in feats\[1:\].*teacher 0"):
        NST(NoParams(), make_setup(two, stem_only))
    flat = ModelOutput(torch.zeros(2, 5), [torch.rand(2, 3, 4, 4), torch.rand(2, 6)], [], None)
    with pytest.raises(UserError, match=r"student feats\[1\] has shape \(2, 6\)"):
        NST(NoParams(), make_setup(flat, two))


def test_registers_under_name_nst():
    from kdbench_plugins.students import nst

    seen = {}
    nst.kdbench_register_student_methods(lambda name, factory, **kw: seen.update({name: factory}))
    assert seen == {"nst": NST}
