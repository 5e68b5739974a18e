"""Teacher objectives intra_class and margin_intra: Eq. 4–7, the gate, the per-class pipeline,
checkpointing, and Theorem 1's Eq. 12 identity. References are plain Python/numpy loops written
from the paper's equations, not the plugins' helpers."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.api import Batch, ModelOutput
from kdbench.engine.tasks import objective_setup
from kdbench_plugins.teachers.intra_class import (
    IntraClass,
    IntraClassParams,
    pair_masks,
    tuple_loss_terms,
)
from kdbench_plugins.teachers.margin_intra import MarginIntra, MarginIntraParams, margin

from stand_ins import OneConvNet

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def TinyNet(num_classes=3, width=6):
    return OneConvNet(num_classes, width)


def make_setup(num_classes=3, image_size=4, model=None):
    model = model or TinyNet(num_classes)
    with torch.no_grad():
        model.eval()
        out = model(torch.zeros(2, 3, image_size, image_size))
        model.train()
    return objective_setup(model, out, num_classes, 100, image_size, torch.device("cpu"))


def mo(logits, pooled):
    return ModelOutput(logits=logits, feats=[], preact_feats=[], pooled=pooled)


def np_normalize(a):
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def np_tuple_loss(za, zp, negs, tau):
    """−log exp(s⁺/τ) / (exp(s⁺/τ) + Σ exp(s⁻/τ)) for one anchor, plain Python."""
    sp = math.exp(float(np.dot(za, zp)) / tau)
    sn = sum(math.exp(float(np.dot(za, zn)) / tau) for zn in negs)
    return -math.log(sp / (sp + sn))


def np_intra(z1, z2, labels, tau):
    """Eq. 4 with anchors = both views of every sample, positive = its other view, negatives =
    other samples of the same label (both views); mean over anchors with ≥ 1 negative."""
    n = len(labels)
    views = [z1, z2]
    losses = []
    for v in range(2):
        for i in range(n):
            negs = [views[w][j] for j in range(n) for w in range(2)
                    if j != i and labels[j] == labels[i]]
            if not negs:
                continue
            losses.append(np_tuple_loss(views[v][i], views[1 - v][i], negs, tau))
    return (sum(losses) / len(losses) if losses else 0.0), len(losses)


def np_ce(logits, y):
    logits = np.asarray(logits, dtype=np.float64)
    total = 0.0
    for row, t in zip(logits, y):
        m = row.max()
        total += -(row[t] - m - math.log(np.exp(row - m).sum()))
    return total / len(y)


def np_rho(logits, y):
    out = []
    for row, t in zip(np.asarray(logits, dtype=np.float64), y):
        p = np.exp(row - row.max())
        p /= p.sum()
        out.append(p[t] - max(p[j] for j in range(len(p)) if j != t))
    return np.array(out)


def dummy_encode(_):
    raise AssertionError("encode must not be called")


# --------------------------------------------------------------------------------------------
# intra_class
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_intra_class_matches_numpy(tau):
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 0])  # class 2 has a single sample: contributes nothing
    n, d, c = len(y), 5, 3
    logits = torch.randn(n, c, generator=g)
    p1, p2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    obj = IntraClass(IntraClassParams.model_validate({"lambda": 0.03, "temperature": tau,
                                                      "embedding": "pooled_normalized"}), make_setup(c))
    batch = Batch(x=torch.zeros(n, 3, 4, 4), y=y, index=torch.arange(n))
    terms = obj(mo(logits, p1), batch, {"second": mo(logits, p2)}, dummy_encode)

    ref, count = np_intra(np_normalize(p1), np_normalize(p2), y.tolist(), tau)
    assert count == 2 * (n - 1)  # the singleton's two anchors are left out
    assert terms["ce"].item() == pytest.approx(np_ce(logits, y.tolist()), rel=1e-6)
    assert terms["intra"].item() == pytest.approx(0.03 * ref, rel=1e-5)
    assert sum(terms.values()).item() == pytest.approx(np_ce(logits, y.tolist()) + 0.03 * ref, rel=1e-5)
    stats = obj.epoch_stats()
    assert stats["intra_loss"] == pytest.approx(ref, rel=1e-5)
    assert stats["intra_anchor_frac"] == pytest.approx(12 / 14)
    assert obj.epoch_stats()["intra_anchor_frac"] == 0.0  # counters reset after reading


def test_intra_class_projection_and_logits_embeddings():
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 1, 1, 0, 1])
    n, c = len(y), 3
    setup = make_setup(c)
    d = setup.model_out.pooled.shape[1]
    logits1, logits2 = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    p1, p2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    batch = Batch(x=torch.zeros(n, 3, 4, 4), y=y, index=torch.arange(n))

    obj = IntraClass(IntraClassParams(embedding="logits_normalized"), setup)
    t = obj(mo(logits1, p1), batch, {"second": mo(logits2, p2)}, dummy_encode)
    ref, _ = np_intra(np_normalize(logits1), np_normalize(logits2), y.tolist(), 1.0)
    assert t["intra"].item() == pytest.approx(0.02 * ref, rel=1e-5)

    obj = IntraClass(IntraClassParams(embedding="logits"), setup)  # unnormalised: Eq. 4 as printed
    t = obj(mo(logits1, p1), batch, {"second": mo(logits2, p2)}, dummy_encode)
    ref, _ = np_intra(logits1.double().numpy(), logits2.double().numpy(), y.tolist(), 1.0)
    assert t["intra"].item() == pytest.approx(0.02 * ref, rel=1e-5)

    obj = IntraClass(IntraClassParams(embedding="projection"), setup)
    w1, b1 = obj.embed.head[0].weight.detach().double().numpy(), obj.embed.head[0].bias.detach().double().numpy()
    w2, b2 = obj.embed.head[2].weight.detach().double().numpy(), obj.embed.head[2].bias.detach().double().numpy()
    head = lambda p: np.maximum(p.double().numpy() @ w1.T + b1, 0) @ w2.T + b2  # noqa: E731
    t = obj(mo(logits1, p1), batch, {"second": mo(logits2, p2)}, dummy_encode)
    ref, _ = np_intra(np_normalize(head(p1)), np_normalize(head(p2)), y.tolist(), 1.0)
    assert t["intra"].item() == pytest.approx(0.02 * ref, rel=1e-5)
    t["intra"].backward()
    for p in obj.parameters():  # the head's parameters get gradients
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_intra_class_no_negatives_is_connected_zero():
    y = torch.tensor([0, 1, 2])  # every class once
    p1 = torch.randn(3, 4, requires_grad=True)
    p2 = torch.randn(3, 4, requires_grad=True)
    obj = IntraClass(IntraClassParams(embedding="pooled_normalized"), make_setup(3))
    batch = Batch(x=torch.zeros(3, 3, 4, 4), y=y, index=torch.arange(3))
    t = obj(mo(torch.randn(3, 3), p1), batch, {"second": mo(torch.randn(3, 3), p2)}, dummy_encode)
    assert t["intra"].item() == 0.0
    t["intra"].backward()
    assert p1.grad is not None and (p1.grad == 0).all() and (p2.grad == 0).all()


def test_intra_class_model_grads_and_registry_alias():
    from kdbench.registry import load_registry

    reg = load_registry()
    for name in ("intra_class", "margin_intra"):
        plugin = reg.find("teacher_objective", name)
        assert plugin.params.model_validate({"lambda": 0.01}).lambda_ == 0.01
        assert plugin.params.model_validate({"lambda_": 0.01}).lambda_ == 0.01
    setup = make_setup(3, 8)
    model = setup.model
    obj = IntraClass(IntraClassParams(), setup)
    g = torch.Generator().manual_seed(2)
    x, x2 = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    t = obj(model(x), Batch(x=x, y=y, index=torch.arange(8), views={"second": x2}),
            {"second": model(x2)}, model)
    sum(t.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------
# Theorem 1, Eq. 12
# --------------------------------------------------------------------------------------------
def test_eq12_identity_intra_over_inter():
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    n = len(y)
    z = F.normalize(torch.randn(2 * n, 6, generator=g, dtype=torch.float64), dim=1)
    pos_index, intra_mask = pair_masks(y)
    lab2 = torch.cat([y, y])
    inter_mask = lab2[:, None] != lab2[None, :]  # test-local inter loss: other-class negatives
    l_intra, _ = tuple_loss_terms(z, pos_index, intra_mask)
    l_inter, _ = tuple_loss_terms(z, pos_index, inter_mask)
    a = 0  # anchor: sample 0, view 0; its positive is row n
    zn = z.numpy()
    intra_sum = sum(math.exp(zn[a] @ zn[j]) for j in range(2 * n)
                    if j not in (a, n) and lab2[j] == lab2[a])
    inter_sum = sum(math.exp(zn[a] @ zn[j]) for j in range(2 * n) if lab2[j] != lab2[a])
    lhs = intra_sum / inter_sum
    rhs = (math.exp(l_intra[a].item()) - 1) / (math.exp(l_inter[a].item()) - 1)
    assert rhs == pytest.approx(lhs, rel=1e-5)
    # and the per-anchor losses themselves are Eq. 1 / Eq. 4
    sp = math.exp(zn[a] @ zn[n])
    assert l_intra[a].item() == pytest.approx(math.log(1 + intra_sum / sp), rel=1e-5)
    assert l_inter[a].item() == pytest.approx(math.log(1 + inter_sum / sp), rel=1e-5)


# --------------------------------------------------------------------------------------------
# margin_intra: gate
# --------------------------------------------------------------------------------------------
def gated_logits(y, passing, c):
    """Logits whose margin is ≈ 0.97 where ``passing`` and ≈ 0.2 elsewhere."""
    logits = torch.zeros(len(y), c)
    for i, (t, p) in enumerate(zip(y.tolist(), passing)):
        logits[i, t] = 5.0 if p else 1.0
    return logits


def test_margin_matches_numpy():
    g = torch.Generator().manual_seed(4)
    logits, y = torch.randn(6, 4, generator=g) * 3, torch.tensor([0, 1, 2, 3, 0, 1])
    np.testing.assert_allclose(margin(logits, y).numpy(), np_rho(logits.numpy(), y.tolist()), rtol=1e-5, atol=1e-6)


def test_margin_gate_in_batch_gradients_and_value():
    c, d = 3, 5
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 0])
    passing = [True, True, False, True, True, False, True, False]
    logits = gated_logits(y, passing, c)
    rho = np_rho(logits.numpy(), y.tolist())
    assert all((r > 0.5) == p for r, p in zip(rho, passing))
    g = torch.Generator().manual_seed(5)
    p1 = torch.randn(len(y), d, generator=g).requires_grad_()
    p2 = torch.randn(len(y), d, generator=g).requires_grad_()
    obj = MarginIntra(MarginIntraParams(pipeline_size=0, delta=0.5, temperature=0.7,
                                        embedding="pooled_normalized"), make_setup(c))
    batch = Batch(x=torch.zeros(len(y), 3, 4, 4), y=y, index=torch.arange(len(y)))
    t = obj(mo(logits, p1), batch, {"second": mo(logits, p2)}, dummy_encode)

    # reference: Eq. 7 over the passing samples only (class 2 has one passing sample: nothing)
    keep = [i for i, p in enumerate(passing) if p]
    ref, count = np_intra(np_normalize(p1.detach())[keep], np_normalize(p2.detach())[keep],
                          [y[i].item() for i in keep], 0.7)
    assert count == 8
    assert t["intra"].item() == pytest.approx(0.02 * ref, rel=1e-5)
    assert t["ce"].item() == pytest.approx(np_ce(logits, y.tolist()), rel=1e-6)

    t["intra"].backward()  # the intra term only
    for i, p in enumerate(passing):
        for grad in (p1.grad[i], p2.grad[i]):
            if p and y[i] != 2:
                assert grad.abs().sum() > 0
            else:
                assert (grad == 0).all(), i
    stats = obj.epoch_stats()
    assert stats["gate_pass_frac"] == pytest.approx(5 / 8)
    assert stats["intra_anchors"] == 8


# --------------------------------------------------------------------------------------------
# margin_intra: pipeline
# --------------------------------------------------------------------------------------------
class LookupEncoder:
    """encode(images) -> pooled = table[id], the id written into every pixel of the image.
    ``table`` is a leaf, so its gradient shows which cached samples entered the loss."""

    def __init__(self, num_ids, d, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(num_ids, d, generator=g, dtype=torch.float32).requires_grad_()
        self.calls = []

    def __call__(self, images):
        ids = images[:, 0, 0, 0].round().long()
        self.calls.append(ids.clone())
        return mo(torch.zeros(len(ids), 1), self.table[ids])


class PipelineReference:
    """Per-class lists; passing samples appended in batch order; each time a list reaches P the
    first P form a group (anchors + negatives within the group) and leave the list."""

    def __init__(self, c, size):
        self.size, self.queues = size, [[] for _ in range(c)]

    def step(self, ids0, ids1, y, passing):
        groups = []
        for a, b, t, p in zip(ids0, ids1, y, passing):
            if p:
                self.queues[t].append((a, b))
        for q in self.queues:
            while len(q) >= self.size:
                groups.append(q[:self.size])
                del q[:self.size]
        return groups


def make_step(step, y, passing, c, image_size=2):
    """Batch whose images encode unique ids: view 0 = 2·id, view 1 = 2·id + 1."""
    n = len(y)
    ids = torch.arange(n) + 100 * step
    x = (2 * ids).float()[:, None, None, None].expand(n, 3, image_size, image_size).clone()
    x2 = x + 1
    batch = Batch(x=x, y=torch.tensor(y), index=ids, views={"second": x2}, step=step)
    logits = gated_logits(batch.y, passing, c)
    return batch, logits, (2 * ids).tolist(), (2 * ids + 1).tolist()


def np_groups_loss(groups, table, tau):
    losses = []
    for gi, group in enumerate(groups):
        for a in range(len(group)):
            for v in range(2):
                za, zp = table[group[a][v]], table[group[a][1 - v]]
                negs = [table[group[j][w]] for j in range(len(group)) for w in range(2) if j != a]
                losses.append(np_tuple_loss(za, zp, negs, tau))
    return sum(losses) / len(losses), len(losses)


@pytest.mark.parametrize("size", [2, 3])
def test_pipeline_matches_reference_and_gates_gradients(size):
    c, d, tau, lam = 3, 4, 0.5, 0.02
    rng = np.random.default_rng(size)
    enc = LookupEncoder(2 * 100 * 12, d)
    table_np = np_normalize(enc.table.detach())
    obj = MarginIntra(MarginIntraParams(pipeline_size=size, temperature=tau, embedding="pooled_normalized",
                                        **{"lambda": lam}), make_setup(c, image_size=2))
    ref = PipelineReference(c, size)
    total_flushes = 0
    for step in range(12):
        n = int(rng.integers(2, 9))
        y = rng.integers(0, c, n).tolist()
        passing = (rng.random(n) < 0.6).tolist()
        batch, logits, ids0, ids1 = make_step(step, y, passing, c)
        enc.calls.clear()
        enc.table.grad = None
        t = obj(mo(logits, torch.zeros(n, d, requires_grad=True)), batch, {"second": mo(logits, None)}, enc)
        groups = ref.step(ids0, ids1, y, passing)
        total_flushes += len(groups)
        if not groups:
            assert t["intra"].item() == 0.0 and not enc.calls
        else:
            want, count = np_groups_loss(groups, table_np, tau)
            assert t["intra"].item() == pytest.approx(lam * want, rel=1e-5)
            # one encode call, with exactly the flushed samples, both views
            assert len(enc.calls) == 1
            flushed = sorted(i for grp in groups for pair in grp for i in pair)
            assert sorted(enc.calls[0].tolist()) == flushed
            t["intra"].backward()
            used = enc.table.grad.abs().sum(1) > 0
            assert set(used.nonzero().flatten().tolist()) == set(flushed)
        # queue state equals the reference lists
        for k in range(c):
            q = ref.queues[k]
            assert obj.counts[k].item() == len(q)
            for s, (a, b) in enumerate(q):
                assert obj.queue[k, s, 0, 0, 0, 0].item() == a and obj.queue[k, s, 1, 0, 0, 0].item() == b
        assert not obj.queue.requires_grad and obj.queue.grad_fn is None and obj.counts.grad_fn is None
    assert total_flushes > 0
    assert obj.epoch_stats()["flushes"] == total_flushes


def test_pipeline_flushes_exactly_at_size_and_keeps_remainders():
    c, size = 3, 3
    obj = MarginIntra(MarginIntraParams(pipeline_size=size, embedding="pooled_normalized"),
                      make_setup(c, image_size=2))
    enc = LookupEncoder(2 * 100 * 4, 4)
    # step 0: class 0 gets 2 passing, class 1 gets 2 (one gated out), class 2 none passing
    batch, logits, _, _ = make_step(0, [0, 0, 1, 2, 1, 1], [True, True, True, False, True, False], c)
    t = obj(mo(logits, None), batch, {}, enc)
    assert obj.counts.tolist() == [2, 2, 0] and not enc.calls and t["intra"].item() == 0.0
    # step 1: class 0 reaches 3 -> flush; class 1 reaches 4 -> flush 3, keep 1; class 2 gets 1
    batch, logits, ids0, _ = make_step(1, [0, 1, 1, 2, 0], [True, True, True, True, False], c)
    t = obj(mo(logits, None), batch, {}, enc)
    assert obj.counts.tolist() == [0, 1, 1]
    assert sorted(enc.calls[0].tolist()) == sorted([0, 1, 2, 3, ids0[0], ids0[0] + 1,  # class 0
                                                    4, 5, 8, 9, ids0[1], ids0[1] + 1])  # class 1
    assert obj.queue[1, 0, 0, 0, 0, 0].item() == ids0[2]  # the kept class-1 sample, slot 0
    assert obj.queue[2, 0, 0, 0, 0, 0].item() == ids0[3]
    assert t["intra"].item() > 0
    assert obj.epoch_stats()["flushes"] == 2


def test_pipeline_state_dict_round_trip_gives_same_loss():
    c = 3
    setup = make_setup(c, image_size=2)
    params = MarginIntraParams(pipeline_size=3, embedding="projection", delta=0.4)
    a = MarginIntra(params, setup)
    enc = LookupEncoder(2 * 100 * 6, setup.model_out.pooled.shape[1])
    for step, (y, p) in enumerate([([0, 0, 1, 2, 1], [True] * 5), ([0, 1, 2, 2], [False, True, True, False])]):
        batch, logits, _, _ = make_step(step, y, p, c)
        a(mo(logits, None), batch, {}, enc)
    assert a.counts.tolist() == [2, 0, 2]
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert {"queue", "counts"} <= set(state)
    b = MarginIntra(params, make_setup(c, image_size=2))
    b.load_state_dict(state)
    assert torch.equal(b.counts, a.counts) and torch.equal(b.queue, a.queue)
    batch, logits, _, _ = make_step(2, [0, 2, 1], [True, True, True], c)
    ta = a(mo(logits, None), batch, {}, enc)
    tb = b(mo(logits, None), batch, {}, enc)
    assert ta["intra"].item() > 0
    assert ta["intra"].item() == tb["intra"].item() and ta["ce"].item() == tb["ce"].item()
    assert torch.equal(a.counts, b.counts) and torch.equal(a.queue, b.queue)


def test_pipeline_with_real_model_trains_several_steps():
    """Re-encoding through the model with gradient; no graph crosses an optimizer step (a
    retained graph would make the second backward fail)."""
    c, s = 3, 8
    setup = make_setup(c, image_size=s)
    model = setup.model
    obj = MarginIntra(MarginIntraParams(pipeline_size=2, delta=-1.0, embedding="pooled_normalized"),
                      setup)  # everything passes
    opt = torch.optim.SGD(list(model.parameters()) + list(obj.parameters()), lr=0.1)
    g = torch.Generator().manual_seed(6)
    flushed_any = False
    for step in range(4):
        x = torch.randn(6, 3, s, s, generator=g, requires_grad=True)  # even a grad-requiring input
        x2 = torch.randn(6, 3, s, s, generator=g)
        y = torch.tensor([0, 1, 2, 0, 1, 2])
        batch = Batch(x=x, y=y, index=torch.arange(6), views={"second": x2}, step=step)
        t = obj(model(x), batch, {"second": model(x2)}, model)
        opt.zero_grad()
        t["intra"].backward(retain_graph=True)
        if t["intra"].item() != 0:
            flushed_any = True
            # the pooled embedding depends on conv and bn (not on fc)
            for m in (model.conv, model.bn):
                for p in m.parameters():
                    assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
            assert model.fc.weight.grad is None
        sum(t.values()).backward()
        opt.step()
        assert obj.queue.grad_fn is None and not obj.queue.requires_grad
    assert flushed_any
    stats = obj.epoch_stats()
    assert stats["gate_pass_frac"] == 1.0 and stats["flushes"] == 4 * 3


def test_pipeline_size_one_rejected():
    with pytest.raises(ValueError, match="pipeline_size"):
        MarginIntraParams(pipeline_size=1)
    with pytest.raises(ValueError):
        MarginIntraParams.model_validate({"delta": 0.5, "unknown_key": 1})
