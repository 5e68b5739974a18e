"""The ``timm`` model plugin: the kdbench feature protocol from timm's own feature API, feature
methods built and stepped on timm models through the registry and the engine's pieces (as
GridRunner._train_student builds them), OFD's clear error, and pretrained weights offline.

Small timm architectures with random init (no download): resnet10t (a timm ResNet: real
pre-activations and BN-before-ReLU), mobilenetv3_small_050 and test_convnext (no separable
pre-activation), at 32x32.
"""
from __future__ import annotations

import math

import pytest
import torch

from kdbench.api import ImageData, UserError
from kdbench.data.loader import DeviceData
from kdbench.engine.loop import autocast
from kdbench.engine.reproducibility import data_generator
from kdbench.engine.tasks import StudentTask, build_model, build_student_task, dummy_forward

torch.set_num_threads(1)

DEVICE = torch.device("cpu")
NUM_CLASSES, NUM_IMAGES, BATCH, SIZE = 5, 8, 4, 32
RESNET, MOBILE, CONVNEXT = "resnet10t", "mobilenetv3_small_050", "test_convnext"


@pytest.fixture(scope="module")
def train() -> DeviceData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (NUM_IMAGES, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    labels = torch.arange(NUM_IMAGES) % NUM_CLASSES
    return DeviceData(ImageData(images, labels, NUM_CLASSES, (0.5,) * 3, (0.25,) * 3), DEVICE)


def timm_spec(model: str, **params) -> dict:
    return {"name": "timm", "params": {"model": model, **params}}


def build(registry, spec: dict, train: DeviceData):
    torch.manual_seed(0)
    return build_model(registry, spec, train.num_classes).to(DEVICE)


def student_task(registry, student_spec, teacher, methods: list[tuple[str, float, dict]], train) -> StudentTask:
    """A student run's task, from the engine's builder (the student seeded as ``build`` does)."""
    return build_student_task(registry, methods, build(registry, student_spec, train), teacher,
                              train, DEVICE)


# ------------------------------------------------------------------------------ the protocol
@pytest.mark.parametrize("name", [RESNET, MOBILE, CONVNEXT])
def test_output_protocol_matches_timm(registry, train, name):
    model = build(registry, timm_spec(name), train).eval()
    x = train.normalize(train.images[:2])
    with torch.no_grad():
        out = model(x)
        logits = model.model(x)  # timm's own forward
        pre_logits = model.model.forward_head(model.model.forward_features(x), pre_logits=True)
    info = model.model.feature_info
    assert torch.allclose(out.logits, logits, atol=1e-5)
    assert torch.allclose(out.pooled, pre_logits.flatten(1), atol=1e-5)
    assert [f.shape[1] for f in out.feats] == [d["num_chs"] for d in info]
    assert [SIZE // f.shape[-1] for f in out.feats] == [d["reduction"] for d in info]
    assert model.stage_channels() == [f.shape[1] for f in out.feats[1:]]
    assert [p.shape for p in out.preact_feats] == [f.shape for f in out.feats]
    # The state dict is timm's own, under the wrapper's "model." prefix, nothing twice.
    assert [k for k in model.state_dict()] == [f"model.{k}" for k in model.model.state_dict()]


def test_resnet_exposes_real_preactivations(registry, train):
    # timm zero-initialises each block's last BN (zero_init_last), which makes the first
    # stage's residual sum equal to its (non-negative) shortcut at init: turn that off here.
    model = build(registry, timm_spec(RESNET, kwargs={"zero_init_last": False}), train)
    model.train()
    out = model(train.normalize(train.images[:4]))
    for pre, feat in zip(out.preact_feats, out.feats):
        assert pre is not feat
        assert torch.equal(torch.relu(pre), feat)
        assert (pre < 0).any()  # a real pre-activation, not the post-ReLU map again
    bns = model.bn_before_relu()
    assert [bn.num_features for bn in bns] == model.stage_channels()
    # The BN before each stage's final ReLU is the last block's last BN, a trained submodule.
    assert all(any(bn is m for m in model.modules()) for bn in bns)


@pytest.mark.parametrize("name", [MOBILE, CONVNEXT])
def test_no_preactivation_means_clear_ofd_error(registry, train, name):
    model = build(registry, timm_spec(name), train)
    out = dummy_forward(model, train)
    assert all(p is f for p, f in zip(out.preact_feats, out.feats))
    with pytest.raises(UserError, match=rf"OFD needs pre-ReLU features and the BN before each "
                                        rf"stage's ReLU; timm model '{name}' does not expose them"):
        model.bn_before_relu()


# ------------------------------------------------------------------------- methods, one step
def one_step(task: StudentTask, train: DeviceData, epoch: int = 20) -> dict:
    batch = next(train.train_batches(BATCH, data_generator(0, DEVICE), task.views, epoch, 240, 0))
    for m in task.modules():
        m.train()
    with autocast(DEVICE, "auto"):
        terms, logits = task.loss_terms(batch)
    loss = sum(terms.values())
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert all(v.dim() == 0 and math.isfinite(v.item()) for v in terms.values()), terms
    params = [p for m in task.modules() for p in m.parameters() if p.requires_grad]
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.student.parameters())
    assert all(p.grad is None for p in task.teacher.parameters()), "gradient reached the teacher"
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    opt.step()
    return terms


METHODS = {  # name -> (weight, params, the terms it returns)
    "kd": (0.9, {}, {"kd"}),
    "fitnet": (100.0, {}, {"fitnet"}),
    "vid": (1.0, {}, {"vid"}),
    "reviewkd": (5.0, {}, {"reviewkd"}),
}
PAIRS = [  # teacher spec, student spec
    (timm_spec(RESNET), timm_spec(MOBILE)),                            # timm -> timm
    (timm_spec(CONVNEXT), {"name": "resnet18", "params": {"width_mult": 0.25}}),  # timm -> zoo
    ({"name": "mobilenetv2", "params": {"width_mult": 0.25}}, timm_spec(RESNET)),   # zoo -> timm
]
PAIR_IDS = ["resnet10t-mobilenetv3", "convnext-zoo_resnet18", "zoo_mobilenetv2-resnet10t"]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("teacher_spec,student_spec", PAIRS, ids=PAIR_IDS)
def test_feature_methods_one_step(registry, train, method, teacher_spec, student_spec):
    teacher = build(registry, teacher_spec, train).eval()
    teacher.requires_grad_(False)
    weight, params, names = METHODS[method]
    task = student_task(registry, student_spec, teacher,
                        [("ce", 0.1, {}), (method, weight, params)], train)
    terms = one_step(task, train)
    assert set(terms) == {"ce"} | names


def test_fitnet_resolution_mismatch_is_a_clear_error(registry, train):
    """timm nets have ImageNet stems (4x downsampling), the CIFAR zoo nets keep full resolution:
    at 32x32 a zoo WRN's feats[2] is 16x16 and resnet10t's 4x4, which FitNet's regressor does
    not bridge. It says so (and names hint_layer) instead of failing inside a conv."""
    teacher = build(registry, {"name": "wrn_40_2", "params": {"width_mult": 0.25}}, train).eval()
    with pytest.raises(UserError, match="fitnet: cannot regress a student map of size 4x4 onto "
                                        "a teacher map of size 16x16"):
        student_task(registry, timm_spec(RESNET), teacher, [("fitnet", 100.0, {})], train)


def test_ofd_with_a_timm_resnet_teacher(registry, train):
    teacher = build(registry, timm_spec(RESNET), train).eval()
    teacher.requires_grad_(False)
    task = student_task(registry, timm_spec(RESNET), teacher,
                        [("ce", 1.0, {}), ("ofd", 0.001, {})], train)
    assert set(one_step(task, train)) == {"ce", "ofd"}


@pytest.mark.parametrize("name", [MOBILE, CONVNEXT])
def test_ofd_with_other_timm_teachers_is_a_clear_error(registry, train, name):
    teacher = build(registry, timm_spec(name), train).eval()
    with pytest.raises(UserError, match=f"timm model '{name}' does not expose them"):
        student_task(registry, {"name": "resnet18", "params": {"width_mult": 0.25}}, teacher,
                     [("ce", 1.0, {}), ("ofd", 0.001, {})], train)


# ------------------------------------------------------------------------------ parameters
def test_unknown_model_suggests_names(registry):
    plugin = registry.find("model", "timm")
    with pytest.raises(Exception, match=r"unknown timm model 'resnet10x'.*did you mean"):
        plugin.params.model_validate({"model": "resnet10x"})
    with pytest.raises(Exception, match="num_classes"):
        plugin.params.model_validate({"model": RESNET, "kwargs": {"num_classes": 3}})


def test_recipe_with_timm_models_validates(registry, tiny_recipe, tmp_path):
    from kdbench.recipe import expand, load_recipe

    path = tiny_recipe(
        file="timm.toml",
        pairs=[{"teacher": {"name": "timm", "model": RESNET},
                "student": {"name": "timm", "model": MOBILE, "drop_rate": 0.1}}],
        method_sets=[{"methods": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}]}],
        teacher_schedule={"epochs": 1, "batch_size": 8, "lr": 0.1, "milestones": None},
        student_schedule={"batch_size": 8, "lr": 0.1})
    teachers, students = expand(load_recipe(path, registry), registry)
    assert len(teachers) == 1 and len(students) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text(path.read_text().replace(f'model = "{MOBILE}"', 'model = "mobilenetv3_smal"'))
    with pytest.raises(UserError, match=r"unknown timm model 'mobilenetv3_smal'"):
        load_recipe(bad, registry)


def test_pretrained_file_loads_local_weights(registry, train, tmp_path):
    source = build(registry, timm_spec(RESNET), train)
    with torch.no_grad():
        for p in source.model.parameters():
            p.add_(0.01)
    path = tmp_path / "weights.pth"
    torch.save(source.model.state_dict(), path)
    loaded = build(registry, timm_spec(RESNET, pretrained_file=str(path)), train)
    for (k, a), b in zip(source.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k  # classifier included: its class count fits
    # A file whose head has another class count (e.g. ImageNet weights): the backbone is loaded,
    # the classifier starts fresh (timm's fine-tuning behaviour).
    other = build_model(registry, timm_spec(RESNET), NUM_CLASSES + 3)
    other_path = tmp_path / "other.pth"
    torch.save(other.model.state_dict(), other_path)
    fresh = build(registry, timm_spec(RESNET, pretrained_file=str(other_path)), train)
    assert fresh.model.fc.weight.shape[0] == NUM_CLASSES
    assert torch.equal(fresh.model.layer4[0].conv1.weight, other.model.layer4[0].conv1.weight)
    with pytest.raises(UserError, match="does not exist"):
        build(registry, timm_spec(RESNET, pretrained_file=str(tmp_path / "nope.pth")), train)


def test_pretrained_offline_is_a_clear_error(registry, train, tmp_path, monkeypatch):
    """No weights in the (empty) cache and no network: one clear UserError, fast."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"pretrained = true, but its weights could not be loaded"
                                        r".*does not download weights"):
        build(registry, timm_spec(RESNET, pretrained=True), train)
