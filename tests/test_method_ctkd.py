"""CTKD (Li et al. 2023): the curriculum λ at given epochs (against the reference's own logged
values), the temperature's parametrisation, the loss against a float64 KD at that temperature,
the gradient reversal (θ's gradient is −λ times the unreversed one, checked against a
finite-difference derivative), one SGD step raising the loss, gradients to student and θ only,
state, logit standardisation, bf16.

Tolerances: λ against the reference's logged decay values rel 1e-12 (they are printed to 16
digits). At the reference's temperatures (T ≈ 15.6 at the start) the KL is small against the
logits' scale and float32 cancels digits (measured: rel 1.2e-5 on the loss, 2.3e-4 on θ's
gradient); so the derivations are checked on float64 logits (the method keeps float64; only θ,
and so T, is float32: rel ~1e-7): loss rel 1e-6, θ's gradient vs float64 central differences
(h = 1e-5) rel 1e-5; float32 logits against them: loss rel 1e-4, θ's gradient rel 1e-3;
identities between float32 gradients rel 1e-6."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from kdbench.api import Batch, ModelOutput
from kdbench_plugins.students.ctkd import CTKD, CTKDParams, reversal_strength, reverse_grad
from stand_ins import assert_gradients_route, make_pair, make_setup, setup_from_nets

torch.set_num_threads(1)
SCHEDULE = (0.0, 1.0, 10)
# "decay_value" of epochs 1–4 in the LS reference's CTKD logs (logs/CTKD/*.txt), i.e. the
# reference's CosineDecay(max 0, min −1, loops 10) at its 1-based epochs: −λ(kdbench epoch 0–3).
LOGGED_DECAY = [-0.02447174185242318, -0.09549150281252627, -0.20610737385376343,
                -0.3454915028125263]


def out(logits):
    return ModelOutput(logits, [], [], torch.zeros(logits.shape[0], 1))


def make(**kw):
    return CTKD(CTKDParams(**kw), make_setup(None, None))


def batch_at(n, epoch=0, epochs=240):
    return Batch(x=torch.zeros(n, 3, 4, 4), y=torch.zeros(n, dtype=torch.long),
                 index=torch.arange(n), epoch=epoch, epochs=epochs)


def fixed(b=6, c=7, seed=2, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * scale, torch.randn(b, c, generator=g) * scale


def np_kd(s, t, T):
    """T² · batch-mean KL(softmax(t/T) ‖ softmax(s/T)) in float64."""
    s, t = np.asarray(s, dtype=np.float64) / T, np.asarray(t, dtype=np.float64) / T
    ls = s - s.max(1, keepdims=True)
    ls = ls - np.log(np.exp(ls).sum(1, keepdims=True))
    lt = t - t.max(1, keepdims=True)
    lt = lt - np.log(np.exp(lt).sum(1, keepdims=True))
    return float((np.exp(lt) * (lt - ls)).sum(1).mean() * T * T)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------ curriculum
@pytest.mark.parametrize("epoch", range(4))
def test_curriculum_matches_the_references_logged_values(epoch):
    assert -reversal_strength(epoch, *SCHEDULE) == pytest.approx(LOGGED_DECAY[epoch], rel=1e-12)


@pytest.mark.parametrize("epoch,expected", [(4, 0.5), (8, (1 - math.cos(0.9 * math.pi)) / 2),
                                            (9, 1.0), (10, 1.0), (239, 1.0)])
def test_curriculum_by_hand(epoch, expected):
    """λ(e) = (1 − cos(π·min(e + 1, 10)/10))/2: ½ at the 5th epoch, 1 from the 10th on."""
    assert reversal_strength(epoch, *SCHEDULE) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_curriculum_endpoints_are_parameters():
    assert reversal_strength(0, 0.2, 0.8, 1) == pytest.approx(0.8)
    assert reversal_strength(1, 0.2, 0.8, 4) == pytest.approx(0.2 + 0.6 * 0.5)


# ------------------------------------------------------------------------------ temperature, loss
def test_initial_temperature_and_range():
    method = make()
    assert method.theta.shape == () and method.theta.item() == 1.0
    assert method.temperature().item() == pytest.approx(1 + 20 * sigmoid(1.0), rel=1e-6)  # 15.62
    assert method.epoch_stats() == {"ctkd_temperature": pytest.approx(15.6211716, rel=1e-6)}
    other = make(temperature_min=2.0, temperature_range=5.0, theta_init=-1.0)
    assert other.temperature().item() == pytest.approx(2 + 5 * sigmoid(-1.0), rel=1e-6)


@pytest.mark.parametrize("epoch", [0, 5, 100])
def test_loss_is_kd_at_the_learned_temperature(epoch):
    s, t = fixed()
    method = make(theta_init=0.3)
    T = 1 + 20 * sigmoid(0.3)
    terms = method(out(s.double()), out(t.double()), batch_at(6, epoch), {})
    assert set(terms) == {"ctkd"} and terms["ctkd"].dim() == 0
    assert terms["ctkd"].item() == pytest.approx(np_kd(s, t, T), rel=1e-6)
    terms = method(out(s), out(t), batch_at(6, epoch), {})
    assert terms["ctkd"].dtype == torch.float32
    assert terms["ctkd"].item() == pytest.approx(np_kd(s, t, T), rel=1e-4)


# ------------------------------------------------------------------------------ gradient reversal
def test_reverse_grad_layer():
    x = torch.tensor(0.7, requires_grad=True)
    (reverse_grad(x, 0.25) * 3).backward()
    assert x.grad.item() == pytest.approx(-0.75)
    assert torch.equal(reverse_grad(x, 0.25), x)  # the identity forward


@pytest.mark.parametrize("epoch", [0, 3, 9, 50])
def test_temperature_gets_the_reversed_gradient(epoch):
    """θ's gradient = −λ(e) · dL/dθ, with dL/dθ the derivative of the plain KD loss in θ from
    float64 central differences; its sign is opposite to the unreversed one."""
    s, t = fixed()
    theta0 = 0.4
    method = make(theta_init=theta0)
    method(out(s.double()), out(t.double()), batch_at(6, epoch), {})["ctkd"].backward()

    def loss_at(theta):
        return np_kd(s, t, 1 + 20 * sigmoid(theta))

    h = 1e-5
    unreversed = (loss_at(theta0 + h) - loss_at(theta0 - h)) / (2 * h)
    lam = reversal_strength(epoch, *SCHEDULE)
    assert unreversed != 0
    assert method.theta.grad.item() == pytest.approx(-lam * unreversed, rel=1e-5)
    assert np.sign(method.theta.grad.item()) == -np.sign(unreversed)
    method.theta.grad = None
    method(out(s), out(t), batch_at(6, epoch), {})["ctkd"].backward()  # float32 logits
    assert method.theta.grad.item() == pytest.approx(-lam * unreversed, rel=1e-3)


def test_student_gradient_does_not_depend_on_the_reversal():
    """The reversal acts on θ only: the student's logits get the plain KD gradient at T, the
    same in epoch 0 (λ ≈ 0.02) and epoch 50 (λ = 1)."""
    s, t = fixed()
    grads = []
    for epoch in (0, 50):
        z = s.clone().requires_grad_()
        make(theta_init=0.4)(out(z), out(t), batch_at(6, epoch), {})["ctkd"].backward()
        grads.append(z.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=0)
    from kdbench_plugins.students.kd import kd_loss

    z = s.clone().requires_grad_()
    kd_loss(z, t, 1 + 20 * sigmoid(0.4)).backward()
    assert torch.allclose(grads[0], z.grad, rtol=1e-5, atol=1e-8)


def test_one_sgd_step_on_theta_raises_the_loss():
    """Adversarial: descending the reversed gradient moves T towards a larger KD loss."""
    s, t = fixed()
    method = make(theta_init=0.0)
    opt = torch.optim.SGD(method.parameters(), lr=0.05)
    before = method(out(s), out(t), batch_at(6, 50), {})["ctkd"]
    before.backward()
    opt.step()
    after = method(out(s), out(t), batch_at(6, 50), {})["ctkd"]
    assert after.item() > before.item()


def test_gradients_reach_the_student_and_the_temperature_never_the_teacher():
    student, teacher = make_pair(0)
    method = CTKD(CTKDParams(), setup_from_nets(student, teacher))
    assert [n for n, _ in method.named_parameters()] == ["theta"]
    x = torch.randn(6, 3, 8, 8)
    student.train()
    s_out = student(x)
    with torch.no_grad():
        t_out = teacher(x)
    sum(method(s_out, t_out, batch_at(6, 2), {}).values()).backward()
    assert_gradients_route(student, teacher, method=method, untouched=())


def test_state_dict_round_trip():
    method = make()
    with torch.no_grad():
        method.theta.fill_(-0.3)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert list(fresh.state_dict()) == ["theta"] and fresh.theta.item() == pytest.approx(-0.3)
    assert fresh.epoch_stats() == method.epoch_stats()


# ------------------------------------------------------------------------------ options, contract
def test_logit_standardisation():
    s, t = fixed(6, 7, 4)
    method = make(logit_standardize=True)
    assert method.ls_factor == 10.0  # 0.9 × 10 = the LS reference's -a 9

    def z(a):
        a = np.asarray(a, dtype=np.float64)
        return (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-7)

    T = 1 + 20 * sigmoid(1.0)
    ref = 10.0 * np_kd(z(s), z(t), T)
    assert method(out(s.double()), out(t.double()), batch_at(6), {})["ctkd"].item() == \
        pytest.approx(ref, rel=1e-6)
    assert method(out(s), out(t), batch_at(6), {})["ctkd"].item() == pytest.approx(ref, rel=1e-4)


def test_bf16_autocast_inputs_are_upcast():
    s, t = fixed()
    ref = make()(out(s.bfloat16().float()), out(t.bfloat16().float()), batch_at(6), {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = make()(out(s.bfloat16()), out(t.bfloat16()), batch_at(6), {})
    assert got["ctkd"].dtype == torch.float32
    assert got["ctkd"].item() == pytest.approx(ref["ctkd"].item(), rel=2e-6)


def test_params_defaults_and_errors():
    p = CTKDParams()
    assert (p.temperature_min, p.temperature_range, p.theta_init) == (1.0, 20.0, 1.0)
    assert (p.reversal_start, p.reversal_end, p.reversal_epochs) == SCHEDULE
    assert CTKD.default_weight == 0.9 and CTKD.teacher_logits_only and CTKD.views == ()
    for bad in ({"temperature_min": 0}, {"temperature_range": 0}, {"reversal_epochs": 0},
                {"reversal_end": -1}, {"bogus": 1}):
        with pytest.raises(Exception):
            CTKDParams(**bad)


def test_registered_as_ctkd():
    from kdbench.registry import load_registry

    plugin = load_registry().find("student_method", "ctkd")
    assert plugin.factory is CTKD and plugin.params is CTKDParams
