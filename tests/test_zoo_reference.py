"""The CIFAR model zoo against the reference implementations (RepDistiller / mdistiller).

Every kdbench zoo model must have exactly the reference's parameter count and state-dict
layout (keys, in order, with shapes), so the checkpoints those code bases publish load with
``checkpoint = "..."`` (kdbench/published.py). The reference code is *not* needed here: the
table below was computed once from it and stored.

How REFERENCE was made: each reference constructor was instantiated with 100 classes,

* HobbitLong/RepDistiller at commit b84f547c5db6a35318d4671d7d5c4de74c822403, ``models/``:
  resnet.py ``resnet8 ... resnet32x4``; resnetv2.py ``ResNet18/34/50``; wrn.py ``wrn_16_1,
  wrn_16_2, wrn_40_1, wrn_40_2`` ("wrn" = its defaults, WRN-16-2); vgg.py ``vgg{8,11,13,16,19}_bn``;
  mobilenetv2.py ``mobile_half(100)`` ("mobilenetv2") and ``mobilenetv2_T_w(6, 1, 100)``
  ("mobilenetv2_w1"); ShuffleNetv1.py ``ShuffleV1``; ShuffleNetv2.py ``ShuffleV2``;
* megvii-research/mdistiller at commit a08d46f10d6102bd6e3f258ca5ac880b020ea259, the same
  constructors in ``mdistiller/models/cifar/`` -- identical results for every model;

and recorded as (parameter count, number of state-dict entries, sha256 of the lines
``f"{key}:{','.join(map(str, shape))}"`` in ``state_dict()`` order joined by "\n" -- a scalar
``num_batches_tracked`` gives ``"key:"`` --, the first three keys, the last three keys).
Parameter-free reference modules (ReLU, pooling, ShuffleBlock, an empty ``nn.Sequential``
shortcut) have no entries on either side.

Beyond this file (not repeatable without the reference code): with the reference's weights
loaded (randomised, float64), logits, ``feats`` and ``preact_feats`` matched the reference's
(RepDistiller ``is_feat=True, preact=True/False``; mdistiller's feature dict) in eval and train
mode, and the BN running statistics after a train-mode step were identical; see each model's
docstring for the documented differences (WRN and ShuffleNetV2 feature conventions, adaptive
pooling at 64 px).

The feature protocol of the models added with the reference table (the 3-stage ResNets,
wrn_16_1/wrn_40_1, vgg11/16/19, shufflenetv1, mobilenetv2_w1) is checked here at 32 and 64 px on
thin copies (``width_mult``); tests/test_models.py covers the older ones.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.api import KDModel, ModelOutput
from kdbench.published import load_published_teacher
from test_models import collect_models

torch.set_num_threads(1)

MODULES = ["cifar_resnet", "cifar_resnet_3stage", "wrn", "vgg", "mobilenetv2", "shufflenetv1",
           "shufflenetv2"]

# name -> (parameters, state-dict entries, sha256 of "key:shape" lines, first keys, last keys)
REFERENCE = {
    "resnet8": (
        83_892, 56, "e5434c48f4fd735ee4057338d90745b14a5e9e297f6f712bc4f656b0dd3564a2",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["layer3.0.downsample.1.num_batches_tracked", "fc.weight", "fc.bias"]),
    "resnet14": (
        181_108, 92, "0c9a07934ba99ec7e2babb5efdaed1d844fbaa086d9ab402c605a38c12ae4aeb",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["layer3.1.bn2.num_batches_tracked", "fc.weight", "fc.bias"]),
    "resnet20": (
        278_324, 128, "5488b7b26a0251734b4c998d667723b4f0e83ad8f6af298fb54acd8211340f78",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["layer3.2.bn2.num_batches_tracked", "fc.weight", "fc.bias"]),
    "resnet32": (
        472_756, 200, "9476b4ebdf986027a2c12ea5b554c88d76d80ec2793a8394c9a7e474092f4c8c",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["layer3.4.bn2.num_batches_tracked", "fc.weight", "fc.bias"]),
    "resnet44": (
        667_188, 272, "9e692f42fda1e7139c3853ced63d2041320a98a55312aeb5a1670213df72bbe5",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["layer3.6.bn2.num_batches_tracked", "fc.weight", "fc.bias"]),
    "resnet56": (
        861_620, 344, "b99ad958d4c548bd7f56844a375de64e3b4a76146b5dd7aee018458591009377",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["layer3.8.bn2.num_batches_tracked", "fc.weight", "fc.bias"]),
    "resnet110": (
        1_736_564, 668, "c3073325887c8ebcc8badbdb7a759a3deb1bdb8d4c9e4e226fde131be38f6493",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["layer3.17.bn2.num_batches_tracked", "fc.weight", "fc.bias"]),
    "resnet8x4": (
        1_233_540, 62, "dc55c806f12d46a681f07608b61fca80e6813e27eb07630e45cbf9f28364be19",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["layer3.0.downsample.1.num_batches_tracked", "fc.weight", "fc.bias"]),
    "resnet32x4": (
        7_433_860, 206, "ac8df3eeecd82e09e98b20aefdbcbf80f37b28e37173bfdabb04d7852ea83a51",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["layer3.4.bn2.num_batches_tracked", "fc.weight", "fc.bias"]),
    "resnet18": (
        11_220_132, 122, "ac245e4e4bb76a981b23f2095c6b3f77122c299460ee4ac6e91f4e0daa2643db",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["layer4.1.bn2.num_batches_tracked", "linear.weight", "linear.bias"]),
    "resnet34": (
        21_328_292, 218, "fc95ada91c6ffe2af4ca0c8a2b65e7a4ed48ec9c031edd1a78def1e4e82f7cd3",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["layer4.2.bn2.num_batches_tracked", "linear.weight", "linear.bias"]),
    "resnet50": (
        23_705_252, 320, "3413aa594a669b60c73c8d63b3e61d6f9a48981536e6ef49bbabdeea9cb8a1c3",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["layer4.2.bn3.num_batches_tracked", "linear.weight", "linear.bias"]),
    "wrn": (
        703_284, 83, "019aaf1a2304185ce82191cfb3a929b5ae2be1c020497252bd7d51cecd19f0b0",
        ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.bn1.bias"],
        ["bn1.num_batches_tracked", "fc.weight", "fc.bias"]),
    "wrn_16_1": (
        180_916, 82, "bba255b72d7b16f9cce891defc30bd2f780a1702377788196b18be1150c99a3b",
        ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.bn1.bias"],
        ["bn1.num_batches_tracked", "fc.weight", "fc.bias"]),
    "wrn_16_2": (
        703_284, 83, "019aaf1a2304185ce82191cfb3a929b5ae2be1c020497252bd7d51cecd19f0b0",
        ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.bn1.bias"],
        ["bn1.num_batches_tracked", "fc.weight", "fc.bias"]),
    "wrn_40_1": (
        569_780, 226, "30e8d9ca76d363db167ed5d2c7c43b99c859b1955223b44b3a25bd6b8b4eac2e",
        ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.bn1.bias"],
        ["bn1.num_batches_tracked", "fc.weight", "fc.bias"]),
    "wrn_40_2": (
        2_255_156, 227, "9d855b0dbdf828aa9fd2be6cdd28d342ebf3a0873e41cc94fdd9c31582270e81",
        ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.bn1.bias"],
        ["bn1.num_batches_tracked", "fc.weight", "fc.bias"]),
    "vgg8": (
        3_965_028, 37, "ae2cce98fb8ef3d2b3d5ae03597ec797008cbb084fb032f24729932d2c75e484",
        ["block0.0.weight", "block0.0.bias", "block0.1.weight"],
        ["block4.1.num_batches_tracked", "classifier.weight", "classifier.bias"]),
    "vgg11": (
        9_277_284, 58, "b65da44bc31fa3baa9a2e8661c90bb18254631cb7ffe7bc9623acc0db55f7bca",
        ["block0.0.weight", "block0.0.bias", "block0.1.weight"],
        ["block4.4.num_batches_tracked", "classifier.weight", "classifier.bias"]),
    "vgg13": (
        9_462_180, 72, "1cbcd77846d9ca1bc73d3af9eb0d2dd44b3ec95a992a27a99a70901ff4b52474",
        ["block0.0.weight", "block0.0.bias", "block0.1.weight"],
        ["block4.4.num_batches_tracked", "classifier.weight", "classifier.bias"]),
    "vgg16": (
        14_774_436, 93, "574f5dd69dcc4b7bce8e9e5c75f3ea01f4a05cc360cf14cc484f2a899cabe181",
        ["block0.0.weight", "block0.0.bias", "block0.1.weight"],
        ["block4.7.num_batches_tracked", "classifier.weight", "classifier.bias"]),
    "vgg19": (
        20_086_692, 114, "c98afc5a9542a4b2969ba1fe0aacbb6ad99ac681a76b72b9c497ca9ec944493a",
        ["block0.0.weight", "block0.0.bias", "block0.1.weight"],
        ["block4.10.num_batches_tracked", "classifier.weight", "classifier.bias"]),
    "mobilenetv2": (
        812_836, 320, "50bc69b55d3dfca74c47886b1f1f01377637b8ccfe7622b248aac6433b3c6353",
        ["conv1.0.weight", "conv1.1.weight", "conv1.1.bias"],
        ["conv2.1.num_batches_tracked", "classifier.0.weight", "classifier.0.bias"]),
    "mobilenetv2_w1": (
        2_353_060, 320, "3083d1aef1ea51f5b4fad1a9beca9276e6ed767b0cffce280f86ee4d3896ebaa",
        ["conv1.0.weight", "conv1.1.weight", "conv1.1.bias"],
        ["conv2.1.num_batches_tracked", "classifier.0.weight", "classifier.0.bias"]),
    "shufflenetv1": (
        949_258, 296, "ac7ea3cb4e1e11db8985e1a062a26e01b3ed3debe535f5caa07d6fa341d46e08",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["layer3.3.bn3.num_batches_tracked", "linear.weight", "linear.bias"]),
    "shufflenetv2": (
        1_355_528, 338, "2c912c8e6a8eea69d3c226e2ddfc9b58cb2c7465f098b346d2596b1c3ed43b99",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ["bn2.num_batches_tracked", "linear.weight", "linear.bias"]),
}

NEW = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
       "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_40_1", "vgg11", "vgg16", "vgg19",
       "shufflenetv1", "mobilenetv2_w1"]
# Stages that end without a ReLU in the original net (MobileNetV2's linear bottlenecks).
NO_RELU_STAGES = {"mobilenetv2_w1": {1, 2, 3, 4}}
# Stages whose preact_feats[i] is exactly the output of bn_before_relu()[i - 1]; the other
# residual nets add a post-ReLU identity after that BN (so preact >= its output).
EXACT_BN = {"wrn_16_1": {1, 2, 3}, "wrn_40_1": {1, 2, 3}, "vgg11": {1, 2, 3, 4},
            "vgg16": {1, 2, 3, 4}, "vgg19": {1, 2, 3, 4}, "mobilenetv2_w1": {4}}
IDENTITY_AFTER_BN = {n for n in NEW if n.startswith("resnet")} | {"shufflenetv1"}
# feats[1:] spatial sizes at 32 px; at 64 px twice these (VGG pools once more before its last
# group at 64 px, as the reference, so its last stage stays at 4)
SIZES_32 = {"resnet": [32, 16, 8], "wrn": [32, 16, 8], "vgg": [16, 8, 4, 4],
            "shufflenetv1": [16, 8, 4], "mobilenetv2_w1": [16, 8, 4, 2]}
THIN = 0.25


MODELS = collect_models(MODULES)


def build(name: str, num_classes: int = 100, **params) -> KDModel:
    factory, params_cls = MODELS[name]
    torch.manual_seed(0)
    model = factory(num_classes, params_cls(**params))
    assert isinstance(model, KDModel)
    return model


def layout_digest(model: nn.Module) -> tuple[int, str, list[str]]:
    sd = model.state_dict()
    text = "\n".join(f"{k}:{','.join(map(str, v.shape))}" for k, v in sd.items())
    return len(sd), hashlib.sha256(text.encode()).hexdigest(), list(sd)


def _family(name: str) -> str:
    return next(f for f in SIZES_32 if name.startswith(f))


# ------------------------------------------------------------------- the reference layout
def test_every_zoo_model_has_a_reference_entry(registry):
    assert set(MODELS) == set(REFERENCE)
    installed = {p.name for p in registry.all("model") if p.dist == "kdbench"} - {"timm"}
    assert installed == set(REFERENCE), "entry points missing: pip install -e . --no-deps"


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameter_count_and_state_dict_layout(name):
    """At the published width and 100 classes (built on the meta device: no memory, no init)."""
    params, entries, sha, first, last = REFERENCE[name]
    with torch.device("meta"):
        model = build(name)
    n, digest, keys = layout_digest(model)
    assert sum(p.numel() for p in model.parameters()) == params
    assert (keys[:3], keys[-3:]) == (first, last)
    assert n == entries
    assert digest == sha, f"{name}: state-dict keys/shapes differ from the reference"


# ----------------------------------------------------------------- the feature protocol
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", NEW)
def test_feature_protocol(name, size):
    model = build(name, num_classes=7, width_mult=THIN).train()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 7) and torch.isfinite(out.logits).all()
    chans = model.stage_channels()
    assert len(out.feats) == len(out.preact_feats) == len(chans) + 1
    sizes = [s * size // 32 for s in SIZES_32[_family(name)]]
    if _family(name) == "vgg" and size == 64:
        sizes[-1] //= 2
    assert [f.shape[-1] for f in out.feats[1:]] == sizes
    for i, (f, p) in enumerate(zip(out.feats, out.preact_feats)):
        assert f.shape == p.shape and f.dim() == 4 and f.shape[0] == 2, (i, f.shape, p.shape)
        if i:
            assert f.shape[1] == chans[i - 1], (i, f.shape, chans)
        if i in NO_RELU_STAGES.get(name, ()):
            assert torch.equal(f, p)
        else:
            assert torch.equal(f, F.relu(p)), f"feats[{i}] != relu(preact_feats[{i}])"
            assert (p < 0).any(), f"preact_feats[{i}] looks post-ReLU"
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert out.pooled.shape == (2, lin.in_features)
    torch.testing.assert_close(lin(out.pooled), out.logits)


@pytest.mark.parametrize("name", NEW)
def test_bn_before_relu(name):
    """One registered BN per stage, sized like the stage; with every BN's gamma = 0 (eval) a BN
    outputs its beta, so each stage's preact equals (or, with a post-ReLU identity added after
    it, is >= ) the beta of the BN bn_before_relu() names for it. (A ResNet stage of a single
    block -- resnet8, resnet8x4 -- that changes shape adds a conv shortcut instead, whose BN
    then outputs its own beta.)"""
    model = build(name, num_classes=5, width_mult=THIN).eval()
    bns = model.bn_before_relu()
    own = {id(m) for m in model.modules()}
    assert len(bns) == len(model.stage_channels())
    for bn, c in zip(bns, model.stage_channels()):
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == c and id(bn) in own
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.zero_()
                m.bias.copy_(torch.randn(m.num_features, generator=g))
        out = model(torch.randn(2, 3, 32, 32))
    checked = 0
    for i, bn in enumerate(bns, start=1):
        beta, pre = bn.bias.view(1, -1, 1, 1), out.preact_feats[i]
        if i in EXACT_BN.get(name, ()):
            torch.testing.assert_close(pre, beta.expand_as(pre))
        elif name in IDENTITY_AFTER_BN:
            down = getattr(model.stages[i - 1][-1], "downsample", None)
            if down is None:
                assert (pre >= beta - 1e-5).all()
            else:  # the conv shortcut's BN outputs its beta too
                torch.testing.assert_close(pre, (beta + down[1].bias.view(1, -1, 1, 1))
                                           .expand_as(pre))
        else:
            continue
        checked += 1
    assert checked == len(bns) or name == "mobilenetv2_w1"


@pytest.mark.parametrize("name", NEW)
def test_forward_backward(name):
    model = build(name, num_classes=10, width_mult=THIN).train()
    out = model(torch.randn(2, 3, 32, 32))
    (out.logits.logsumexp(1).sum() + sum(f.mean() for f in out.preact_feats[1:])).backward()
    bias_before_bn = {f"{n}.bias" for n, m in model.named_modules()  # VGG's conv biases
                      if isinstance(m, nn.Conv2d) and m.bias is not None}
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if n not in bias_before_bn:
            assert p.grad.abs().sum() > 0, f"zero gradient for {n}"


@pytest.mark.parametrize("name", NEW)
def test_thin_copy_keeps_the_structure(name):
    with torch.device("meta"):
        full = build(name)
    thin = build(name, num_classes=100, width_mult=THIN)
    assert [k for k in thin.state_dict()] == [k for k in full.state_dict()]
    assert sum(p.numel() for p in thin.parameters()) < sum(p.numel() for p in full.parameters()) / 4


@pytest.mark.parametrize("name", ["resnet8", "shufflenetv1"])
def test_checkpoint_in_the_reference_layout_loads(name, tmp_path):
    """A checkpoint written as RepDistiller's train_teacher.py does ({"model": sd, "epoch": ..})
    from DataParallel loads into a fresh model; outputs then agree exactly."""
    src = build(name, num_classes=10, width_mult=THIN).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()},
                "epoch": 240, "best_acc": 71.0}, path)
    dst = build(name, num_classes=10, width_mult=THIN).eval()
    load_published_teacher(path, dst)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x).logits, dst(x).logits)


def test_shufflenetv1_too_thin_is_an_error():
    with pytest.raises(ValueError, match="too small"):
        build("shufflenetv1", width_mult=0.01)
