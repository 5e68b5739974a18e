"""Published teachers (kdbench.published): checkpoints in the RepDistiller / mdistiller layouts
load into kdbench's zoo models.

The reference key layout is derived here independently, from the reference model definitions
(RepDistiller ``models/{resnetv2,wrn,vgg,mobilenetv2,ShuffleNetv2}.py``; mdistiller's
``mdistiller/models/cifar/*`` use the same module names): module names, parameter and buffer
names and shapes, for the published widths and 100 classes. Each zoo model must produce exactly
that layout. Round trips then write checkpoints the way those code bases do ({"model": sd,
"epoch": 240, ...}, {"net": sd}, a bare state dict, DataParallel's "module." prefixes), load
them back and compare every tensor.
"""
from __future__ import annotations

import pytest
import torch

from kdbench.api import UserError
from kdbench.engine.tasks import build_model
from kdbench.published import checkpoint_metadata, load_published_teacher, read_state_dict

torch.set_num_threads(1)
NUM_CLASSES = 100


# ------------------------------------------------------------- the reference layout, derived
def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def ref_resnet(bottleneck: bool, blocks: list[int], classes: int = NUM_CLASSES) -> dict:
    """RepDistiller resnetv2.ResNet: conv1/bn1, layer1-4 of BasicBlock/Bottleneck (shortcut =
    Sequential(conv, bn) when the shape changes, an empty Sequential otherwise), linear."""
    exp = 4 if bottleneck else 1
    out = {"conv1.weight": (64, 3, 3, 3), **_bn("bn1", 64)}
    inp = 64
    for i, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), start=1):
        for j in range(blocks[i - 1]):
            p = f"layer{i}.{j}"
            s = stride if j == 0 else 1
            if bottleneck:
                out |= {f"{p}.conv1.weight": (planes, inp, 1, 1), **_bn(f"{p}.bn1", planes),
                        f"{p}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{p}.bn2", planes),
                        f"{p}.conv3.weight": (planes * 4, planes, 1, 1),
                        **_bn(f"{p}.bn3", planes * 4)}
            else:
                out |= {f"{p}.conv1.weight": (planes, inp, 3, 3), **_bn(f"{p}.bn1", planes),
                        f"{p}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{p}.bn2", planes)}
            if s != 1 or inp != planes * exp:
                out |= {f"{p}.shortcut.0.weight": (planes * exp, inp, 1, 1),
                        **_bn(f"{p}.shortcut.1", planes * exp)}
            inp = planes * exp
    return out | {"linear.weight": (classes, 512 * exp), "linear.bias": (classes,)}


def ref_wrn(depth: int, widen: int, classes: int = NUM_CLASSES) -> dict:
    """RepDistiller wrn.WideResNet: conv1, block1-3 (NetworkBlock.layer of BasicBlocks with
    bn1/conv1/bn2/conv2 and convShortcut when in != out), bn1, fc."""
    n = (depth - 4) // 6
    ch = [16, 16 * widen, 32 * widen, 64 * widen]
    out = {"conv1.weight": (16, 3, 3, 3)}
    for g in (1, 2, 3):
        for j in range(n):
            inp, o = (ch[g - 1] if j == 0 else ch[g]), ch[g]
            p = f"block{g}.layer.{j}"
            out |= {**_bn(f"{p}.bn1", inp), f"{p}.conv1.weight": (o, inp, 3, 3),
                    **_bn(f"{p}.bn2", o), f"{p}.conv2.weight": (o, o, 3, 3)}
            if inp != o:
                out[f"{p}.convShortcut.weight"] = (o, inp, 1, 1)
    return out | _bn("bn1", ch[3]) | {"fc.weight": (classes, ch[3]), "fc.bias": (classes,)}


def ref_vgg(cfg: list[list[int]], classes: int = NUM_CLASSES) -> dict:
    """RepDistiller vgg.VGG with batch_norm: block0-4 = Sequential(conv, bn, relu, ..., conv,
    bn) (the last ReLU dropped), classifier = Linear(512, classes)."""
    out, inp = {}, 3
    for g, widths in enumerate(cfg):
        for k, v in enumerate(widths):
            out |= {f"block{g}.{3 * k}.weight": (v, inp, 3, 3), f"block{g}.{3 * k}.bias": (v,),
                    **_bn(f"block{g}.{3 * k + 1}", v)}
            inp = v
    return out | {"classifier.weight": (classes, 512), "classifier.bias": (classes,)}


def ref_mobile_half(classes: int = NUM_CLASSES) -> dict:
    """RepDistiller mobilenetv2.mobile_half (T=6, width 0.5): conv1 = conv_bn, blocks =
    ModuleList of Sequentials of InvertedResidual (conv = pw, bn, relu, dw, bn, relu, pw, bn),
    conv2 = conv_1x1_bn to 1280, classifier = Sequential(Linear)."""
    w, t = 0.5, 6
    setting = [(1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1),
               (t, 160, 3, 2), (t, 320, 1, 1)]
    inp = int(32 * w)
    out = {"conv1.0.weight": (inp, 3, 3, 3), **_bn("conv1.1", inp)}
    for g, (e, c, n, _) in enumerate(setting):
        o = int(c * w)
        for j in range(n):
            p, hid = f"blocks.{g}.{j}.conv", inp * e
            out |= {f"{p}.0.weight": (hid, inp, 1, 1), **_bn(f"{p}.1", hid),
                    f"{p}.3.weight": (hid, 1, 3, 3), **_bn(f"{p}.4", hid),
                    f"{p}.6.weight": (o, hid, 1, 1), **_bn(f"{p}.7", o)}
            inp = o
    return out | {"conv2.0.weight": (1280, inp, 1, 1), **_bn("conv2.1", 1280),
                  "classifier.0.weight": (classes, 1280), "classifier.0.bias": (classes,)}


def ref_shufflev2(classes: int = NUM_CLASSES) -> dict:
    """RepDistiller ShuffleNetv2.ShuffleV2 (net size 1): 1x1 conv1/bn1 (24), layer1-3 =
    DownBlock (conv1-5/bn1-5) + 3/7/3 BasicBlocks (conv1-3/bn1-3 on half the channels),
    conv2/bn2 (1024), linear."""
    outs, nblocks = (116, 232, 464, 1024), (3, 7, 3)
    out = {"conv1.weight": (24, 3, 1, 1), **_bn("bn1", 24)}
    inp = 24
    for k, (o, n) in enumerate(zip(outs[:3], nblocks), start=1):
        mid, p = o // 2, f"layer{k}.0"
        out |= {f"{p}.conv1.weight": (inp, 1, 3, 3), **_bn(f"{p}.bn1", inp),
                f"{p}.conv2.weight": (mid, inp, 1, 1), **_bn(f"{p}.bn2", mid),
                f"{p}.conv3.weight": (mid, inp, 1, 1), **_bn(f"{p}.bn3", mid),
                f"{p}.conv4.weight": (mid, 1, 3, 3), **_bn(f"{p}.bn4", mid),
                f"{p}.conv5.weight": (mid, mid, 1, 1), **_bn(f"{p}.bn5", mid)}
        for j in range(1, n + 1):
            p, c = f"layer{k}.{j}", o // 2
            out |= {f"{p}.conv1.weight": (c, c, 1, 1), **_bn(f"{p}.bn1", c),
                    f"{p}.conv2.weight": (c, 1, 3, 3), **_bn(f"{p}.bn2", c),
                    f"{p}.conv3.weight": (c, c, 1, 1), **_bn(f"{p}.bn3", c)}
        inp = o
    return out | {"conv2.weight": (1024, 464, 1, 1), **_bn("bn2", 1024),
                  "linear.weight": (classes, 1024), "linear.bias": (classes,)}


VGG13 = [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]
VGG8 = [[64], [128], [256], [512], [512]]
REFERENCE = {  # kdbench zoo name -> the reference layout of the published network
    "resnet18": lambda: ref_resnet(False, [2, 2, 2, 2]),
    "resnet34": lambda: ref_resnet(False, [3, 4, 6, 3]),
    "resnet50": lambda: ref_resnet(True, [3, 4, 6, 3]),
    "wrn_40_2": lambda: ref_wrn(40, 2),
    "wrn_16_2": lambda: ref_wrn(16, 2),
    "vgg13": lambda: ref_vgg(VGG13),
    "vgg8": lambda: ref_vgg(VGG8),
    "mobilenetv2": ref_mobile_half,
    "shufflenetv2": ref_shufflev2,
}


def test_every_zoo_model_has_a_reference_layout(registry):
    """Here (the layouts written out) or in test_zoo_reference.py (the models added with the
    CRD benchmark: a digest of the reference's keys and shapes)."""
    from test_zoo_reference import REFERENCE as DIGESTS

    zoo = {p.name for p in registry.all("model") if p.dist == "kdbench"} - {"timm", "wrn"}
    assert zoo == (set(REFERENCE) | set(DIGESTS)) - {"wrn"}, "add the reference layout of the new zoo model"


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_zoo_state_dict_is_the_reference_layout(registry, name):
    model = build_model(registry, {"name": name, "params": {}}, NUM_CLASSES)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = REFERENCE[name]()
    assert sorted(set(own) - set(ref)) == [] and sorted(set(ref) - set(own)) == []
    assert {k: s for k, s in own.items() if ref[k] != s} == {}
    assert list(own) == list(ref)  # even the order (the order modules are registered)


# ------------------------------------------------------------------------------ round trips
SMALL = {"width_mult": 0.25}  # same key layout as the published widths, smaller tensors


def perturbed(registry, name: str, classes: int = 10, seed: int = 1):
    """A zoo model whose every tensor differs from a freshly built one (so a load that silently
    kept the model's own values would be caught)."""
    torch.manual_seed(seed)
    model = build_model(registry, {"name": name, "params": SMALL}, classes)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith("running_var"):
                v.add_(torch.rand_like(v) + 0.1)  # stays positive
            elif v.is_floating_point():
                v.add_(torch.randn_like(v) * 0.02 + 0.01)
            else:
                v.add_(7)
    return model


def fresh(registry, name: str, classes: int = 10):
    torch.manual_seed(123)
    return build_model(registry, {"name": name, "params": SMALL}, classes)


def assert_same(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


WRAPS = {
    "repdistiller": lambda sd: {"model": sd, "epoch": 240, "best_acc": torch.tensor(77.5),
                                "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5}]}},
    "mdistiller": lambda sd: {"model": sd, "epoch": 240, "best_acc": 77.5},
    "net": lambda sd: {"net": sd, "acc": 77.5, "epoch": 200},
    "state_dict": lambda sd: {"state_dict": sd},
    "bare": lambda sd: sd,
}


# Every zoo model in RepDistiller's/mdistiller's {"model": ...} and bare, with and without
# DataParallel prefixes; the other wrappers (one code path for every model) on two models.
CASES = [(n, w, dp) for n in sorted(REFERENCE) for w in sorted(WRAPS) for dp in (False, True)
         if w in ("repdistiller", "bare") or n in ("resnet50", "shufflenetv2")]


@pytest.mark.parametrize("name,wrap,dataparallel", CASES,
                         ids=[f"{n}-{w}{'-module' if dp else ''}" for n, w, dp in CASES])
def test_round_trip(registry, tmp_path, name, wrap, dataparallel):
    source = perturbed(registry, name)
    sd = source.state_dict()  # the reference layout (test above), so no renaming is needed
    if dataparallel:
        sd = {f"module.{k}": v for k, v in sd.items()}
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save(WRAPS[wrap](sd), path)
    target = fresh(registry, name)
    load_published_teacher(path, target)
    assert_same(source, target)
    # and the loaded teacher computes what the source computes
    source.eval(), target.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x).logits, target(x).logits)


def test_metadata(registry, tmp_path):
    path = tmp_path / "t.pth"
    torch.save(WRAPS["repdistiller"](perturbed(registry, "vgg8").state_dict()), path)
    meta = checkpoint_metadata(path)
    assert meta["epoch"] == 240 and meta["best_acc"] == pytest.approx(77.5)
    assert meta["layout"] == '{"model": state_dict}' and len(meta["sha256"]) == 64
    _, layout = read_state_dict(path)
    assert layout == '{"model": state_dict}'


def test_old_checkpoint_without_num_batches_tracked(registry, tmp_path):
    source = perturbed(registry, "resnet18")
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save({"model": sd}, path)
    target = fresh(registry, "resnet18")
    load_published_teacher(path, target)
    for k, v in sd.items():
        assert torch.equal(target.state_dict()[k], v), k


def test_timm_state_dict_maps_onto_the_wrapper(registry, tmp_path):
    spec = {"name": "timm", "params": {"model": "resnet10t"}}
    torch.manual_seed(0)
    source = build_model(registry, spec, 10)
    path = tmp_path / "timm.pth"
    torch.save(source.model.state_dict(), path)  # timm's own keys, no "model." prefix
    torch.manual_seed(1)
    target = build_model(registry, spec, 10)
    load_published_teacher(path, target)
    assert_same(source, target)


# ------------------------------------------------------------------------------------ errors
def test_class_count_mismatch_is_named(registry, tmp_path):
    path = tmp_path / "c100.pth"
    torch.save({"model": perturbed(registry, "wrn_16_2", classes=100).state_dict()}, path)
    with pytest.raises(UserError) as err:
        load_published_teacher(path, fresh(registry, "wrn_16_2", classes=10))
    text = str(err.value)
    assert "its classifier has 100 classes, the data set 10" in text
    assert "fc.weight (100, 32) in the file vs (10, 32) in the model" in text


def test_wrong_architecture_names_missing_and_unexpected_keys(registry, tmp_path):
    path = tmp_path / "vgg13.pth"
    torch.save({"model": perturbed(registry, "vgg13").state_dict()}, path)
    target = fresh(registry, "vgg8")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError) as err:
        load_published_teacher(path, target)
    text = str(err.value)
    assert "does not fit the teacher model VGG" in text
    # VGG13 has every VGG8 key (with the same shapes: block g's first conv) plus a second conv
    # per block: nothing missing, the extra convs unexpected.
    assert "unexpected key(s) in the file: block0.3.weight" in text
    assert "missing" not in text and "shape mismatch" not in text
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), \
        "a failed load must leave the model untouched"

    torch.save({"model": perturbed(registry, "resnet18").state_dict()}, path)
    with pytest.raises(UserError, match=r"(?s)missing from the file: block0\.0\.weight.*"
                                        r"unexpected key\(s\) in the file: conv1\.weight.*"
                                        r"\(and \d+ more\).*different architecture"):
        load_published_teacher(path, fresh(registry, "vgg8"))


def test_unreadable_files_are_user_errors(registry, tmp_path):
    model = fresh(registry, "vgg8")
    with pytest.raises(UserError, match="teacher checkpoint not found"):
        load_published_teacher(tmp_path / "missing.pth", model)
    with pytest.raises(UserError, match="is a folder"):
        load_published_teacher(tmp_path, model)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_published_teacher(junk, model)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": model.state_dict(), "args": _Args()}, pickled)
    with pytest.raises(UserError, match=r"stores a Python object \(\S*_Args\).*Re-save just "
                                        r"the weights"):
        load_published_teacher(pickled, model)
    other = tmp_path / "other.pth"
    torch.save({"weights": model.state_dict(), "epoch": 3}, other)
    with pytest.raises(UserError, match=r"no state dict found.*'weights', 'epoch'"):
        load_published_teacher(other, model)


class _Args:  # what an argparse Namespace in a checkpoint looks like to the unpickler
    lr = 0.05
