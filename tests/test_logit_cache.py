"""The teacher logit cache (kdbench/engine/logit_cache.py), epoch plans, and the frozen
teacher's one-time cast to the autocast dtype."""
import pytest
import torch
from torch import nn

from conftest import read_records
from kdbench.api import ImageData, ModelOutput
from kdbench.cli import main
from kdbench.data.augment import crop_flip_code, crop_flip_decode, num_crop_flip_codes
from kdbench.data.loader import DeviceData
from kdbench.engine.logit_cache import TeacherLogitCache
from kdbench.engine.tasks import StudentTask, build_model, build_student_task, cast_teacher_once, dummy_forward

CPU = torch.device("cpu")


def _data(n=44, classes=4, size=16):
    g = torch.Generator().manual_seed(0)
    return DeviceData(ImageData(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                                torch.arange(n) % classes, classes, (0.5,) * 3, (0.25,) * 3), CPU)


def test_view_codes_number_all_162_crop_flip_views_and_decode_back():
    side = torch.arange(9)
    offsets = torch.cartesian_prod(side, side).repeat_interleave(2, 0)
    flips = torch.tensor([False, True]).repeat(81)
    code = crop_flip_code(offsets, flips)
    assert sorted(code.tolist()) == list(range(num_crop_flip_codes())) == list(range(162))
    back_offsets, back_flips = crop_flip_decode(code)
    assert torch.equal(back_offsets, offsets) and torch.equal(back_flips, flips)


def test_a_planned_epoch_is_the_unplanned_epoch():
    """Drawing the epoch's offsets and flips up front consumes the generator exactly as drawing
    them batch by batch: same batches, same view codes, same generator state after."""
    data = _data(n=45)  # 16 + 16 + 13
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    live = list(data.train_batches(16, g1))
    plan = data.epoch_plan(16, g2)
    planned = list(data.train_batches(16, g2, plan=plan))
    assert len(live) == len(planned) == 3
    for a, b in zip(live, planned):
        assert torch.equal(a.x, b.x) and torch.equal(a.index, b.index)
        assert a.view_code is None  # only planned epochs number their views
    assert torch.equal(g1.get_state(), g2.get_state())
    assert torch.equal(plan.index, torch.cat([b.index for b in live]))
    assert torch.equal(plan.view_code, torch.cat([b.view_code for b in planned]))
    with pytest.raises(ValueError, match="extra views"):
        next(data.train_batches(16, g2, views=("second",), plan=plan))


def test_cached_logits_are_the_eval_teachers_logits_and_computed_once(registry):
    data = _data()
    teacher = build_model(registry, {"name": "wrn_16_2", "params": {"width_mult": 0.25}}, 4).eval()
    cache = TeacherLogitCache(data, 4, torch.float32, chunk_size=16, amp=lambda: torch.autocast("cpu", enabled=False))
    cache.teacher = teacher
    g = torch.Generator().manual_seed(1)
    plan = data.epoch_plan(16, g)
    cache.fill(plan)
    assert cache.stats()["entries_computed"] == 44 == int(cache.filled.sum())
    with torch.no_grad():
        for batch in data.train_batches(16, g, plan=plan):
            live = teacher(batch.x).logits
            assert torch.equal(cache.logits(batch.index, batch.view_code), live)  # bit for bit
    cache.fill(plan)  # the same views again: nothing to compute
    assert cache.stats() == {"entries_computed": 44, "entries_served": 88, "teacher_forwards_saved": 0.5}


def test_a_cached_step_reads_the_table_and_never_runs_the_teacher(registry):
    """The step's teacher logits are the table's rows (zeroed here), with no teacher forward."""
    from kdbench_plugins.students.kd import kd_loss

    data = _data()
    net = lambda: build_model(registry, {"name": "wrn_16_2", "params": {"width_mult": 0.25}}, 4)  # noqa: E731
    teacher, student = net().eval().requires_grad_(False), net()
    plugin = registry.find("student_method", "kd")
    kd = plugin.factory(plugin.params.model_validate({}), None)
    task = StudentTask(student, teacher, [("kd", 1.0, kd)])
    cache = TeacherLogitCache(data, 4, torch.float32, chunk_size=16, amp=lambda: torch.autocast("cpu", enabled=False))
    cache.teacher = teacher
    task.use_logit_cache(cache)
    g = torch.Generator().manual_seed(3)
    plan = data.epoch_plan(16, g)
    task.start_epoch(plan)
    batch = next(data.train_batches(16, g, plan=plan))
    live_terms, _ = StudentTask(student, teacher, [("kd", 1.0, kd)]).loss_terms(batch)
    cached_terms, _ = task.loss_terms(batch)
    assert torch.equal(cached_terms["kd"], live_terms["kd"])
    cache.table.zero_()
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    terms, logits = task.loss_terms(batch)
    assert calls == []
    assert torch.equal(terms["kd"], kd_loss(logits, torch.zeros_like(logits), 4.0))
    assert not torch.equal(terms["kd"], live_terms["kd"])


class _Method(nn.Module):
    def __init__(self, logits_only=True, views=(), train_mode=False, needs_teacher=True):
        super().__init__()
        self.teacher_logits_only, self.views = logits_only, views
        self.teacher_train_mode, self.needs_teacher = train_mode, needs_teacher


def test_only_logit_only_sets_with_an_eval_teacher_and_no_views_can_use_the_cache():
    teacher = nn.Linear(2, 2)
    ok = StudentTask(nn.Linear(2, 2), teacher, [("ce", 0.1, _Method(False, needs_teacher=False)),
                                                ("kd", 0.9, _Method())])
    assert ok.logit_cache_blocker() is None
    cases = {"fitnet read(s) more": [("fitnet", 1, _Method(False))],
             "extra views ['strong']": [("mlld", 1, _Method(views=("strong",)))],
             "train mode": [("ofd", 1, _Method(train_mode=True))]}
    for why, methods in cases.items():
        assert why in StudentTask(nn.Linear(2, 2), teacher, methods).logit_cache_blocker()
    assert StudentTask(nn.Linear(2, 2), None, [("ce", 1, _Method(False, needs_teacher=False))]
                       ).logit_cache_blocker() == "no teacher"


FITNET_SET = """
[[method_sets]]
label = "FitNet"
ref_method = "FitNet"
methods = [{ name = "ce" }, { name = "fitnet" }]
"""


def test_kd_students_trained_with_the_cache_are_bit_identical(tiny_recipe, tmp_path):
    """Two seeds of KD share one teacher (teacher_seed = 0): with the cache their weights are
    bit-identical to the live teacher's, the second student reuses the first one's entries, and
    a FitNet set (reads features) runs live and says why."""
    grid = dict(seeds=(0, 1), extra=FITNET_SET, student_schedule={"epochs": 3})
    recipe = tiny_recipe(**grid, top={"teacher_seed": 0})
    cached = tiny_recipe(**grid, top={"teacher_seed": 0, "teacher_logit_cache": True}, file="cached.toml")
    assert main(["run", str(recipe), "--plain", "--output", str(tmp_path / "live")]) == 0
    assert main(["run", str(cached), "--plain", "--output", str(tmp_path / "cached")]) == 0
    live, with_cache = read_records(tmp_path / "live", "students"), read_records(tmp_path / "cached", "students")
    assert live.keys() == with_cache.keys() and len(live) == 6  # the cache is not part of run ids
    for run_id, rec in with_cache.items():
        assert rec["weights_sha256"] == live[run_id]["weights_sha256"]
        assert rec["epochs"] == live[run_id]["epochs"]
        assert "teacher_logit_cache" not in live[run_id]
    kd = sorted((r for r in with_cache.values() if r["meta"]["method_set"] == "KD"), key=lambda r: r["spec"]["seed"])
    n = 48 * 3  # 48 training images, 3 epochs
    first, second = kd[0]["teacher_logit_cache"], kd[1]["teacher_logit_cache"]
    assert first["used"] and not first["shared_with_earlier_student"] and first["entries_served"] == n
    assert second["shared_with_earlier_student"] and second["entries_served"] == n
    assert second["entries_computed"] < first["entries_computed"] <= n
    fitnet = next(r for r in with_cache.values() if r["meta"]["method_set"] == "FitNet")
    assert fitnet["teacher_logit_cache"] == {"used": False, "why_not": "fitnet read(s) more than the teacher's logits"}
    assert "teacher_logit_cache" not in next(r for r in with_cache.values() if r["meta"]["method_set"] == "Student")


TWO_KD_SETS = """
[[method_sets]]
label = "KD T=2"
ref_method = "KD"
methods = [{ name = "ce", weight = 0.1 }, { name = "kd", weight = 0.9, temperature = 2 }]
"""


def test_students_of_a_teacher_run_back_to_back_and_share_its_table(tiny_recipe, tmp_path, monkeypatch):
    """Two seeds (a teacher each) x two KD sets: the grid's order alternates teachers; with the
    cache each teacher's two students run one after the other, the second reusing the table."""
    recipe = tiny_recipe(seeds=(0, 1), extra=TWO_KD_SETS, top={"teacher_logit_cache": True})
    from kdbench.engine import trainer

    order = []
    real = trainer.RunTrainer._train_student
    monkeypatch.setattr(trainer.RunTrainer, "_train_student",
                        lambda self, spec, ckpt: order.append(spec.teacher and spec.teacher.id) or real(self, spec, ckpt))
    assert main(["run", str(recipe), "--plain"]) == 0
    recs = [r for r in read_records(tmp_path / "runs", "students").values() if r["meta"]["method_set"] != "Student"]
    assert len(recs) == 4 and len(set(order) - {None}) == 2
    kd_order = [t for t in order if t is not None]
    assert kd_order[0] == kd_order[1] and kd_order[2] == kd_order[3] != kd_order[0]
    assert sorted(r["teacher_logit_cache"]["shared_with_earlier_student"] for r in recs) == [False, False, True, True]
    assert all(r["teacher_cast_once"] is False for r in recs)  # fp32 on the CPU: nothing to cast


def test_a_table_that_does_not_fit_leaves_the_teacher_live(tiny_recipe, tmp_path, monkeypatch):
    from kdbench.engine import logit_cache

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (test)")
    monkeypatch.setattr(logit_cache, "TeacherLogitCache", no_room)
    recipe = tiny_recipe(top={"teacher_logit_cache": True})
    assert main(["run", str(recipe), "--plain"]) == 0
    kd = next(r for r in read_records(tmp_path / "runs", "students").values() if r["meta"]["method_set"] == "KD")
    assert kd["status"] == "done" and not kd["teacher_logit_cache"]["used"]
    assert kd["teacher_logit_cache"]["why_not"].startswith("no room on cpu for the table")


@pytest.mark.parametrize("name", ["wrn_16_2", "resnet34", "vgg8", "mobilenetv2", "shufflenetv2"])
def test_teacher_cast_once_gives_bit_identical_outputs(registry, name):
    data = _data(n=8, size=32)
    teacher = build_model(registry, {"name": name, "params": {"width_mult": 0.25}}, 4).eval().requires_grad_(False)
    x = data.normalize(data.images)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = teacher(x)
        assert cast_teacher_once(teacher, data, CPU, "bf16")
        after = teacher(x)
    convs = [m for m in teacher.modules() if type(m) is nn.Conv2d]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert all(m.weight.dtype == torch.float32 for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
    for a, b in zip([before.logits, *before.feats, before.pooled], [after.logits, *after.feats, after.pooled]):
        assert torch.equal(a, b)
    assert not cast_teacher_once(build_model(registry, {"name": name, "params": {}}, 4), data, CPU, "fp32")


class _ReadsItsWeight(nn.Module):
    """A model that uses a weight outside an autocast op: casting it would change its output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        pooled = x.mean((2, 3))
        logits = self.fc(pooled) + self.fc.weight.float().sum()  # a sum is not an autocast op
        return ModelOutput(logits, [], [], pooled)


def test_teacher_cast_is_undone_when_outputs_would_change():
    data = _data(n=4, size=8)
    teacher = _ReadsItsWeight()
    original = teacher.fc.weight.detach().clone()
    assert not cast_teacher_once(teacher, data, CPU, "bf16")
    assert teacher.fc.weight.dtype == torch.float32 and torch.equal(teacher.fc.weight, original)


def test_a_cached_student_interrupted_and_resumed_equals_an_uninterrupted_live_one(tmp_path, monkeypatch, capsys):
    """SIGTERM mid-epoch 2 (teacher, then student), rerun until done: the resumed student,
    whose cache starts empty again, is bit-identical to a live student never interrupted."""
    from test_resume import _interrupt_and_resume, _write_recipe

    kd = [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}]  # in place of CRD
    live = _write_recipe(tmp_path / "live.toml", tmp_path / "live", methods=kd)
    assert 'name = "kd"' in live.read_text() and "crd" not in live.read_text()
    assert main(["run", str(live), "--plain"]) == 0
    cached = _write_recipe(tmp_path / "cached.toml", tmp_path / "cached", methods=kd, teacher_logit_cache=True)
    _interrupt_and_resume(cached, monkeypatch, capsys)
    a, b = read_records(tmp_path / "live", "students"), read_records(tmp_path / "cached", "students")
    assert a.keys() == b.keys() and len(a) == 1
    (run_id, rec), = b.items()
    assert rec["trained_by"]["resumed_from"] == {"epochs_done": 1, "batches_done": 2, "step": 5}
    assert rec["teacher_logit_cache"]["used"]
    assert rec["weights_sha256"] == a[run_id]["weights_sha256"] and rec["epochs"] == a[run_id]["epochs"]
