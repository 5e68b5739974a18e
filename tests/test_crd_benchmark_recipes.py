"""The CRD benchmark recipes (issue 17, item 2): the 13 pairs, the standard protocol, the reference
scripts' per-pair settings (lr 0.01 for MobileNetV2/ShuffleNet students, DKD's β), every method."""
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
    everything = set(registry.names("student_method")) - {"kdsvd"}  # KDSVD refuses unequal channels
    assert methods == everything
    teachers, students = expand(loaded, registry)
    assert len(teachers) == len({p.teacher.name for p in r.pairs})  # one teacher per architecture
    for s in students:
        pair = next((p.teacher.name, p.student.name) for p in r.pairs if p.display == s.meta.pair)
        lr = s.spec["schedule"]["lr"]
        assert lr == (0.01 if pair[1] in ("mobilenetv2", "shufflenetv1", "shufflenetv2") else 0.05), pair
        for m in s.spec["methods"]:
            if m["name"] == "dkd":
                assert m["params"]["beta"] == DKD_BETA.get(pair, 8.0), pair
