"""CIFAR model zoo: feature protocol, OFD hooks, parameter counts, gradient flow.

Models are collected straight from each plugin module's ``kdbench_register_models`` hook with a
fake ``register`` (no dependency on the kdbench registry).
"""
from __future__ import annotations

import importlib

import pydantic
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.api import KDModel, ModelOutput, Params

torch.set_num_threads(1)

MODULES = ["cifar_resnet", "wrn", "vgg", "mobilenetv2", "shufflenetv2"]


def collect_models(modules: list[str]) -> dict[str, tuple]:
    """name -> (factory, params) of every model the plugin modules ``modules`` register, each
    registration checked (one name once, a Params model, a one-line help)."""
    found: dict[str, tuple] = {}

    def register(name, factory, params=None, help=""):
        assert name not in found, f"{name} registered twice"
        assert isinstance(params, type) and issubclass(params, Params), name
        assert help and "\n" not in help, name
        found[name] = (factory, params)

    for mod in modules:
        module = importlib.import_module(f"kdbench_plugins.models.{mod}")
        module.kdbench_register_models(register=register)
    return found


MODELS = collect_models(MODULES)
NAMES = sorted(MODELS)


def build(name: str, num_classes: int = 100, **params) -> KDModel:
    factory, params_cls = MODELS[name]
    torch.manual_seed(0)
    model = factory(num_classes, params_cls(**params))
    assert isinstance(model, KDModel)
    return model


def head(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Stages whose original architecture has no ReLU at the end: feats[i] is preact_feats[i].
NO_RELU_STAGES = {"mobilenetv2": {1, 2, 3, 4}, "mobilenetv2_w1": {1, 2, 3, 4}}
# Stages where preact_feats[i] is exactly the output of bn_before_relu()[i - 1] (per channel);
# elsewhere a residual is added after that BN (ResNet: identity of a post-ReLU map, >= 0).
EXACT_BN = {
    "vgg8": {1, 2, 3, 4}, "vgg13": {1, 2, 3, 4},
    "wrn": {1, 2, 3}, "wrn_40_2": {1, 2, 3}, "wrn_16_2": {1, 2, 3},
    "shufflenetv2": {1, 2, 3}, "mobilenetv2": {4},
    "vgg11": {1, 2, 3, 4}, "vgg16": {1, 2, 3, 4}, "vgg19": {1, 2, 3, 4},
    "wrn_16_1": {1, 2, 3}, "wrn_40_1": {1, 2, 3}, "mobilenetv2_w1": {4},
}
RESIDUAL_AFTER_BN = {"resnet18", "resnet34", "resnet50"}


def test_registered_names():
    assert set(NAMES) == {
        "resnet18", "resnet34", "resnet50", "wrn", "wrn_40_2", "wrn_16_2",
        "vgg13", "vgg8", "mobilenetv2", "shufflenetv2",
        # added with the CRD benchmark's zoo (their reference check: test_zoo_reference.py)
        "wrn_16_1", "wrn_40_1", "vgg11", "vgg16", "vgg19", "mobilenetv2_w1",
    }


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", NAMES)
def test_feature_protocol(name, size):
    model = build(name, num_classes=7).train()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 7)
    assert torch.isfinite(out.logits).all()
    chans = model.stage_channels()
    assert len(out.feats) == len(out.preact_feats) == len(chans) + 1
    for i, (f, p) in enumerate(zip(out.feats, out.preact_feats)):
        assert f.shape == p.shape and f.dim() == 4 and f.shape[0] == 2, (i, f.shape, p.shape)
        if i:
            assert f.shape[1] == chans[i - 1], (i, f.shape, chans)
            assert f.shape[-1] <= out.feats[i - 1].shape[-1]
        if i in NO_RELU_STAGES.get(name, ()):
            assert torch.equal(f, p)
        else:
            assert torch.equal(f, F.relu(p)), f"feats[{i}] != relu(preact_feats[{i}])"
            assert (p < 0).any(), f"preact_feats[{i}] looks post-ReLU"
    # pooled is the penultimate vector: the head applied to it gives the logits.
    lin = head(model)
    assert out.pooled.shape == (2, lin.in_features)
    torch.testing.assert_close(lin(out.pooled), out.logits)


@pytest.mark.parametrize("name", NAMES)
def test_bn_before_relu_shapes(name):
    model = build(name)
    bns = model.bn_before_relu()
    assert len(bns) == len(model.stage_channels())
    for bn, c in zip(bns, model.stage_channels()):
        assert isinstance(bn, nn.BatchNorm2d)
        assert bn.num_features == c


@pytest.mark.parametrize("name", NAMES)
def test_bn_before_relu_feeds_preact(name):
    """With every BN's gamma = 0 (eval), a BN outputs its beta; so each preact channel must equal
    (or, with a post-ReLU identity added after the BN, be >= ) the beta of the BN that
    bn_before_relu() names for it. Random distinct betas make a wrong BN/channel mapping fail."""
    model = build(name, num_classes=5, width_mult=0.5).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.zero_()
                m.bias.copy_(torch.randn(m.num_features, generator=g))
        out = model(torch.randn(2, 3, 32, 32))
    checked = 0
    for i, bn in enumerate(model.bn_before_relu(), start=1):  # after the weights changed
        beta = bn.bias.detach().view(1, -1, 1, 1)
        pre = out.preact_feats[i]
        if i in EXACT_BN.get(name, ()):
            torch.testing.assert_close(pre, beta.expand_as(pre))
            checked += 1
        elif name in RESIDUAL_AFTER_BN:
            assert (pre >= beta - 1e-5).all()
            checked += 1
    assert checked or name == "mobilenetv2"


@pytest.mark.parametrize("name", NAMES)
def test_single_pass(name):
    """preact_feats come from the same forward: every BN runs exactly once per forward."""
    model = build(name, width_mult=0.5).train()
    calls: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, i, o: calls.__setitem__(mod, calls.get(mod, 0) + 1))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(calls) == n_bn and set(calls.values()) == {1}


# (parameter count for 100 classes, relative tolerance). First the method-card figures, then
# RepDistiller's published sizes; the exact counts below were measured from these faithful
# implementations and agree with both.
CARD = {
    "resnet50": (23.7e6, 0.02), "wrn_40_2": (2.2e6, 0.05), "wrn_16_2": (0.70e6, 0.05),
    "vgg13": (9.46e6, 0.01), "vgg8": (3.96e6, 0.01),
    "mobilenetv2": (0.81e6, 0.01), "shufflenetv2": (1.36e6, 0.01),
}
EXACT = {
    "resnet18": 11_220_132, "resnet34": 21_328_292, "resnet50": 23_705_252,
    "wrn_40_2": 2_255_156, "wrn_16_2": 703_284, "wrn": 703_284,  # wrn defaults: depth 16, widen 2
    "vgg13": 9_462_180, "vgg8": 3_965_028, "mobilenetv2": 812_836, "shufflenetv2": 1_355_528,
    # RepDistiller b84f547 / mdistiller a08d46f (tests/test_zoo_reference.py holds their digests)
    "wrn_16_1": 180_916, "wrn_40_1": 569_780, "vgg11": 9_277_284, "vgg16": 14_774_436,
    "vgg19": 20_086_692, "mobilenetv2_w1": 2_353_060,
}


@pytest.mark.parametrize("name", NAMES)
def test_param_counts(name):
    count = n_params(build(name, num_classes=100))
    if name in CARD:
        ref, tol = CARD[name]
        assert abs(count - ref) <= tol * ref, f"{name}: {count} vs {ref}"
    assert count == EXACT[name]


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    model = build(name, num_classes=10, width_mult=0.5).train()  # same structure, cheaper
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    # A conv bias feeding a train-mode BN has an identically zero gradient (the BN removes the
    # batch mean): VGG's convs keep their bias, as in the reference.
    bias_before_bn = {
        f"{n}.bias" for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.bias is not None
    }
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
        assert torch.isfinite(p.grad).all(), n
        if n not in bias_before_bn:
            assert p.grad.abs().sum() > 0, f"zero gradient for {n}"


@pytest.mark.parametrize("name", NAMES)
def test_thin_variant(name):
    """width_mult builds thin copies with the same protocol (for fast tests elsewhere)."""
    full, thin = build(name), build(name, num_classes=3, width_mult=0.25)
    assert n_params(thin) < n_params(full) / 2
    assert len(thin.stage_channels()) == len(full.stage_channels())
    with torch.no_grad():
        out = thin.eval()(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 3)
    assert [f.shape[1] for f in out.feats[1:]] == thin.stage_channels()
    assert [bn.num_features for bn in thin.bn_before_relu()] == thin.stage_channels()


def test_params_validation():
    with pytest.raises(pydantic.ValidationError):
        MODELS["wrn"][1](depth=15)
    with pytest.raises(pydantic.ValidationError):
        MODELS["resnet50"][1](width=2)
    assert MODELS["mobilenetv2"][1]().width_mult == 0.5
    wrn = build("wrn", depth=10, widen_factor=1)  # WRN-10-1: equal in/out first block
    with torch.no_grad():
        out = wrn(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 100) and wrn.stage_channels() == [16, 32, 64]
