"""Issue 15: the teacher objectives' representation choices, the margin pipeline's BatchNorm-safe
re-encoding (the step's view-0 batch statistics, running statistics untouched) and its one
forward per image per step, through the engine's own TeacherTask and train_step. References are
plain Python loops."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from kdbench.api import Batch, ModelOutput
from kdbench.engine.loop import make_optimizer, train_step
from kdbench.engine.tasks import TeacherTask, objective_setup
from kdbench.recipe import Schedule
from kdbench_plugins.teachers.intra_class import IntraClass, IntraClassParams
from kdbench_plugins.teachers.margin_intra import MarginIntra, MarginIntraParams

from stand_ins import OneConvNet

torch.set_num_threads(1)
C, S = 3, 6  # classes, image size


def setup_for(model):
    with torch.no_grad():
        model.eval()
        out = model(torch.zeros(2, 3, S, S))
        model.train()
    return objective_setup(model, out, C, 100, S, torch.device("cpu"))


def stable_tuple_loss(za, zp, negs):
    """−log e^{s⁺} / (e^{s⁺} + Σ e^{s⁻}) for unbounded s, by max-subtraction, plain Python."""
    sims = [float(np.dot(za, zp))] + [float(np.dot(za, zn)) for zn in negs]
    top = max(sims)
    return top + math.log(sum(math.exp(s - top) for s in sims)) - sims[0]


# --------------------------------------------------------------------------------------------
# representation
# --------------------------------------------------------------------------------------------
def test_default_is_the_normalised_pooled_feature_and_logits_are_unnormalised():
    """The default is Sec. 4.1's φ (the literal logits did not train: the plugin's docstring);
    "logits" is Algorithm 1's f as printed, not normalised."""
    for params in (IntraClassParams(), MarginIntraParams()):
        assert params.embedding == "pooled_normalized"
    logits, pooled = torch.tensor([[3.0, -4.0, 12.0]]), torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    out = ModelOutput(logits, [], [], pooled)
    obj = IntraClass(IntraClassParams(), setup_for(OneConvNet(C, 4)))
    assert torch.allclose(obj.representation(out), pooled / 5.0)
    obj = IntraClass(IntraClassParams(embedding="logits"), setup_for(OneConvNet(C, 4)))
    assert torch.equal(obj.representation(out), logits)  # not normalised
    assert obj.representation_name == "logits"


def test_unnormalised_logits_loss_is_stable_and_exact_for_large_logits():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 1, 1, 0])
    n = len(y)
    l1 = torch.randn(n, C, generator=g) * 300  # s up to ~1e5: exp(s) overflows any float
    l2 = l1 + torch.randn(n, C, generator=g) * 30
    obj = IntraClass(IntraClassParams.model_validate({"lambda": 1.0, "embedding": "logits"}),
                     setup_for(OneConvNet(C, 4)))
    batch = Batch(x=torch.zeros(n, 3, S, S), y=y, index=torch.arange(n))
    t = obj(ModelOutput(l1, [], [], None), batch, {"second": ModelOutput(l2, [], [], None)}, None)
    views = [l1.double().numpy(), l2.double().numpy()]
    losses = [stable_tuple_loss(views[v][i], views[1 - v][i],
                                [views[w][j] for j in range(n) for w in range(2) if j != i and y[j] == y[i]])
              for v in range(2) for i in range(n)]
    assert math.isfinite(t["intra"].item())
    assert t["intra"].item() == pytest.approx(sum(losses) / len(losses), rel=1e-4)


@pytest.mark.parametrize("cls", [IntraClassParams, MarginIntraParams])
def test_old_embedding_name_warns_and_names_the_new_one(cls):
    with pytest.warns(FutureWarning, match='"pooled_normalized"'):
        params = cls.model_validate({"embedding": "pooled"})
    assert params.embedding == "pooled_normalized"
    with pytest.raises(ValueError, match="logits_normalized"):
        cls.model_validate({"embedding": "pooled_logits"})


def test_pooled_feature_of_a_zoo_model_gives_similarities_in_0_1():
    from kdbench.registry import load_registry

    reg = load_registry()
    plugin = reg.find("model", "vgg8")
    torch.manual_seed(0)
    model = plugin.factory(10, plugin.params.model_validate({"width_mult": 0.125}))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(8, 3, 32, 32))
    obj = IntraClass(IntraClassParams(embedding="pooled_normalized"),
                     objective_setup(model, out, 10, 100, 32, torch.device("cpu")))
    z = obj.representation(out)
    s = z @ z.t()
    assert (out.pooled >= 0).all()  # after a ReLU
    assert s.min() >= -1e-6 and s.max() <= 1 + 1e-5


# --------------------------------------------------------------------------------------------
# the margin pipeline through the engine
# --------------------------------------------------------------------------------------------
def margin_task(model, **params):
    obj = MarginIntra(MarginIntraParams.model_validate({"delta": -1.0, **params}), setup_for(model))
    return TeacherTask(model, obj)


def batch_of(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, S, S, generator=g)
    return Batch(x=x, y=torch.arange(n) % C, index=torch.arange(n),
                 views={"second": torch.randn(n, 3, S, S, generator=g)})


def bn_state(model):
    """The running statistics (buffers), not the affine parameters the step trains."""
    return {k: v.clone() for k, v in model.bn.named_buffers()}


def step(task, batch):
    opt, _ = make_optimizer([p for m in task.modules() for p in m.parameters()],
                            Schedule(epochs=1, batch_size=6, lr=0.1, milestones=[]), torch.device("cpu"))
    return train_step(task, batch, opt, torch.device("cpu"), "fp32")


def test_flush_leaves_batchnorm_running_statistics_as_a_step_without_one():
    torch.manual_seed(1)
    base = OneConvNet(C, 5)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    # pipeline of 2, every sample passes (δ = −1): task A has one cached sample per class, so
    # its step flushes every class; task B starts empty, so its step only caches.
    ta, tb = margin_task(a, pipeline_size=2), margin_task(b, pipeline_size=2)
    first = batch_of(0, n=3)
    with torch.no_grad():
        ta.objective.queue[first.y, 0] = torch.stack([first.x, first.views["second"]], 1)
        ta.objective.counts.fill_(1)
    batch = batch_of(1, n=3)
    _, terms_a, _ = step(ta, batch)
    _, terms_b, _ = step(tb, batch)
    assert terms_a["intra"].item() > 0 and terms_b["intra"].item() == 0.0  # A flushed, B did not
    assert ta.objective.epoch_stats()["flushes"] == 3
    sa, sb = bn_state(a), bn_state(b)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert int(sa["num_batches_tracked"]) == 1  # once per step: view 0 only
    assert a.bn.training and b.bn.training  # train mode is back after the re-encoding


def test_flushed_group_is_normalised_with_the_steps_view0_batch_statistics():
    """The intra term equals Eq. 4 on embeddings of the flushed images whose BatchNorm used the
    mean and biased variance of this step's view-0 batch — not the group's own statistics, not
    the running statistics (both give other values, checked)."""
    torch.manual_seed(2)
    model = OneConvNet(C, 5)
    with torch.no_grad():  # running statistics far from any batch's own
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 3)
    task = margin_task(model, pipeline_size=2, embedding="pooled_normalized", **{"lambda": 1.0})
    b0, b1 = batch_of(3, n=3), batch_of(4, n=3)
    b0.x.mul_(3).add_(2)  # cached images unlike view 0's: the group's statistics differ
    b0.views["second"].mul_(3).add_(2)
    task.loss_terms(b0)  # caches one sample per class
    terms, _ = task.loss_terms(b1)  # every class flushes: groups (b0[i], b1[i])
    imgs = torch.cat([b0.x, b1.x, b0.views["second"], b1.views["second"]])  # (12, ...)

    def reference(stats: str):
        with torch.no_grad():
            h = model.conv(imgs).double()
            if stats == "view0":
                ref = model.conv(b1.x).double()
                mean, var = ref.mean((0, 2, 3)), ref.var((0, 2, 3), unbiased=False)
            elif stats == "own":
                mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
            else:
                mean, var = model.bn.running_mean.double(), model.bn.running_var.double()
            shape = (1, -1, 1, 1)
            h = (h - mean.view(shape)) / torch.sqrt(var.view(shape) + model.bn.eps)
            h = h * model.bn.weight.double().view(shape) + model.bn.bias.double().view(shape)
            z = torch.nn.functional.normalize(torch.relu(h).mean((2, 3)), dim=1).numpy()
        v0, v1 = z[:6], z[6:]
        losses = []
        for k in range(3):  # group k: samples k (b0) and 3 + k (b1)
            members = [k, 3 + k]
            for i in members:
                for v, w in ((v0, v1), (v1, v0)):
                    negs = [u[j] for j in members if j != i for u in (v0, v1)]
                    losses.append(stable_tuple_loss(v[i], w[i], negs))
        return sum(losses) / len(losses)

    want = reference("view0")
    assert terms["intra"].item() == pytest.approx(want, rel=1e-5)
    for other in ("own", "running"):  # the check can tell them apart
        assert abs(reference(other) - want) > 1e-3, other
    assert model.bn.training


def test_re_encoding_is_invariant_to_the_scale_of_pre_batchnorm_activations():
    """As train-mode BatchNorm (and unlike running statistics): scaling the conv that feeds the
    BatchNorm leaves the intra term unchanged."""
    def intra(scale):
        torch.manual_seed(5)
        model = OneConvNet(C, 5)
        with torch.no_grad():
            model.conv.weight.mul_(scale)
            model.conv.bias.mul_(scale)
        task = margin_task(model, pipeline_size=2, embedding="pooled_normalized")
        task.loss_terms(batch_of(7, n=3))
        return task.loss_terms(batch_of(8, n=3))[0]["intra"].item()

    assert intra(1.0) > 0 and intra(7.0) == pytest.approx(intra(1.0), rel=1e-4)


@pytest.mark.parametrize("size,second_forwarded", [(2, False), (0, True)])
def test_pipeline_forwards_each_image_once_per_step(size, second_forwarded):
    torch.manual_seed(3)
    model = OneConvNet(C, 5)
    task = margin_task(model, pipeline_size=size)
    seen = []
    model.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    b0, b1 = batch_of(5, n=3), batch_of(6, n=3)
    task.loss_terms(b0)
    assert [len(s) for s in seen] == ([3, 3] if second_forwarded else [3])
    assert torch.equal(seen[0], b0.x)
    if not second_forwarded:
        seen.clear()
        task.loss_terms(b1)  # flushes: view 0, then the flushed images (both views of 6 samples)
        assert [len(s) for s in seen] == [3, 12]
        assert not any(torch.equal(s[:3], b1.views["second"]) for s in seen)
