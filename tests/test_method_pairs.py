"""Every student method on every teacher -> student pair of the paper's and the CRD benchmark's
recipes, through the real registry and the
engine's own pieces (build_model and kdbench.engine.tasks.build_student_task, as a student run builds
it, StudentTask, DeviceData.train_batches, make_optimizer, autocast): one training step each, of
the set ce + kd + the method (every method combined with KD), and for a method with an
initialisation stage (AB, FT, FSP) one step of that stage too (kdbench.engine.tasks.InitTask);
and the KD set trained with each optimizer plugin (DOT), one step each.

Models are thin copies (``width_mult`` 0.125-0.25: same depth, stages and feature protocol as the
published nets) so the whole file stays fast on a CPU. Only the kdbench distribution's plugins
are loaded (``KDBENCH_ONLY_DISTS=kdbench``).

The teacher is built as ``GridRunner.load_teacher`` leaves it (eval mode, not in any optimizer)
*except* that its parameters keep ``requires_grad=True``: the runner's ``requires_grad_(False)``
would make "the teacher gets no gradient" true by construction; here it has to hold because
StudentTask runs the teacher under ``no_grad`` and no method calls teacher modules with grad.
"""
from __future__ import annotations

import math

import pytest
import torch

from kdbench.api import ImageData, UserError
from kdbench.data.loader import DeviceData
from kdbench.engine.loop import autocast, make_optimizer
from kdbench.engine import tasks
from kdbench.engine.reproducibility import data_generator
from kdbench.engine.tasks import InitTask, StudentTask, build_model
from kdbench.recipe import Schedule
from conftest import builtin_registry

torch.set_num_threads(1)

DEVICE = torch.device("cpu")
PRECISION = "auto"  # the recipe default (fp32 on the CPU)
NUM_CLASSES, NUM_IMAGES, BATCH = 5, 8, 4
# A mid-training step: ReviewKD's warm-up factor min(epoch / 20, 1) is 0 at epoch 0, which would
# make its loss (and every gradient check below) vacuous.
EPOCH, EPOCHS = 20, 240
# Thin nets; the CIFAR ResNets keep full resolution through their first stage (no stem
# downsampling), so they get the thinnest copies. mobilenetv2's own default is 0.5.
WIDTH = {"resnet50": 0.125, "resnet34": 0.125}
DEFAULT_WIDTH = 0.25

PAIRS = [  # (teacher, student): the CIFAR-100 pairs of the paper's tables
    ("resnet50", "resnet34"),
    ("wrn_40_2", "wrn_16_2"),
    ("vgg13", "vgg8"),
    ("resnet50", "mobilenetv2"),
    ("vgg13", "mobilenetv2"),
    ("wrn_40_2", "shufflenetv2"),
]
CRD_PAIRS = [  # the CRD benchmark's other pairs (recipes/crd_benchmark/*.toml: CIFAR-100, 32 px)
    ("wrn_40_2", "wrn_40_1"),
    ("resnet56", "resnet20"),
    ("resnet110", "resnet20"),
    ("resnet110", "resnet32"),
    ("resnet32x4", "resnet8x4"),
    ("resnet50", "vgg8"),
    ("resnet32x4", "shufflenetv1"),
    ("resnet32x4", "shufflenetv2"),
    ("wrn_40_2", "shufflenetv1"),
]
# (teacher, student, image size): every pair at 32 px, the paper's pairs also at 64 px (its
# Tiny-ImageNet recipes; the CRD benchmark is CIFAR-100 only). 64 px doubles the grid's time and
# exercises the same code: CI runs it, the quick loop (-m "not slow") does not.
CASES = [pytest.param(t, st, px, id=f"{t}-{st}-{px}", marks=pytest.mark.slow if px == 64 else ())
         for px, pairs in ((32, PAIRS + CRD_PAIRS), (64, PAIRS)) for t, st in pairs]

# The terms each method returns (checked exactly in the combination tests).
TERMS = {
    "ce": {"ce"},
    "kd": {"kd"},
    "fitnet": {"fitnet"},
    "rkd": {"rkd_distance", "rkd_angle"},
    "crd": {"crd"},
    "ofd": {"ofd"},
    "reviewkd": {"reviewkd"},
    "vid": {"vid"},
    # The strong view trains the instance level only, as the reference code does (see mlld.py).
    "mlld": {"mlld_instance_weak", "mlld_batch_weak", "mlld_class_weak",
             "mlld_instance_strong", "mlld_ce_strong"},
    "at": {"at"}, "sp": {"sp"}, "cc": {"cc"}, "pkt": {"pkt"}, "nst": {"nst"}, "kdsvd": {"kdsvd"},
    "dkd": {"dkd_tckd", "dkd_nckd"}, "dist": {"dist_inter", "dist_intra"}, "ctkd": {"ctkd"},
    # Two-stage methods: AB and FSP distil in their init stage only (no main-schedule term).
    "ab": set(), "ft": {"ft"}, "fsp": set(),
}
# The terms of their initialisation stage.
STAGE_TERMS = {"ab": {"ab"}, "ft": {"ft_rec"}, "fsp": {"fsp"}}
# KDSVD compares singular vectors channel by channel: it refuses a pair whose matched stages
# differ in channels (as its reference breaks on them), with a clear error.
UNEQUAL_CHANNELS = {("resnet50", "resnet34"), ("resnet50", "mobilenetv2"), ("vgg13", "mobilenetv2"),
                    ("wrn_40_2", "shufflenetv2"), ("wrn_40_2", "wrn_40_1"), ("resnet50", "vgg8"),
                    ("resnet32x4", "shufflenetv1"), ("resnet32x4", "shufflenetv2"),
                    ("wrn_40_2", "shufflenetv1")}
REFUSES = {"kdsvd": UNEQUAL_CHANNELS, "fsp": UNEQUAL_CHANNELS}  # FSP: the same, its matrices


# Collected from the registry itself, so a newly registered method is tested automatically.
METHODS = [n for n in builtin_registry().names("student_method") if n != "ce"]


def test_every_method_has_expected_terms():
    assert set(METHODS) | {"ce"} == set(TERMS), "update TERMS for the new/removed method"


# ------------------------------------------------------------------------------------- helpers
def tiny_data(size: int, seed: int = 0) -> DeviceData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (NUM_IMAGES, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(NUM_IMAGES) % NUM_CLASSES
    data = ImageData(images, labels, NUM_CLASSES, (0.5, 0.48, 0.44), (0.25, 0.24, 0.26))
    return DeviceData(data, DEVICE, builtin_registry().view_makers())


def model_spec(name: str) -> dict:
    return {"name": name, "params": {"width_mult": WIDTH.get(name, DEFAULT_WIDTH)}}


def build_teacher(registry, name: str, train: DeviceData):
    """As GridRunner.load_teacher (minus the weights file), parameters left requiring grad, with
    BatchNorm running statistics of the tiny data, as a trained teacher has its data's: a random
    net's identity statistics let a deep teacher's features grow through its residual stages
    (resnet110: ~4e6 at the last stage), which no trained teacher has and which made FT's
    reconstruction diverge."""
    model = build_model(registry, model_spec(name), train.num_classes).to(DEVICE)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for x, _ in train.eval_batches(NUM_IMAGES):
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return model


def build_student_task(registry, student_spec: dict, teacher, method_specs: list[dict],
                       train: DeviceData, device: torch.device) -> StudentTask:
    """The engine's own task builder (kdbench.engine.tasks.build_student_task), as a student
    run calls it: the student built from its spec, the method specs as the grid writes them."""
    student = build_model(registry, student_spec, train.num_classes).to(device)
    terms = [(t["name"], t["weight"], t["params"]) for t in method_specs]
    return tasks.build_student_task(registry, terms, student, teacher, train, device)


def method_specs(registry, names: list[str]) -> list[dict]:
    """ce at 0.1 (the Hinton-KD convention) + each method at its card's default weight; an init
    stage of one epoch (what the engine would run first)."""
    specs = [{"name": "ce", "weight": 0.1, "params": {}}]
    for n in names:
        plugin = registry.find("student_method", n)
        params = {"init_epochs": 1} if "init_epochs" in plugin.params.model_fields else {}
        specs.append({"name": n, "weight": plugin.factory.default_weight, "params": params})
    return specs


def optimizer_params(task: StudentTask):
    """What ``fit`` hands to the optimizer."""
    return [p for m in task.modules() for p in m.parameters() if p.requires_grad]


def first_batch(task: StudentTask, train: DeviceData, step: int = 0):
    gen = data_generator(0, DEVICE)
    return next(train.train_batches(BATCH, gen, task.views, EPOCH, EPOCHS, step))


def step_terms(task: StudentTask, batch):
    for m in task.modules():
        m.train()
    with autocast(DEVICE, PRECISION):
        terms, logits = task.loss_terms(batch)
        loss = sum(terms.values())
    return terms, logits, loss


def _bad_grads(named_params) -> list[str]:
    return [n for n, p in named_params if p.grad is None or not torch.isfinite(p.grad).all()]


# ------------------------------------------------------------------------------ one step each
@pytest.mark.parametrize("teacher_name,student_name,size", CASES)
@pytest.mark.parametrize("method_name", METHODS)
def test_method_pair_one_step(registry, method_name, teacher_name, student_name, size):
    torch.manual_seed(0)
    train = tiny_data(size)
    teacher = build_teacher(registry, teacher_name, train)
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    names = list(dict.fromkeys(["kd", method_name]))  # every method combined with KD
    if (teacher_name, student_name) in REFUSES.get(method_name, ()):
        with pytest.raises(UserError, match="same channel count"):
            build_student_task(registry, model_spec(student_name), teacher,
                               method_specs(registry, names), train, DEVICE)
        return
    task = build_student_task(registry, model_spec(student_name), teacher,
                              method_specs(registry, names), train, DEVICE)
    student = task.student
    _, weight, method = task.methods[-1]

    # What the optimizer gets: student + methods, no teacher parameter, no duplicates.
    params = optimizer_params(task)
    ids = [id(p) for p in params]
    assert len(ids) == len(set(ids)), "a parameter is handed to the optimizer twice"
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & set(ids), "a teacher parameter would be trained"
    student_ids = {id(p) for p in student.parameters()}
    batch = first_batch(task, train)
    assert set(batch.views) == set(method.views)

    # The initialisation stage first, as the engine runs it.
    stage = method.init_stage()
    assert (stage is not None) == (method_name in STAGE_TERMS)
    stage_ids = set() if stage is None else {id(p) for m in stage.modules for p in m.parameters()}
    if stage is not None:
        init_stage_step(InitTask(student, teacher, stage), method_name, batch, teacher_ids)
    # Parameters of the stage's own modules may rest in the main schedule (AB's connectors, FT's
    # paraphraser); every other parameter of the method must learn.
    own = [(n, p) for n, p in method.named_parameters()
           if id(p) not in student_ids and id(p) not in stage_ids]
    optimizer, _ = make_optimizer(params, Schedule(epochs=1, batch_size=BATCH, lr=0.01), DEVICE)
    terms, logits, loss = step_terms(task, batch)

    assert logits.shape == (BATCH, NUM_CLASSES)
    assert set(terms) == TERMS["ce"] | TERMS["kd"] | TERMS[method_name]
    for k, v in terms.items():
        assert v.dim() == 0 and math.isfinite(v.item()), (k, v)
    assert math.isfinite(loss.item())

    # The method's own terms must reach the student (not only through the CE and KD terms).
    if TERMS[method_name]:
        method_loss = sum(terms[k] for k in TERMS[method_name])
        assert method_loss.requires_grad, f"{method_name}'s terms do not depend on the student"
        s_params = [p for p in student.parameters() if p.requires_grad]
        g = torch.autograd.grad(method_loss, s_params, retain_graph=True, allow_unused=True)
        assert any(x is not None and x.abs().sum() > 0 for x in g), \
            f"{method_name} gives the student no gradient"
        assert all(x is None or torch.isfinite(x).all() for x in g)

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    assert not [n for n, p in teacher.named_parameters() if p.grad is not None], \
        "gradient reached the teacher"
    assert not _bad_grads(student.named_parameters()), "student params without finite grad"
    if own:
        bad = _bad_grads(own)
        assert not bad, f"{method_name} params without finite grad: {bad}"
        assert any(p.grad.abs().sum() > 0 for _, p in own), f"{method_name} params get zero grad"

    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(b, p) for b, p in zip(before, params)), "SGD step changed nothing"
    for n, p in teacher.named_parameters():
        assert torch.equal(p, teacher_before[n]), f"teacher parameter {n} changed"


OPTIMIZERS = builtin_registry().names("optimizer")


@pytest.mark.parametrize("teacher_name,student_name,size", CASES)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_optimizer_pair_one_step(registry, optimizer_name, teacher_name, student_name, size):
    """The KD set (ce 0.1 + kd 0.9) trained with each optimizer plugin (DOT: the row mdistiller
    reports): one step through the engine's train_step moves every student parameter, keeps
    the loss finite and leaves the teacher as it was."""
    from kdbench.engine.loop import train_step

    torch.manual_seed(0)
    train = tiny_data(size)
    teacher = build_teacher(registry, teacher_name, train)
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    student = build_model(registry, model_spec(student_name), train.num_classes).to(DEVICE)
    task = tasks.build_student_task(registry, [("ce", 0.1, {}), ("kd", 0.9, {})], student, teacher,
                                    train, DEVICE, optimizer=(optimizer_name, {}))
    params = optimizer_params(task)
    optimizer, _ = make_optimizer(params, Schedule(epochs=1, batch_size=BATCH, lr=0.01), DEVICE,
                                  task.update_rule)
    before = [p.detach().clone() for p in params]
    for m in task.modules():
        m.train()
    loss, terms, _ = train_step(task, first_batch(task, train), optimizer, DEVICE, PRECISION)
    assert set(terms) == {"ce", "kd"} and math.isfinite(loss.item())
    assert all(torch.isfinite(p).all() for p in params)
    unmoved = [n for (n, p), b in zip(student.named_parameters(), before) if torch.equal(b, p)]
    assert not unmoved, f"{optimizer_name} left student parameters unchanged: {unmoved[:5]}"
    for n, p in teacher.named_parameters():
        assert p.grad is None and torch.equal(p, teacher_before[n]), f"teacher parameter {n} changed"


def init_stage_step(init: InitTask, method_name: str, batch, teacher_ids: set[int]) -> None:
    """One SGD step of a method's initialisation stage: its terms finite, gradient on its
    modules (never the teacher), and a parameter without gradient left as it was."""
    params = [p for m in init.modules() for p in m.parameters() if p.requires_grad]
    assert params and len({id(p) for p in params}) == len(params)
    assert not teacher_ids & {id(p) for p in params}, "the init stage would train the teacher"
    lr = init.stage.lr if init.stage.lr is not None else 0.01
    optimizer, _ = make_optimizer(params, Schedule(epochs=1, batch_size=BATCH, lr=lr), DEVICE)
    for m in init.modules():
        m.train()
    with autocast(DEVICE, PRECISION):
        terms, _ = init.loss_terms(batch)
        loss = sum(terms.values())
    assert set(terms) == STAGE_TERMS[method_name]
    assert all(v.dim() == 0 and math.isfinite(v.item()) for v in terms.values()), terms
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is None for p in init.teacher.parameters()), "gradient reached the teacher"
    learning = [p for p in params if p.grad is not None]
    assert learning and all(torch.isfinite(p.grad).all() for p in learning)
    assert any(p.grad.abs().sum() > 0 for p in learning), f"{method_name}'s stage gives no gradient"
    before = [p.detach().clone() for p in params]
    optimizer.step()
    for b, p in zip(before, params):
        if p.grad is None:
            assert torch.equal(b, p), "the stage changed a parameter it gives no gradient"
    assert any(not torch.equal(b, p) for b, p in zip(before, params)), "the stage's step changed nothing"


# ------------------------------------------------------------------------------ combinations
class ForwardCounter:
    def __init__(self, *models):
        self.calls = {id(m): 0 for m in models}
        self.handles = [m.register_forward_hook(self._hook) for m in models]

    def _hook(self, module, args, output):
        self.calls[id(module)] += 1

    def __getitem__(self, model):
        return self.calls[id(model)]


COMBOS = [["kd", "rkd"], ["kd", "crd"], ["kd", "mlld", "fitnet"], "all"]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: c if isinstance(c, str) else "+".join(c))
def test_method_combination_shares_forwards(registry, combo):
    names = METHODS if combo == "all" else combo
    torch.manual_seed(0)
    train = tiny_data(32)
    teacher = build_teacher(registry, "wrn_40_2", train)
    task = build_student_task(registry, model_spec("wrn_16_2"), teacher,
                              method_specs(registry, names), train, DEVICE)
    expected_views = tuple(dict.fromkeys(v for n in names
                                         for v in registry.find("student_method", n).factory.views))
    assert task.views == expected_views
    optimizer, _ = make_optimizer(optimizer_params(task),
                                  Schedule(epochs=1, batch_size=BATCH, lr=0.01), DEVICE)
    counter = ForwardCounter(task.student, teacher)  # after the set-up's dummy forwards
    gen = data_generator(0, DEVICE)
    batches = train.train_batches(BATCH, gen, task.views, EPOCH, EPOCHS, 0)
    expected_terms = set().union(*(TERMS[n] for n in ["ce", *names]))
    for step, batch in enumerate(batches, start=1):
        terms, _, loss = step_terms(task, batch)
        per_step = 1 + len(task.views)
        assert counter[task.student] == step * per_step
        assert counter[teacher] == step * per_step
        assert set(terms) == expected_terms
        assert all(math.isfinite(v.item()) for v in terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
    assert step == NUM_IMAGES // BATCH
