"""CC (Peng et al. 2019, RepDistiller's code): linear heads, the consecutive-sample product loss vs
plain loops and a hand value, gradients (both heads learn, the teacher does not), state, errors.

Tolerances: the loss against the float64 plain-loop re-derivation, rel 1e-9 (float64 inputs
and heads); against the hand-computed value, exact to rel 1e-12.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from kdbench.api import ModelOutput, UserError
from kdbench_plugins.students.cc import CC, CCParams
from stand_ins import (assert_gradients_route, batch_of, make_pair, make_setup, pooled_out, run,
                       setup_from_nets)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ plain reference
def cc_loops(s, t, w_s, b_s, w_t, b_t):
    """e = W x + b for each net; δ = |e_s − e_t|; mean over b of Σ_d δ_b,d δ_b+1,d."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    batch, dim = len(s), len(b_s)

    def embed(x, w, b):
        return [[b[d] + sum(w[d][i] * x[n][i] for i in range(len(x[n]))) for d in range(dim)]
                for n in range(len(x))]

    e_s, e_t = embed(s, w_s, b_s), embed(t, w_t, b_t)
    delta = [[abs(e_s[n][d] - e_t[n][d]) for d in range(dim)] for n in range(batch)]
    pairs = [sum(delta[n][d] * delta[n + 1][d] for d in range(dim)) for n in range(batch - 1)]
    return sum(pairs) / len(pairs)


def heads(method):
    return [x.detach().double().numpy() for x in (method.embed_s.weight, method.embed_s.bias,
                                                  method.embed_t.weight, method.embed_t.bias)]


# ------------------------------------------------------------------------------ tests
def test_class_attributes_and_heads():
    assert CC.default_weight == 0.02  # run_cifar_distill.sh -b 0.02
    assert CC.needs_teacher and CC.views == ()
    assert not CC.teacher_train_mode and not CC.teacher_logits_only
    s, t = pooled_out(torch.randn(2, 7)), pooled_out(torch.randn(2, 11))
    method = CC(CCParams(), make_setup(s, t))
    # RepDistiller's LinearEmbed(feat[-1].shape[1], feat_dim=128): a bare Linear, with bias
    assert isinstance(method.embed_s, torch.nn.Linear)
    assert isinstance(method.embed_t, torch.nn.Linear)
    assert (method.embed_s.in_features, method.embed_s.out_features) == (7, 128)
    assert (method.embed_t.in_features, method.embed_t.out_features) == (11, 128)
    assert method.embed_s.bias is not None and method.embed_t.bias is not None


def test_hand_value():
    # identity heads, teacher embedding 0: δ = s = [[1,0],[0,2],[3,3]];
    # consecutive products 1·0 + 0·2 = 0 and 0·3 + 2·3 = 6 -> mean 3
    s = pooled_out(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], dtype=torch.float64))
    t = pooled_out(torch.tensor([[5.0, -1.0], [2.0, 2.0], [0.0, 1.0]], dtype=torch.float64))
    method = CC(CCParams(feat_dim=2), make_setup(s, t)).double()
    with torch.no_grad():
        method.embed_s.weight.copy_(torch.eye(2))
        method.embed_s.bias.zero_()
        method.embed_t.weight.zero_()
        method.embed_t.bias.zero_()
    assert method(s, t, batch_of(3), {})["cc"].item() == pytest.approx(3.0, rel=1e-12)


def test_loss_matches_loops():
    gen = torch.Generator().manual_seed(0)
    s = pooled_out(torch.randn(6, 5, generator=gen, dtype=torch.float64))
    t = pooled_out(torch.randn(6, 9, generator=gen, dtype=torch.float64) * 2)
    torch.manual_seed(0)
    method = CC(CCParams(feat_dim=4), make_setup(s, t)).double()
    got = method(s, t, batch_of(6), {})["cc"].item()
    want = cc_loops(s.pooled.numpy(), t.pooled.numpy(), *heads(method))
    assert want > 1e-2
    assert got == pytest.approx(want, rel=1e-9)


def test_single_sample_gives_zero_not_nan():
    s, t = pooled_out(torch.randn(1, 3, requires_grad=True)), pooled_out(torch.randn(1, 3))
    method = CC(CCParams(feat_dim=2), make_setup(s, t))
    term = method(s, t, batch_of(1), {})["cc"]
    assert term.item() == 0.0 and term.requires_grad  # the reference: mean of nothing = NaN
    term.backward()


def test_gradients_reach_student_and_both_heads_not_teacher():
    student, teacher = make_pair(seed=1, s_chans=(3, 4), t_chans=(5, 6))
    method = CC(CCParams(), setup_from_nets(student, teacher))
    terms, _, _ = run(method, student, teacher, torch.randn(5, 3, 8, 8))
    assert set(terms) == {"cc"}
    terms["cc"].backward()
    # pooled does not depend on the classifier; embed_t learns too (RepDistiller trains it)
    assert_gradients_route(student, teacher, method)
    assert {n for n, _ in method.named_parameters()} == {
        "embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}


def test_state_round_trip():
    gen = torch.Generator().manual_seed(2)
    s = pooled_out(torch.randn(4, 6, generator=gen))
    t = pooled_out(torch.randn(4, 8, generator=gen))
    torch.manual_seed(3)
    method = CC(CCParams(), make_setup(s, t))
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}
    torch.manual_seed(4)
    fresh = CC(CCParams(), make_setup(s, t))
    before = fresh(s, t, batch_of(4), {})["cc"].item()
    fresh.load_state_dict(state)
    want = method(s, t, batch_of(4), {})["cc"].item()
    assert before != want
    assert fresh(s, t, batch_of(4), {})["cc"].item() == want  # bit-identical after loading


def test_inference_mode_teacher():
    gen = torch.Generator().manual_seed(5)
    s = pooled_out(torch.randn(3, 4, generator=gen, requires_grad=True))
    with torch.inference_mode():
        t = pooled_out(torch.randn(3, 4, generator=gen))
    method = CC(CCParams(), make_setup(s, t))
    method(s, t, batch_of(3), {})["cc"].backward()
    assert method.embed_t.weight.grad is not None and s.pooled.grad is not None


def test_errors_name_the_problem():
    good = pooled_out(torch.randn(2, 4))
    with pytest.raises(UserError, match=r"cc needs the teacher's pooled vector \(B, D\); it has N"):
        CC(CCParams(), make_setup(good, ModelOutput(torch.zeros(2, 5), [], [], None)))
    with pytest.raises(UserError, match=r"student's pooled vector \(B, D\); it has \(2, 4, 1, 1\)"):
        CC(CCParams(), make_setup(pooled_out(torch.randn(2, 4, 1, 1)), good))
    with pytest.raises(ValueError):
        CCParams(feat_dim=0)


def test_registers_under_name_cc():
    from kdbench_plugins.students import cc

    seen = {}
    cc.kdbench_register_student_methods(lambda name, factory, **kw: seen.update({name: factory}))
    assert seen == {"cc": CC}
