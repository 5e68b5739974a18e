"""AT (Zagoruyko & Komodakis 2017): attention maps vs numpy loops and a hand value, stage
pairing, pooling, gradients, state, errors.

Tolerances: the loss against the float64 numpy re-derivation, rel 1e-6 on float64 inputs (the
same sums in another order); against the hand-computed value, rel 1e-12 (float64).
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from kdbench.api import ModelOutput, UserError
from kdbench_plugins.students.at import AT, ATParams
from stand_ins import (adaptive_avg_pool_np, assert_gradients_route, batch_of, make_pair,
                       make_setup, run, setup_from_nets)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ numpy reference
def outputs(maps):
    """A ModelOutput whose feats (and preact_feats) are ``maps`` (stem first), zero logits."""
    return ModelOutput(torch.zeros(maps[0].shape[0], 5), list(maps), list(maps),
                       maps[-1].mean((2, 3)))


def attention_np(f, p):
    """(B, H·W): channel mean of f^p at each position, divided by its L2 norm (floor 1e-12)."""
    b, c, h, w = f.shape
    out = np.zeros((b, h * w))
    for i in range(b):
        q = np.array([sum(f[i, ch, y, x] ** p for ch in range(c)) / c
                      for y in range(h) for x in range(w)])
        out[i] = q / max(math.sqrt(float((q ** 2).sum())), 1e-12)
    return out


def at_np(s_maps, t_maps, p=2.0):
    """Σ over the deepest min(n_s, n_t) stage pairs (stem excluded) of the mean squared
    difference of the attention maps, each pair pooled to (min H, min W)."""
    s_maps, t_maps = s_maps[1:], t_maps[1:]
    k = min(len(s_maps), len(t_maps))
    total = 0.0
    for fs, ft in zip(s_maps[-k:], t_maps[-k:]):
        h, w = min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3])
        fs = adaptive_avg_pool_np(fs, h, w) if fs.shape[2:] != (h, w) else fs
        ft = adaptive_avg_pool_np(ft, h, w) if ft.shape[2:] != (h, w) else ft
        d = attention_np(fs, p) - attention_np(ft, p)
        total += float((d ** 2).sum()) / d.size
    return total


def rand_maps(gen, shapes):
    return [torch.rand(*s, generator=gen, dtype=torch.float64) for s in shapes]


# ------------------------------------------------------------------------------ tests
def test_class_attributes():
    assert AT.default_weight == 1000.0  # run_cifar_distill.sh -b 1000, mdistiller AT.FEAT_WEIGHT
    assert AT.needs_teacher and AT.views == ()
    assert not AT.teacher_train_mode and not AT.teacher_logits_only
    assert ATParams().p == 2.0


def test_hand_value():
    # student stage [1, 0] -> a = (1, 0); teacher [1, 1] -> a = (1, 1)/√2;
    # mean of squared differences = ((1 − 1/√2)² + 1/2) / 2 = 1 − 1/√2
    stem = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    s = outputs([stem, torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)])
    t = outputs([stem, torch.tensor([[[[1.0, 1.0]]]], dtype=torch.float64)])
    method = AT(ATParams(), make_setup(s, t))
    got = method(s, t, batch_of(1), {})["at"].item()
    assert got == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-12)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
@pytest.mark.parametrize("geometry", ["same", "teacher_larger", "student_larger", "non_square"])
def test_loss_matches_numpy(p, geometry):
    gen = torch.Generator().manual_seed(0)
    s_shapes = [(3, 2, 8, 8), (3, 3, 8, 8), (3, 4, 4, 4)]
    t_shapes = {"same": [(3, 5, 8, 8), (3, 6, 8, 8), (3, 7, 4, 4)],
                "teacher_larger": [(3, 5, 8, 8), (3, 6, 16, 16), (3, 7, 8, 8)],
                "student_larger": [(3, 5, 8, 8), (3, 6, 4, 4), (3, 7, 2, 2)],
                "non_square": [(3, 5, 8, 8), (3, 6, 4, 8), (3, 7, 8, 2)]}[geometry]
    s, t = outputs(rand_maps(gen, s_shapes)), outputs(rand_maps(gen, t_shapes))
    method = AT(ATParams(p=p), make_setup(s, t))
    got = method(s, t, batch_of(3), {})["at"].item()
    want = at_np([f.numpy() for f in s.feats], [f.numpy() for f in t.feats], p)
    assert want > 1e-4
    assert got == pytest.approx(want, rel=1e-6)


def test_stage_count_mismatch_pairs_the_deepest_stages():
    gen = torch.Generator().manual_seed(1)
    s = outputs(rand_maps(gen, [(2, 2, 8, 8), (2, 3, 8, 8), (2, 4, 4, 4)]))  # 2 stages
    t = outputs(rand_maps(gen, [(2, 2, 8, 8), (2, 3, 16, 16), (2, 5, 8, 8), (2, 6, 4, 4)]))  # 3
    method = AT(ATParams(), make_setup(s, t))
    assert method.num_stages == 2
    got = method(s, t, batch_of(2), {})["at"].item()
    want = at_np([f.numpy() for f in s.feats], [f.numpy() for f in t.feats])
    shallow = at_np([f.numpy() for f in s.feats], [f.numpy() for f in t.feats[:3]])
    assert got == pytest.approx(want, rel=1e-6)
    assert abs(want - shallow) > 1e-3  # the reference's zip pairing would give another number


def test_identical_attention_gives_zero_and_scale_invariance():
    gen = torch.Generator().manual_seed(2)
    maps = rand_maps(gen, [(2, 3, 4, 4), (2, 3, 4, 4), (2, 5, 2, 2)])
    s = outputs(maps)
    t = outputs([m * 7 for m in maps])  # a positive scale leaves the normalised maps unchanged
    method = AT(ATParams(), make_setup(s, t))
    assert method(s, t, batch_of(2), {})["at"].item() < 1e-12


def test_gradients_reach_student_not_teacher_or_classifier():
    student, teacher = make_pair(seed=3, s_chans=(3, 4), t_chans=(5, 6))
    method = AT(ATParams(), setup_from_nets(student, teacher))
    terms, _, _ = run(method, student, teacher, torch.randn(4, 3, 8, 8))
    assert set(terms) == {"at"}
    terms["at"].backward()
    assert_gradients_route(student, teacher, method)  # AT reads feats[1:], not the logits
    assert list(method.parameters()) == []


def test_inference_mode_teacher_and_empty_state():
    gen = torch.Generator().manual_seed(4)
    s_maps = [m.requires_grad_() for m in rand_maps(gen, [(2, 2, 4, 4), (2, 3, 4, 4)])]
    with torch.inference_mode():
        t = outputs(rand_maps(gen, [(2, 2, 4, 4), (2, 4, 4, 4)]))
    s = outputs(s_maps)
    method = AT(ATParams(), make_setup(s, t))
    method(s, t, batch_of(2), {})["at"].backward()
    assert s_maps[1].grad is not None and torch.isfinite(s_maps[1].grad).all()
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert len(state) == 0  # AT has no state
    AT(ATParams(), make_setup(s, t)).load_state_dict(state)


def test_errors_name_the_problem():
    stem_only = outputs([torch.rand(2, 3, 4, 4)])
    two = outputs([torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)])
    with pytest.raises(UserError,
                       match=r"at needs at least one stage in feats\[1:\].*student has 0"):
        AT(ATParams(), make_setup(stem_only, two))
    flat = ModelOutput(torch.zeros(2, 5), [torch.rand(2, 3, 4, 4), torch.rand(2, 6)], [], None)
    with pytest.raises(UserError, match=r"teacher feats\[1\] has shape \(2, 6\)"):
        AT(ATParams(), make_setup(two, flat))
    with pytest.raises(ValueError):
        ATParams(p=0)


def test_registers_under_name_at():
    from kdbench_plugins.students import at

    seen = {}
    at.kdbench_register_student_methods(lambda name, factory, **kw: seen.update({name: factory}))
    assert seen == {"at": AT}
