"""The CRD benchmark recipes (issue 17, item 2; issue 18): the 13 pairs, the standard protocol, the
reference scripts' per-pair settings (lr 0.01 for MobileNetV2/ShuffleNet students, DKD's β, FT's
init lr 0.05 for VGG students), every method; KDSVD and FSP (which refuse pairs of unequal channel
counts) in the equal-channels recipe, whose teachers and Student/KD runs are the homogeneous one's."""
from pathlib import Path

import pytest

from kdbench.recipe import expand, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "crd_benchmark"
PAIRS = {
    "homogeneous": [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
                    ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
                    ("vgg13", "vgg8")],
    "heterogeneous": [("vgg13", "mobilenetv2"), ("resnet50", "mobilenetv2"), ("resnet50", "vgg8"),
                      ("resnet32x4", "shufflenetv1"), ("resnet32x4", "shufflenetv2"), ("wrn_40_2", "shufflenetv1")],
}
EQUAL_CHANNELS_ONLY = {"kdsvd", "fsp"}  # compare channels entry by entry: refuse unequal counts
DKD_BETA = {("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0, ("vgg13", "vgg8"): 6.0,
            ("vgg13", "mobilenetv2"): 6.0, ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0}


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_the_crd_benchmark_recipe(registry, kind):
    loaded = load_recipe(RECIPES / f"cifar100_{kind}.toml", registry, check_device=False, check_files=False)
    r = loaded.recipe
    assert [(p.teacher.name, p.student.name) for p in r.pairs] == PAIRS[kind]
    for sched in (r.teacher_schedule, r.student_schedule):
        assert (sched.epochs, sched.batch_size, sched.lr, sched.milestones, sched.weight_decay) == (240, 64, 0.05, [150, 180, 210], 5e-4)
    methods = {t.name for ms in r.method_sets for t in ms.methods}
    everything = set(registry.names("student_method")) - EQUAL_CHANNELS_ONLY
    assert methods == everything
    # ... and every optimizer, as a row of its own (DOT: KD trained with it, as mdistiller's).
    assert {ms.optimizer.name for ms in r.method_sets if ms.optimizer} == set(registry.names("optimizer"))
    assert "DOT" in r.reference.literature
    teachers, students = expand(loaded, registry)
    assert len(teachers) == len({p.teacher.name for p in r.pairs})  # one teacher per architecture
    for s in students:
        pair = next((p.teacher.name, p.student.name) for p in r.pairs if p.display == s.meta.pair)
        lr = s.spec["schedule"]["lr"]
        assert lr == (0.01 if pair[1] in ("mobilenetv2", "shufflenetv1", "shufflenetv2") else 0.05), pair
        for m in s.spec["methods"]:
            if m["name"] == "dkd":
                assert m["params"]["beta"] == DKD_BETA.get(pair, 8.0), pair
            if m["name"] == "ft":
                assert m["params"].get("init_lr", 0.01) == (0.05 if pair[1] == "vgg8" else 0.01), pair


def test_the_equal_channels_recipe_reuses_the_homogeneous_runs(registry):
    load = lambda name: load_recipe(RECIPES / f"cifar100_{name}.toml", registry, check_device=False,  # noqa: E731
                                    check_files=False)
    equal, homo = load("equal_channels"), load("homogeneous")
    assert [(p.teacher.name, p.student.name) for p in equal.recipe.pairs] == \
        [p for p in PAIRS["homogeneous"] if p != ("wrn_40_2", "wrn_40_1")]
    assert {t.name for ms in equal.recipe.method_sets for t in ms.methods} == {"ce", "kd"} | EQUAL_CHANNELS_ONLY
    assert equal.recipe.output == homo.recipe.output
    e_teachers, e_students = expand(equal, registry)
    h_teachers, h_students = expand(homo, registry)
    assert {t.id for t in e_teachers} <= {t.id for t in h_teachers}
    shared = {s.id for s in e_students if s.meta.method_set in ("Student", "KD")}
    assert shared and shared <= {s.id for s in h_students}


@pytest.mark.slow
def test_every_equal_channels_pair_builds_kdsvd_and_fsp(registry):
    """The published nets of each pair (no training): KDSVD's and FSP's set-up, which raise a
    UserError on unequal channel counts, accept them (about 10 s of CPU)."""
    import torch

    from kdbench.engine.tasks import build_model, method_setup
    equal = load_recipe(RECIPES / "cifar100_equal_channels.toml", registry, check_device=False, check_files=False)
    for pair in equal.recipe.pairs:
        nets = [build_model(registry, {"name": m.name, "params": {}}, 100).eval() for m in (pair.student, pair.teacher)]
        with torch.no_grad():
            outs = [n(torch.zeros(2, 3, 32, 32)) for n in nets]
        setup = method_setup(nets[0], nets[1], outs[0], outs[1], torch.arange(10), 100, 32, torch.device("cpu"))
        for name in EQUAL_CHANNELS_ONLY:
            plugin = registry.find("student_method", name)
            plugin.factory(plugin.params(), setup)  # raises UserError on unequal channels
