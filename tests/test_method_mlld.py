"""MLLD (Jin, Wang & Lin 2023): loss vs an independent numpy derivation (paper mode and reference
mode, masks included; strong-view levels), median-mask edge cases, gradients, (absent) state."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.api import Batch, KDModel, ModelOutput
from kdbench.engine.tasks import method_setup
from kdbench_plugins.students.mlld import MLLD, MLLDParams
from stand_ins import assert_gradients_route

torch.set_num_threads(1)
TEMPS = (2.0, 3.0, 4.0, 5.0, 6.0)


# ------------------------------------------------------------------------------ stand-ins
class TinyNet(KDModel):
    def __init__(self, width: int = 4, num_classes: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def stage_channels(self):
        return [self.conv.out_channels]

    def bn_before_relu(self):
        return [self.bn]

    def forward(self, x):
        pre = self.bn(self.conv(x))
        out = F.relu(pre)
        pooled = out.mean((2, 3))
        return ModelOutput(self.fc(pooled), [out], [pre], pooled)


def make_setup(student_out=None, teacher_out=None, student=None, teacher=None, c=7, n=16):
    return method_setup(student, teacher, student_out, teacher_out, torch.arange(n) % c, c, 8,
                        torch.device("cpu"))


def out(logits):
    return ModelOutput(logits, [], [], torch.zeros(logits.shape[0], 1))


def make_method(**kw):
    return MLLD(MLLDParams(**kw), make_setup())


def run(method, s_w, t_w, s_s, t_s, y):
    batch = Batch(x=torch.zeros(len(y), 3, 4, 4), y=y, index=torch.arange(len(y)))
    return method(out(s_w), out(t_w), batch, {"strong": (out(s_s), out(t_s))})


def fixed_logits(b=6, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    s_w, t_w, s_s, t_s = (torch.randn(b, c, generator=g) * 3 for _ in range(4))
    y = torch.randint(0, c, (b,), generator=g)
    return s_w, t_w, s_s, t_s, y


# ------------------------------------------------------------------------------ numpy derivation
def np_softmax(z, T=1.0):
    z = np.asarray(z, dtype=np.float64) / T
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_masks(t_w):
    q = np_softmax(t_w)
    conf = q.max(axis=1)
    cls = q.sum(axis=0)
    sample_mask = (conf <= np.percentile(conf, 50)).astype(float)
    class_mask = (cls <= np.percentile(cls, 50)).astype(float)
    return sample_mask, class_mask


def np_kl_rows(s, t, T):
    ps, pt = np_softmax(s, T), np_softmax(t, T)
    return np.array([sum(pt[i, k] * (np.log(pt[i, k]) - np.log(ps[i, k]))
                         for k in range(pt.shape[1])) for i in range(pt.shape[0])]) * T * T


def np_batch_sq(s, t, T):
    ps, pt = np_softmax(s, T), np_softmax(t, T)
    return (pt @ pt.T - ps @ ps.T) ** 2 / ps.shape[0]


def np_class_sq(s, t, T):
    ps, pt = np_softmax(s, T), np_softmax(t, T)
    return (pt.T @ pt - ps.T @ ps) ** 2 / ps.shape[1]


def np_ce(z, y):
    p = np_softmax(z)
    return float(np.mean([-np.log(p[i, y[i]]) for i in range(len(y))]))


ALL_LEVELS = ("instance", "batch", "class")


def np_mlld_paper(s_w, t_w, s_s, t_s, y, temps=TEMPS, w=0.9, w_ce=0.1,
                  strong_levels=("instance",)):
    """The paper's three levels on the weak view and ``strong_levels`` on the strong one (the
    reference optimises the instance level only there), masks where the reference puts them,
    each mask weighting its sample (batch: Gram column; class: Gram column)."""
    s_w, t_w, s_s, t_s = (np.asarray(a, dtype=np.float64) for a in (s_w, t_w, s_s, t_s))
    m, n = np_masks(t_w)
    b = s_w.shape[0]
    ones_b, ones_c = np.ones(b), np.ones(s_w.shape[1])
    res = {}
    for view, s, t, a, c in (("weak", s_w, t_w, m, n), ("strong", s_s, t_s, ones_b, ones_c)):
        levels = ALL_LEVELS if view == "weak" else strong_levels
        if "instance" in levels:
            res[f"mlld_instance_{view}"] = w * sum(
                np.sum(a * np_kl_rows(s, t, T)) / b for T in temps)
        if "batch" in levels:
            res[f"mlld_batch_{view}"] = w * sum(
                sum(m[j] * np_batch_sq(s, t, T)[i, j] for i in range(b) for j in range(b))
                for T in temps)
        if "class" in levels:
            res[f"mlld_class_{view}"] = w * sum(
                np.sum(np_class_sq(s, t, T) * c[None, :]) for T in temps)
    res["mlld_ce_strong"] = w_ce * np_ce(s_s, y)
    return res


def np_reference_total(s_w, t_w, s_s, t_s, y, w=0.9, w_ce=0.1):
    """What the reference KD_ours.forward_train returns, summed (CE on both views included):
    reduce=True helpers, so (scalar * mask).mean() == scalar * mask.mean(); strong T=2,6 instance
    terms on weak logits; strong class/batch terms not returned."""
    s_w, t_w, s_s, t_s = (np.asarray(a, dtype=np.float64) for a in (s_w, t_w, s_s, t_s))
    m, n = np_masks(t_w)
    loss_ce = w_ce * (np_ce(s_w, y) + np_ce(s_s, y))
    temps = (4.0, 3.0, 5.0, 2.0, 6.0)  # the reference's order
    kd_weak = sum(w * np.mean(np_kl_rows(s_w, t_w, T)) * m.mean() for T in temps)
    kd_strong = sum(w * np.mean(np_kl_rows(s_s, t_s, T)) for T in (4.0, 3.0, 5.0)) + sum(
        w * np.mean(np_kl_rows(s_w, t_w, T)) for T in (2.0, 6.0))
    cc_weak = sum(w * np_class_sq(s_w, t_w, T).sum() * n.mean() for T in temps)
    bc_weak = sum(w * np_batch_sq(s_w, t_w, T).sum() * m.mean() for T in temps)
    return loss_ce + kd_weak + kd_strong + cc_weak + bc_weak


# ------------------------------------------------------------------------------ loss checks
@pytest.mark.parametrize("levels", [None, ALL_LEVELS, ("class",), ()])
@pytest.mark.parametrize("b,c,seed", [(6, 7, 0), (5, 4, 1), (8, 10, 2)])
def test_loss_matches_numpy_paper_formulation(b, c, seed, levels):
    s_w, t_w, s_s, t_s, y = fixed_logits(b, c, seed)
    method = make_method() if levels is None else make_method(strong_levels=levels)
    terms = run(method, s_w, t_w, s_s, t_s, y)
    ref = np_mlld_paper(s_w.numpy(), t_w.numpy(), s_s.numpy(), t_s.numpy(), y.numpy(),
                        strong_levels=("instance",) if levels is None else levels)
    assert set(terms) == set(ref)
    for k in ref:
        assert terms[k].item() == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k
    total = sum(v.item() for v in terms.values())
    assert total == pytest.approx(sum(ref.values()), rel=1e-5)
    assert all(v > 0 for k, v in ref.items())  # every term is live on random logits


@pytest.mark.parametrize("b,c,seed", [(6, 7, 0), (5, 4, 1)])
def test_reference_quirks_mode_matches_reference_total(b, c, seed):
    """reference_quirks + the recipe's `ce` at weight 0.1 == the reference's returned total."""
    s_w, t_w, s_s, t_s, y = fixed_logits(b, c, seed)
    method = make_method(reference_quirks=True)
    assert method.default_weight == 1.0
    terms = run(method, s_w, t_w, s_s, t_s, y)
    assert "mlld_batch_strong" not in terms and "mlld_class_strong" not in terms
    recipe_total = 0.1 * F.cross_entropy(s_w, y).item() + method.default_weight * sum(
        v.item() for v in terms.values())
    ref = np_reference_total(s_w.numpy(), t_w.numpy(), s_s.numpy(), t_s.numpy(), y.numpy())
    assert recipe_total == pytest.approx(ref, rel=1e-5)


def test_default_strong_view_has_the_reference_terms():
    """By default the strong view gets the instance level only, as the reference optimises it
    (it computes the strong batch/class terms but does not return them); the weak view gets all
    three levels."""
    s_w, t_w, s_s, t_s, y = fixed_logits(6, 7, 0)
    default = run(make_method(), s_w, t_w, s_s, t_s, y)
    assert set(default) == {"mlld_instance_weak", "mlld_batch_weak", "mlld_class_weak",
                            "mlld_instance_strong", "mlld_ce_strong"}
    full = run(make_method(strong_levels=ALL_LEVELS), s_w, t_w, s_s, t_s, y)
    assert set(full) == set(default) | {"mlld_batch_strong", "mlld_class_strong"}
    for k in default:  # the shared terms do not depend on which strong levels are on
        assert full[k].item() == pytest.approx(default[k].item(), rel=1e-6), k
    # the set of terms matches the reference's returned ones (same names per level and view)
    quirks = run(make_method(reference_quirks=True), s_w, t_w, s_s, t_s, y)
    assert set(quirks) == set(default)


@pytest.mark.slow  # 5 s of numpy at 100 classes
def test_strong_class_level_dominates_with_few_classes():
    """The documented reason for the default: with few classes and teacher-like logits the
    (unmasked) strong class term is as large as the instance terms; with many classes it is
    negligible. Checked on the numpy derivation, independent of the plugin."""
    g = np.random.default_rng(0)

    def ratio(c, b):
        y = g.integers(0, c, b)
        t = 5.0 * np.eye(c)[y] + g.standard_normal((b, c))
        s = 0.2 * g.standard_normal((b, c))
        ref = np_mlld_paper(s, t, s, t, y, strong_levels=ALL_LEVELS)
        return ref["mlld_class_strong"] / ref["mlld_instance_strong"]

    assert ratio(5, 32) > 0.3
    assert ratio(100, 64) < 1e-3


def test_strong_levels_validation():
    with pytest.raises(Exception, match="repeats"):
        MLLDParams(strong_levels=("instance", "instance"))
    with pytest.raises(Exception):
        MLLDParams(strong_levels=("feature",))
    with pytest.raises(Exception, match="reference_quirks"):
        MLLDParams(reference_quirks=True, strong_levels=ALL_LEVELS)
    assert MLLDParams(strong_levels=["class", "instance"]).strong_levels == ("class", "instance")


def test_paper_and_reference_modes_differ_only_as_documented():
    s_w, t_w, s_s, t_s, y = fixed_logits(6, 7, 3)
    paper = run(make_method(), s_w, t_w, s_s, t_s, y)
    quirks = run(make_method(reference_quirks=True), s_w, t_w, s_s, t_s, y)
    assert paper["mlld_ce_strong"].item() == pytest.approx(quirks["mlld_ce_strong"].item())
    assert paper["mlld_instance_weak"].item() != pytest.approx(quirks["mlld_instance_weak"].item())


# ------------------------------------------------------------------------------ masks
def test_mask_direction_keeps_low_confidence_samples():
    """Student == teacher on the confident half, different on the rest: the weak instance and
    batch terms see only the low-confidence half, so they are > 0; swap, and they are 0."""
    b, c = 6, 5
    t = torch.zeros(b, c)
    t[:, 0] = torch.tensor([8.0, 7.0, 6.0, 1.0, 0.5, 0.2])  # samples 0-2 confident
    low, high = torch.arange(3, 6), torch.arange(0, 3)
    wrong = torch.randn(b, c, generator=torch.Generator().manual_seed(0)) * 2
    y = torch.zeros(b, dtype=torch.long)
    method = make_method()
    s = t.clone()
    s[low] = wrong[low]  # the kept (low-confidence) samples differ
    terms = run(method, s, t, s, t, y)
    assert terms["mlld_instance_weak"].item() > 1e-3
    s = t.clone()
    s[high] = wrong[high]  # only the masked-out (confident) samples differ
    terms = run(method, s, t, s, t, y)
    assert terms["mlld_instance_weak"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["mlld_instance_strong"].item() > 1e-3  # strong instance level is unmasked
    # batch term: Gram columns of confident samples are dropped, but rows are not, so pairs
    # (confident i, kept j) still count; with s = t on kept samples the (kept, kept) block is 0.
    ref = np_mlld_paper(s.numpy(), t.numpy(), s.numpy(), t.numpy(), y.numpy())
    assert terms["mlld_batch_weak"].item() == pytest.approx(ref["mlld_batch_weak"], rel=1e-5)


@pytest.mark.parametrize("b", [1, 2, 5, 6])
def test_median_mask_counts_and_ties(b):
    from kdbench_plugins.students.mlld import confidence_masks

    g = torch.Generator().manual_seed(b)
    t = torch.randn(b, 9, generator=g) * 3
    m, n = confidence_masks(t)
    assert int(m.sum()) == (b + 1) // 2 if b > 1 else int(m.sum()) == 1
    assert int(n.sum()) == 5  # 9 classes: the median one is kept
    # all confidences equal (identical rows): the median equals every value, all kept
    m, n = confidence_masks(torch.ones(b, 9) * torch.arange(9.0))
    assert m.tolist() == [1.0] * b
    assert m.tolist() == np_masks(np.ones((b, 9)) * np.arange(9.0))[0].tolist()
    # uniform teacher: every class sum equal, every class kept
    _, n = confidence_masks(torch.zeros(b, 9))
    assert n.tolist() == [1.0] * 9


def test_all_ties_mask_equals_unmasked_loss():
    """A uniform teacher: every confidence and every class sum ties with the median, so every
    sample and class is kept and the weak terms equal the unmasked sums."""
    b, c = 4, 6
    t = torch.zeros(b, c)
    s = torch.randn(b, c, generator=torch.Generator().manual_seed(5))
    terms = run(make_method(strong_levels=ALL_LEVELS), s, t, s, t, torch.zeros(b, dtype=torch.long))
    unmasked_ins = 0.9 * sum(np.mean(np_kl_rows(s.numpy(), t.numpy(), T)) for T in TEMPS)
    unmasked_cls = 0.9 * sum(np_class_sq(s.numpy(), t.numpy(), T).sum() for T in TEMPS)
    assert terms["mlld_instance_weak"].item() == pytest.approx(unmasked_ins, rel=1e-5)
    assert terms["mlld_instance_weak"].item() == pytest.approx(
        terms["mlld_instance_strong"].item(), rel=1e-6)
    assert terms["mlld_class_weak"].item() == pytest.approx(unmasked_cls, rel=1e-5)
    assert terms["mlld_class_weak"].item() == pytest.approx(
        terms["mlld_class_strong"].item(), rel=1e-6)


def test_batch_of_one_is_finite():
    s_w, t_w, s_s, t_s, y = fixed_logits(1, 5, 4)
    terms = run(make_method(strong_levels=ALL_LEVELS), s_w, t_w, s_s, t_s, y)
    assert all(torch.isfinite(v) for v in terms.values())
    ref = np_mlld_paper(s_w.numpy(), t_w.numpy(), s_s.numpy(), t_s.numpy(), y.numpy(),
                        strong_levels=ALL_LEVELS)
    for k in ref:
        assert terms[k].item() == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k


def test_bf16_autocast_logits_are_upcast():
    s_w, t_w, s_s, t_s, y = fixed_logits(6, 7, 0)
    ref = run(make_method(), s_w, t_w, s_s, t_s, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(make_method(), *(a.bfloat16() for a in (s_w, t_w, s_s, t_s)), y)
    for k in ref:
        assert got[k].dtype == torch.float32
        assert got[k].item() == pytest.approx(ref[k].item(), rel=0.1), k


def test_params_and_views():
    method = make_method()
    assert MLLD.views == ("strong",) and MLLD.default_weight == 1.0
    assert method.temperatures == TEMPS and method.kd_weight == 0.9
    assert method.ce_weight_strong == 0.1
    assert method.strong_levels == ("instance",) and method.reference_quirks is False
    with pytest.raises(Exception):
        MLLDParams(temperatures=())
    with pytest.raises(Exception):
        MLLDParams(temperatures=(0.0, 2.0))
    with pytest.raises(Exception):
        MLLDParams(bogus=1)
    one = make_method(temperatures=(4.0,), kd_weight=1.0, ce_weight_strong=0.0)
    s_w, t_w, s_s, t_s, y = fixed_logits(6, 7, 0)
    terms = run(one, s_w, t_w, s_s, t_s, y)
    ref = np_mlld_paper(s_w.numpy(), t_w.numpy(), s_s.numpy(), t_s.numpy(), y.numpy(),
                        temps=(4.0,), w=1.0, w_ce=0.0)
    for k in ref:
        assert terms[k].item() == pytest.approx(ref[k], rel=1e-5, abs=1e-8), k


def test_missing_strong_view_is_a_clear_error():
    from kdbench.api import UserError

    s_w, t_w, _, _, y = fixed_logits(4, 5, 0)
    batch = Batch(x=torch.zeros(4, 3, 4, 4), y=y, index=torch.arange(4))
    with pytest.raises(UserError, match="strong"):
        make_method()(out(s_w), out(t_w), batch, {})


def test_registered_as_mlld():
    from kdbench.registry import load_registry

    plugin = load_registry().find("student_method", "mlld")
    assert plugin.factory is MLLD and plugin.params is MLLDParams


# ------------------------------------------------------------------------------ gradients, state
def test_gradients_reach_only_the_student():
    torch.manual_seed(0)
    student, teacher = TinyNet(4), TinyNet(6)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(True)  # as constructed: the engine must not need to flip it
    x_w, x_s = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        setup = make_setup(student(x_w[:2]), teacher(x_w[:2]), student, teacher)
        t_w, t_s = teacher(x_w), teacher(x_s)
    method = MLLD(MLLDParams(strong_levels=ALL_LEVELS), setup)  # every term, strong ones too
    assert len(list(method.parameters())) == 0
    student.train()
    s_w, s_s = student(x_w), student(x_s)
    batch = Batch(x=x_w, y=y, index=torch.arange(6), views={"strong": x_s})
    terms = method(s_w, t_w, batch, {"strong": (s_s, t_s)})
    loss = method.default_weight * sum(terms.values())
    loss.backward()
    assert_gradients_route(student, teacher, untouched=())  # the classifier too: logits only
    # each term alone also reaches the student's classifier
    for k in terms:
        student.zero_grad()
        s_w, s_s = student(x_w), student(x_s)
        method(s_w, t_w, batch, {"strong": (s_s, t_s)})[k].backward()
        assert student.fc.weight.grad.abs().sum() > 0, k


def test_state_dict_round_trip():
    method = make_method()
    assert len(method.state_dict()) == 0  # MLLD keeps no persistent state
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    fresh = make_method()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    s_w, t_w, s_s, t_s, y = fixed_logits(6, 7, 0)
    a, b = run(method, s_w, t_w, s_s, t_s, y), run(fresh, s_w, t_w, s_s, t_s, y)
    assert all(torch.equal(a[k], b[k]) for k in a)
