"""CRD (Tian et al. 2019): NCE loss vs numpy with fixed banks and negatives, memory update,
negative sampler, gradients, checkpointed banks and normalisation constants."""
from __future__ import annotations

import io
import math
from functools import partial

import numpy as np
import pytest
import torch

from kdbench_plugins.students.crd import CRD, CRDParams
from stand_ins import TinyNet, assert_gradients_route, batch_of, run
from stand_ins import make_setup as shared_setup
from stand_ins import pooled_out as _pooled_out

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ stand-ins
pooled_out = partial(_pooled_out, num_classes=3)


def make_setup(s_dim=6, t_dim=9, n=12, labels=None, student=None, teacher=None,
               student_out=None, teacher_out=None):
    """Pooled-only outputs of width s_dim / t_dim unless given; 3 classes unless labels say."""
    labels = torch.arange(n) % 3 if labels is None else labels
    s_out = student_out or pooled_out(torch.zeros(2, s_dim))
    t_out = teacher_out or pooled_out(torch.zeros(2, t_dim))
    return shared_setup(s_out, t_out, student, teacher, n=n, labels=labels,
                        num_classes=int(labels.max()) + 1)


def unit_rows(gen, n, d):
    m = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return m / m.norm(dim=1, keepdim=True)


# ------------------------------------------------------------------------------ numpy reference
def np_embed(x, lin):
    w, b = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
    z = x @ w.T + b
    return z / np.sqrt((z**2).sum(1, keepdims=True))


def np_scores(v, bank, idx, neg, tau):
    """exp(v_i · M[j] / τ) for j = the anchor (column 0) and its negatives."""
    rows = []
    for b in range(len(idx)):
        cols = [idx[b]] + list(neg[b])
        rows.append([math.exp(float(v[b] @ bank[j]) / tau) for j in cols])
    return np.array(rows)


def np_nce(e, z, n_data):
    """Tian et al. Eq. 18 as RepDistiller's ContrastLoss: P_n = 1/N, m = K, ε = 1e-7."""
    bsz, m = e.shape[0], e.shape[1] - 1
    mpn = m / n_data
    total = 0.0
    for b in range(bsz):
        p_pos = e[b, 0] / z
        total += math.log(p_pos / (p_pos + mpn + 1e-7))
        for k in range(1, m + 1):
            total += math.log(mpn / (e[b, k] / z + mpn + 1e-7))
    return -total / bsz


def np_update(bank, v, idx, mom):
    bank = bank.copy()
    for b, i in enumerate(idx):
        row = mom * bank[i] + (1 - mom) * v[b]
        bank[i] = row / np.sqrt((row**2).sum())
    return bank


# ------------------------------------------------------------------------------ loss checks
@pytest.mark.parametrize("mom", [0.5, 0.3])  # 0.5 is the default; 0.3 tells μ from 1 − μ
def test_contrast_loss_memory_update_and_fixed_z_match_numpy(mom):
    gen = torch.Generator().manual_seed(0)
    n, d, tau = 12, 4, 0.07
    torch.manual_seed(0)
    m = CRD(CRDParams(feat_dim=d, nce_k=5, nce_m=mom), make_setup(n=n))
    assert m.k == 5 and float(m.z_s) < 0 and float(m.z_t) < 0
    mem_s, mem_t = unit_rows(gen, n, d), unit_rows(gen, n, d)
    with torch.no_grad():
        m.memory_s.copy_(mem_s), m.memory_t.copy_(mem_t)
    mem_s, mem_t = mem_s.numpy(), mem_t.numpy()

    # step 1: Z estimated on this batch
    idx = np.array([3, 7, 0])
    neg = np.array([[0, 1, 2, 4, 5], [8, 9, 10, 11, 0], [1, 1, 6, 11, 3]])  # injected
    v_s, v_t = unit_rows(gen, 3, d), unit_rows(gen, 3, d)
    loss1 = m.contrast_loss(v_s.float(), v_t.float(), torch.tensor(idx), torch.tensor(neg))
    e_s = np_scores(v_s.numpy(), mem_t, idx, neg, tau)  # student anchor, teacher bank
    e_t = np_scores(v_t.numpy(), mem_s, idx, neg, tau)  # teacher anchor, student bank
    z_s, z_t = e_s.mean() * n, e_t.mean() * n
    assert float(m.z_s) == pytest.approx(z_s, rel=1e-5)
    assert float(m.z_t) == pytest.approx(z_t, rel=1e-5)
    want1 = np_nce(e_s, z_s, n) + np_nce(e_t, z_t, n)
    assert loss1.item() == pytest.approx(want1, rel=1e-5)

    # the momentum update, checked numerically; untouched rows unchanged
    new_s = np_update(mem_s, v_s.numpy(), idx, mom)
    new_t = np_update(mem_t, v_t.numpy(), idx, mom)
    np.testing.assert_allclose(m.memory_s.double().numpy(), new_s, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m.memory_t.double().numpy(), new_t, rtol=1e-6, atol=1e-7)
    assert not np.allclose(new_s[idx], mem_s[idx])

    # step 2: Z stays fixed; the updated banks are used
    idx2 = np.array([3, 5])
    neg2 = np.array([[7, 0, 1, 2, 4], [3, 6, 7, 9, 11]])
    v_s2, v_t2 = unit_rows(gen, 2, d), unit_rows(gen, 2, d)
    loss2 = m.contrast_loss(v_s2.float(), v_t2.float(), torch.tensor(idx2), torch.tensor(neg2))
    e_s2 = np_scores(v_s2.numpy(), new_t, idx2, neg2, tau)
    e_t2 = np_scores(v_t2.numpy(), new_s, idx2, neg2, tau)
    want2 = np_nce(e_s2, z_s, n) + np_nce(e_t2, z_t, n)
    assert loss2.item() == pytest.approx(want2, rel=1e-5)
    assert float(m.z_s) == pytest.approx(z_s, rel=1e-5)
    assert e_s2.mean() * n != pytest.approx(z_s, rel=1e-3)  # re-estimating would differ


def test_forward_embeds_and_uses_the_sampled_negatives():
    gen = torch.Generator().manual_seed(1)
    n = 20
    torch.manual_seed(0)
    m = CRD(CRDParams(feat_dim=8, nce_k=7), make_setup(s_dim=6, t_dim=9, n=n))
    f_s = torch.randn(4, 6, generator=gen)
    f_t = torch.randn(4, 9, generator=gen)
    idx = np.array([2, 11, 19, 5])
    mem_s, mem_t = m.memory_s.double().numpy().copy(), m.memory_t.double().numpy().copy()
    torch.manual_seed(7)
    terms = m(pooled_out(f_s), pooled_out(f_t), batch_of(torch.tensor(idx)), {})
    assert set(terms) == {"crd"}
    neg = m.last_neg_idx.numpy()
    assert neg.shape == (4, 7)
    v_s, v_t = np_embed(f_s.double().numpy(), m.embed_s.linear), np_embed(f_t.double().numpy(),
                                                                          m.embed_t.linear)
    e_s = np_scores(v_s, mem_t, idx, neg, 0.07)
    e_t = np_scores(v_t, mem_s, idx, neg, 0.07)
    want = np_nce(e_s, e_s.mean() * n, n) + np_nce(e_t, e_t.mean() * n, n)
    assert terms["crd"].item() == pytest.approx(want, rel=1e-5)
    assert CRD.default_weight == 0.8


def test_memory_init_like_reference():
    torch.manual_seed(0)
    m = CRD(CRDParams(), make_setup(n=300))
    stdv = 1.0 / math.sqrt(128 / 3)
    for bank in (m.memory_s, m.memory_t):
        assert bank.shape == (300, 128) and bank.dtype == torch.float32
        assert bank.min() >= -stdv and bank.max() <= stdv
        assert bank.max() > 0.95 * stdv and abs(float(bank.mean())) < 0.01
    assert not torch.equal(m.memory_s, m.memory_t)
    assert m.embed_s.linear.in_features == 6 and m.embed_t.linear.in_features == 9
    assert m.embed_s.linear.out_features == 128 and m.temperature == 0.07 and m.momentum == 0.5


# ------------------------------------------------------------------------------ sampler
def test_uniform_sampler_without_replacement_excludes_anchor_and_is_seeded():
    n = 50
    m = CRD(CRDParams(feat_dim=4, nce_k=20), make_setup(n=n))
    assert m.k == 20 and not m.replacement
    idx = torch.tensor([0, 7, 49, 7])
    torch.manual_seed(3)
    neg = m.sample_negatives(idx)
    assert neg.shape == (4, 20) and neg.dtype == torch.long
    for row, a in zip(neg.tolist(), idx.tolist()):
        assert a not in row and len(set(row)) == 20 and all(0 <= j < n for j in row)
    torch.manual_seed(3)
    assert torch.equal(m.sample_negatives(idx), neg)
    torch.manual_seed(4)
    assert not torch.equal(m.sample_negatives(idx), neg)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(m.sample_negatives(idx, g1), m.sample_negatives(idx, g2))


def test_the_default_draws_negatives_from_other_classes_as_the_reference_loader():
    """RepDistiller's CIFAR100InstanceSample (mdistiller too) draws CRD's negatives from other
    classes only: that is the default."""
    assert CRDParams().mode == "exact"
    labels = torch.arange(40) % 4
    m = CRD(CRDParams(feat_dim=4, nce_k=25), make_setup(n=40, labels=labels))
    torch.manual_seed(0)
    neg = m.sample_negatives(torch.arange(40))
    assert (labels[neg] != labels[:, None]).all()


def test_uniform_sampler_is_uniform_over_other_samples():
    m = CRD(CRDParams(feat_dim=4, nce_k=3, mode="uniform"), make_setup(n=10))
    torch.manual_seed(0)
    neg = m.sample_negatives(torch.full((3000,), 4))
    counts = torch.bincount(neg.reshape(-1), minlength=10)
    assert counts[4] == 0
    others = counts[torch.arange(10) != 4].double()
    assert others.sum() == 9000
    assert (others - 1000).abs().max() < 120  # ≈ 4 standard deviations


def test_exact_mode_excludes_same_class():
    n = 60
    labels = torch.arange(n) % 4
    m = CRD(CRDParams(feat_dim=4, nce_k=30, mode="exact"), make_setup(n=n, labels=labels))
    assert not m.replacement  # 45 other-class samples per anchor
    idx = torch.tensor([0, 13, 59, 22, 41])
    torch.manual_seed(0)
    neg = m.sample_negatives(idx)
    for row, a in zip(neg.tolist(), idx.tolist()):
        assert len(set(row)) == 30 and all(labels[j] != labels[a] for j in row)
    assert "train_labels" not in m.state_dict()  # from the set-up, not checkpointed


def test_k_capped_at_dataset_size():
    n = 10
    m = CRD(CRDParams(feat_dim=4, mode="uniform"), make_setup(n=n))  # nce_k 16384 by default
    assert m.k == n - 1 and not m.replacement
    torch.manual_seed(0)
    neg = m.sample_negatives(torch.arange(n))
    for a, row in enumerate(neg.tolist()):
        assert sorted(row) == [j for j in range(n) if j != a]  # every other sample, once
    torch.manual_seed(0)
    terms = m(pooled_out(torch.randn(3, 6)), pooled_out(torch.randn(3, 9)),
              batch_of(torch.tensor([1, 4, 8])), {})
    assert torch.isfinite(terms["crd"])
    # exact mode on tiny data: fewer other-class samples than K -> with replacement
    labels = torch.arange(n) % 2
    m = CRD(CRDParams(feat_dim=4, mode="exact"), make_setup(n=n, labels=labels))
    assert m.k == 9 and m.replacement
    torch.manual_seed(0)
    neg = m.sample_negatives(torch.arange(n))
    assert neg.shape == (n, 9)
    for a, row in enumerate(neg.tolist()):
        assert all(j % 2 != a % 2 for j in row)


# ------------------------------------------------------------------------------ gradients
def test_gradients_reach_student_and_embeddings_not_teacher():
    torch.manual_seed(0)
    student = TinyNet(4, [6, 8], [1, 2])
    teacher = TinyNet(4, [8, 12], [2, 2])
    x = torch.randn(2, 3, 8, 8)
    student.eval(), teacher.eval()
    with torch.no_grad():
        s0, t0 = student(x), teacher(x)
    method = CRD(CRDParams(feat_dim=16, nce_k=8),
                 make_setup(n=30, student=student, teacher=teacher, student_out=s0, teacher_out=t0))
    assert method.embed_s.linear.in_features == 8 and method.embed_t.linear.in_features == 12
    terms, _, _ = run(method, student, teacher, torch.randn(4, 3, 8, 8), index=[0, 5, 17, 29])
    sum(terms.values()).backward()
    assert_gradients_route(student, teacher, method)
    for name, b in method.named_buffers():
        assert not b.requires_grad, name
    for p in teacher.parameters():
        assert p.requires_grad and p.grad is None


def test_inference_mode_teacher_is_accepted():
    m = CRD(CRDParams(feat_dim=4, nce_k=3), make_setup(n=10))
    f_s = torch.randn(2, 6, requires_grad=True)
    with torch.inference_mode():
        f_t = torch.randn(2, 9)
    m(pooled_out(f_s), pooled_out(f_t), batch_of(torch.tensor([1, 2])), {})["crd"].backward()
    assert f_s.grad is not None and m.embed_t.linear.weight.grad is not None


# ------------------------------------------------------------------------------ state
def test_banks_and_z_survive_save_and_load():
    gen = torch.Generator().manual_seed(5)
    n = 16
    torch.manual_seed(0)
    a = CRD(CRDParams(feat_dim=8, nce_k=5), make_setup(n=n))
    for step in range(3):  # fill Z and move the banks
        f_s, f_t = torch.randn(4, 6, generator=gen), torch.randn(4, 9, generator=gen)
        a(pooled_out(f_s), pooled_out(f_t), batch_of(torch.arange(4) + 4 * step), {})
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight",
                          "embed_t.linear.bias", "memory_s", "memory_t", "z_s", "z_t"}
    torch.manual_seed(1)
    b = CRD(CRDParams(feat_dim=8, nce_k=5), make_setup(n=n))
    assert not torch.equal(b.memory_s, a.memory_s) and float(b.z_s) < 0
    b.load_state_dict(state)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    assert float(b.z_s) > 0 and float(b.z_t) > 0
    # same inputs and negatives -> same loss and the same updated banks; Z not re-estimated
    f_s, f_t = torch.randn(3, 6, generator=gen), torch.randn(3, 9, generator=gen)
    idx, neg = torch.tensor([1, 9, 14]), torch.tensor([[0, 2, 3, 4, 5], [1, 2, 3, 4, 5],
                                                       [0, 1, 2, 3, 15]])
    la = a.contrast_loss(a.embed_s(f_s), a.embed_t(f_t), idx, neg)
    z_before = float(b.z_s)
    lb = b.contrast_loss(b.embed_s(f_s), b.embed_t(f_t), idx, neg)
    assert torch.equal(la, lb) and float(b.z_s) == z_before
    assert torch.equal(a.memory_s, b.memory_s) and torch.equal(a.memory_t, b.memory_t)
