"""SP (Tung & Mori 2019): similarity matrices vs plain loops and a hand value, which map is
used, gradients, state, errors.

Tolerances: the loss against the float64 plain-loop re-derivation, rel 1e-9 (float64 inputs);
against the hand-computed value, rel 1e-12.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from kdbench.api import ModelOutput, NoParams, UserError
from kdbench_plugins.students.sp import SP
from stand_ins import assert_gradients_route, batch_of, make_pair, make_setup, run, setup_from_nets

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ plain reference
def outputs(maps):
    return ModelOutput(torch.zeros(maps[0].shape[0], 5), list(maps), list(maps),
                       maps[-1].mean((2, 3)))


def sp_loops(s, t):
    """Tung & Mori Eq. 2-4 with the reference's row normalisation (plain Python loops)."""
    s = [list(np.asarray(x, dtype=np.float64).ravel()) for x in s]
    t = [list(np.asarray(x, dtype=np.float64).ravel()) for x in t]
    b = len(s)

    def normalised_gram(f):
        g = [[sum(x * y for x, y in zip(f[i], f[j])) for j in range(b)] for i in range(b)]
        out = []
        for row in g:
            n = max(math.sqrt(sum(v * v for v in row)), 1e-12)
            out.append([v / n for v in row])
        return out

    gs, gt = normalised_gram(s), normalised_gram(t)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


# ------------------------------------------------------------------------------ tests
def test_class_attributes():
    assert SP.default_weight == 3000.0  # run_cifar_distill.sh -b 3000, mdistiller SP.FEAT_WEIGHT
    assert SP.needs_teacher and SP.views == ()
    assert not SP.teacher_train_mode and not SP.teacher_logits_only


def test_hand_value():
    # student rows e1, e2: Ĝ_s = I; teacher rows e1, e1: Ĝ_t = all 1/√2;
    # ‖Ĝ_t − Ĝ_s‖² = 2(1/√2 − 1)² + 2·(1/2) = 4 − 2√2, over B² = 4 -> 1 − √2/2
    stem = torch.zeros(2, 1, 1, 2, dtype=torch.float64)
    s = outputs([stem, torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]], dtype=torch.float64)])
    t = outputs([stem, torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]], dtype=torch.float64)])
    got = SP(NoParams(), make_setup(s, t))(s, t, batch_of(2), {})["sp"].item()
    assert got == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-12)


@pytest.mark.parametrize("t_shape", [(5, 6, 4, 4), (5, 3, 8, 8), (5, 9, 2, 2)])
def test_loss_matches_loops_on_the_last_map_only(t_shape):
    gen = torch.Generator().manual_seed(0)
    s_maps = [torch.rand(5, 2, 8, 8, generator=gen, dtype=torch.float64),
              torch.rand(5, 4, 4, 4, generator=gen, dtype=torch.float64)]
    t_maps = [torch.rand(5, 2, 8, 8, generator=gen, dtype=torch.float64),
              torch.rand(5, 3, 8, 8, generator=gen, dtype=torch.float64),
              torch.rand(*t_shape, generator=gen, dtype=torch.float64)]
    s_maps[-1][2] = 0.0  # a sample whose whole map is 0: a zero row, kept at 0 by the 1e-12 floor
    s, t = outputs(s_maps), outputs(t_maps)
    method = SP(NoParams(), make_setup(s, t))
    got = method(s, t, batch_of(5), {})["sp"].item()
    want = sp_loops(s_maps[-1].numpy(), t_maps[-1].numpy())
    assert want > 1e-3
    assert got == pytest.approx(want, rel=1e-9)
    # only feats[-1] matters: changing the earlier maps changes nothing
    s2 = outputs([s_maps[0] * 0 + 1, s_maps[1]])
    assert method(s2, t, batch_of(5), {})["sp"].item() == pytest.approx(got, rel=1e-12)


def test_identical_similarities_give_zero():
    gen = torch.Generator().manual_seed(1)
    m = torch.rand(4, 3, 2, 2, generator=gen)
    s, t = outputs([m, m]), outputs([m, 5 * m])  # a positive scale: the same normalised rows
    assert SP(NoParams(), make_setup(s, t))(s, t, batch_of(4), {})["sp"].item() < 1e-12


def test_gradients_reach_student_not_teacher_or_classifier():
    student, teacher = make_pair(seed=2, s_chans=(3, 4), t_chans=(5, 6), t_strides=(2, 2))
    method = SP(NoParams(), setup_from_nets(student, teacher))
    terms, _, _ = run(method, student, teacher, torch.randn(4, 3, 8, 8))
    assert set(terms) == {"sp"}
    terms["sp"].backward()
    assert_gradients_route(student, teacher, method)  # feats[-1] depends on every layer but fc
    assert list(method.parameters()) == []


def test_inference_mode_teacher_and_empty_state():
    gen = torch.Generator().manual_seed(3)
    m = torch.rand(3, 2, 4, 4, generator=gen, requires_grad=True)
    with torch.inference_mode():
        t = outputs([torch.rand(3, 2, 4, 4, generator=gen), torch.rand(3, 5, 2, 2, generator=gen)])
    s = outputs([m.detach(), m])
    method = SP(NoParams(), make_setup(s, t))
    method(s, t, batch_of(3), {})["sp"].backward()
    assert m.grad is not None and torch.isfinite(m.grad).all()
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    assert len(torch.load(buf, weights_only=True)) == 0  # SP has no state


def test_errors_name_the_problem():
    stem_only = outputs([torch.rand(2, 3, 4, 4)])
    two = outputs([torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)])
    with pytest.raises(UserError, match=r"sp needs a stage map in feats\[1:\] of the teacher"):
        SP(NoParams(), make_setup(two, stem_only))
    method = SP(NoParams(), make_setup(two, two))
    three = outputs([torch.rand(3, 3, 4, 4), torch.rand(3, 3, 4, 4)])
    with pytest.raises(UserError, match=r"student batch 2 != teacher batch 3"):
        method(two, three, batch_of(2), {})


def test_registers_under_name_sp():
    from kdbench_plugins.students import sp

    seen = {}
    sp.kdbench_register_student_methods(lambda name, factory, **kw: seen.update({name: factory}))
    assert seen == {"sp": SP}
