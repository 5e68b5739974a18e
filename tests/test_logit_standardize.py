"""Logit standardisation (Sun et al. 2024), the ``logit_standardize`` option of kd, dkd, mlld,
dist and ctkd: the z-score against numpy and by hand, its invariances, that every method applies
the one shared function (its loss with the option = its loss without it on z-scored logits,
× ls_scale), the LS reference's temperatures and weights filled in, and run ids unchanged for
recipes that leave the option at its default.

Tolerances: z-score vs numpy float64 rel 1e-6; by hand rel 1e-6; invariances rel 1e-5
(float32 softmax of shifted / scaled copies); "the option = z-scored inputs without it": exact
(the same float32 operations on the same values) where the method's loss starts from the logits
(kd, dkd, dist, ctkd), rel 1e-6 for mlld (its instance level is compared term by term)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench.api import Batch, ModelOutput, UserError
from kdbench.recipe import expand, load_recipe
from kdbench.recipe.grid import _hash, resolved
from kdbench_plugins.students._logits import LS_EPS, standardize_logits
from kdbench_plugins.students.ctkd import CTKD, CTKDParams
from kdbench_plugins.students.dist import DIST, DISTParams
from kdbench_plugins.students.dkd import DKD, DKDParams
from kdbench_plugins.students.kd import KD, KDParams, kd_loss
from kdbench_plugins.students.mlld import MLLD, MLLDParams
from stand_ins import make_setup

torch.set_num_threads(1)
METHODS = {"kd": (KD, KDParams), "dkd": (DKD, DKDParams), "mlld": (MLLD, MLLDParams),
           "dist": (DIST, DISTParams), "ctkd": (CTKD, CTKDParams)}
# What each method's LS mode fills in (the LS reference: tools/train.py, cfg.py, CTKD script).
LS_DEFAULTS = {"kd": {"temperature": 2.0, "ls_scale": 10.0},
               "dkd": {"temperature": 2.0, "ls_scale": 9.0},
               "mlld": {"ls_scale": 10.0},
               "dist": {"ls_scale": 1.0},
               "ctkd": {"ls_scale": 10.0}}
# resolved() of kd's and mlld's default parameters, and their hashes, recorded before the
# option was added (at c6f646c): run ids of every existing recipe depend on them.
BEFORE = {
    "kd": ({"temperature": 4.0}, "5fb0e230ec2e6154"),
    "mlld": ({"temperatures": [2.0, 3.0, 4.0, 5.0, 6.0], "kd_weight": 0.9,
              "ce_weight_strong": 0.1, "strong_levels": ["instance"],
              "reference_quirks": False}, "fac273b961545b75"),
}


def np_z(a):
    a = np.asarray(a, dtype=np.float64)
    return (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-7)


def fixed(b=6, c=7, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(b, c, generator=g) * scale, torch.randn(b, c, generator=g) * scale + 1
    return s, t, torch.randint(0, c, (b,), generator=g)


def out(logits):
    return ModelOutput(logits, [], [], torch.zeros(logits.shape[0], 1))


def terms_of(name, s, t, y, extra_logits=None, **kw):
    factory, params = METHODS[name]
    method = factory(params(**kw), make_setup(None, None))
    batch = Batch(x=torch.zeros(len(y), 3, 4, 4), y=y, index=torch.arange(len(y)), epoch=30,
                  epochs=40)
    extra = {"strong": (out(extra_logits[0]), out(extra_logits[1]))} if name == "mlld" else {}
    return method(out(s), out(t), batch, extra)


# ------------------------------------------------------------------------------ the z-score
def test_standardize_matches_numpy():
    s, _, _ = fixed(8, 10, 1)
    got = standardize_logits(s)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np_z(s.numpy()), rtol=1e-6, atol=1e-6)


def test_standardize_by_hand():
    """(1, 2, 3): mean 2, unbiased std 1 → (−1, 0, 1)/(1 + 1e-7); (0, 0, 4, 4): mean 2,
    unbiased std √(16/3) → ±2/(√(16/3) + 1e-7)."""
    got = standardize_logits(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
    assert got.tolist()[0] == pytest.approx([-1 / (1 + LS_EPS), 0.0, 1 / (1 + LS_EPS)], rel=1e-12)
    got = standardize_logits(torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    d = 2 / ((16 / 3) ** 0.5 + 1e-7)
    assert got.tolist()[0] == pytest.approx([-d, -d, d, d], rel=1e-6)
    assert LS_EPS == 1e-7


def test_standardize_invariances_and_constant_rows():
    """Invariant to a per-sample shift and positive scale of the logits (the paper's point);
    a constant row becomes 0 (std 0, + ε), not NaN."""
    s, _, _ = fixed(5, 9, 2)
    a = standardize_logits(s)
    b = standardize_logits(3.0 * s + torch.arange(5.0)[:, None])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(standardize_logits(torch.full((2, 4), 7.0)), torch.zeros(2, 4))
    with pytest.raises(UserError, match="classes"):
        standardize_logits(torch.zeros(3, 1))


def test_kd_with_the_option_ignores_the_student_logits_scale():
    s, t, _ = fixed()
    a = kd_loss(s, t, 2.0, standardize=True)
    b = kd_loss(2.5 * s - 4.0, t, 2.0, standardize=True)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert kd_loss(s, t, 2.0).item() != pytest.approx(kd_loss(2.5 * s, t, 2.0).item(), rel=1e-2)


# ------------------------------------------------------------------------------ one function
@pytest.mark.parametrize("name", ["kd", "dkd", "dist", "ctkd"])
def test_option_equals_the_method_on_z_scored_logits(name):
    s, t, y = fixed(6, 7, 3)
    on = terms_of(name, s, t, y, logit_standardize=True, ls_scale=1.0)
    base = {k: v for k, v in LS_DEFAULTS[name].items() if k != "ls_scale"}  # e.g. T = 2
    off = terms_of(name, standardize_logits(s), standardize_logits(t), y, **base)
    assert set(on) == set(off)
    for k in on:
        assert torch.equal(on[k], off[k]), k
    scaled = terms_of(name, s, t, y, logit_standardize=True)
    for k in on:
        assert scaled[k].item() == pytest.approx(LS_DEFAULTS[name]["ls_scale"] * on[k].item(),
                                                 rel=1e-6), k


def test_mlld_standardises_the_instance_level_only():
    """As the LS reference's MLKD: the instance KL terms see z-scored logits; the batch and
    class Grams, the masks and the strong-view CE see the raw ones; ls_scale (10) multiplies
    the KD-type terms, not the CE."""
    s_w, t_w, y = fixed(6, 7, 4)
    s_s, t_s, _ = fixed(6, 7, 5)
    kw = dict(strong_levels=("instance", "batch", "class"))
    on = terms_of("mlld", s_w, t_w, y, (s_s, t_s), logit_standardize=True, **kw)
    raw = terms_of("mlld", s_w, t_w, y, (s_s, t_s), **kw)
    z = [standardize_logits(a) for a in (s_w, t_w, s_s, t_s)]
    zs = terms_of("mlld", z[0], z[1], y, (z[2], z[3]), **kw)
    for k in ("mlld_instance_strong",):  # unmasked: only the inputs differ
        assert on[k].item() == pytest.approx(10 * zs[k].item(), rel=1e-6), k
    for k in ("mlld_batch_weak", "mlld_class_weak", "mlld_batch_strong", "mlld_class_strong"):
        assert on[k].item() == pytest.approx(10 * raw[k].item(), rel=1e-6), k
    assert on["mlld_ce_strong"].item() == pytest.approx(raw["mlld_ce_strong"].item(), rel=1e-7)
    # the weak instance term: z-scored logits under the raw teacher's confidence mask
    from kdbench_plugins.students.mlld import confidence_masks, instance_kl

    m, _ = confidence_masks(t_w)
    want = 0.9 * 10 * sum((instance_kl(z[0], z[1], T) * m).sum() / 6 for T in (2, 3, 4, 5, 6))
    assert on["mlld_instance_weak"].item() == pytest.approx(want.item(), rel=1e-6)
    quirks = terms_of("mlld", s_w, t_w, y, (s_s, t_s), logit_standardize=True,
                      reference_quirks=True)
    assert all(torch.isfinite(v) for v in quirks.values())


@pytest.mark.parametrize("name", list(METHODS))
def test_option_at_its_default_changes_nothing(name):
    s, t, y = fixed(6, 7, 6)
    strong = fixed(6, 7, 7)[:2]
    a = terms_of(name, s, t, y, strong)
    b = terms_of(name, s, t, y, strong, logit_standardize=False)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ parameters, run ids
@pytest.mark.parametrize("name", list(METHODS))
def test_ls_defaults_fill_only_what_the_recipe_leaves_unset(name):
    params = METHODS[name][1]
    assert params.ls_defaults == LS_DEFAULTS[name]
    p = params(logit_standardize=True)
    for k, v in LS_DEFAULTS[name].items():
        assert getattr(p, k) == v, k
    assert p.ls_factor == LS_DEFAULTS[name]["ls_scale"]
    given = params(logit_standardize=True, ls_scale=2.5)
    assert given.ls_scale == 2.5
    if "temperature" in params.model_fields:
        assert params(logit_standardize=True, temperature=3.0).temperature == 3.0
        assert params().temperature == params(logit_standardize=False).temperature != 2.0
    assert params().ls_factor == 1.0
    with pytest.raises(Exception, match="ls_scale"):
        params(ls_scale=2.0)  # only with the option on
    with pytest.raises(Exception):
        params(logit_standardize="perhaps")
    with pytest.raises(Exception):
        params(logit_standardize=True, ls_scale=-1.0)


@pytest.mark.parametrize("name", list(METHODS))
def test_the_dump_leaves_the_option_out_at_its_default(name):
    params = METHODS[name][1]
    default = resolved(params())
    assert "logit_standardize" not in default and "ls_scale" not in default
    assert resolved(params(logit_standardize=False)) == default
    on = resolved(params(logit_standardize=True))
    assert on["logit_standardize"] is True and on["ls_scale"] == LS_DEFAULTS[name]["ls_scale"]
    assert params(**on) == params(logit_standardize=True)  # the dump re-validates to itself
    assert params(**default) == params()
    assert _hash(on) != _hash(default)


@pytest.mark.parametrize("name", ["kd", "mlld"])
def test_existing_methods_dump_what_they_dumped_before_the_option(name):
    params = METHODS[name][1]
    before, digest = BEFORE[name]
    for p in (params(), params(logit_standardize=False)):
        assert resolved(p) == before
        assert _hash(resolved(p)) == digest


def test_run_ids_unchanged_with_the_option_at_its_default(tiny_recipe, registry):
    """The grid's own ids: kd written without the option, with it false, and (a second
    method set) mlld likewise, give the same student ids; with it on, new ids."""
    def ids(kd_extra, mlld_extra):
        sets = [{"label": "KD", "methods": [{"name": "ce", "weight": 0.1},
                                            {"name": "kd", "weight": 0.9, **kd_extra}]},
                {"label": "MLLD", "methods": [{"name": "ce", "weight": 0.1},
                                              {"name": "mlld", **mlld_extra}]}]
        _, students = expand(load_recipe(tiny_recipe(method_sets=sets), registry), registry)
        return [s.id for s in students]

    plain = ids({}, {})
    assert ids({"logit_standardize": False}, {"logit_standardize": False}) == plain
    on = ids({"logit_standardize": True}, {"logit_standardize": True})
    assert on[0] != plain[0] and on[1] != plain[1]
    assert ids({"logit_standardize": True}, {})[1] == plain[1]
