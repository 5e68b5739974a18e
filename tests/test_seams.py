"""The engine's seams (issue 12) and the cast order (issue 19, item 1): augmentation views and
launchers come from one registry each, the paper's teacher row is the one the recipe marks, and
the task builder sizes a student's methods before it casts the teacher."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdbench.api import ImageData, NoParams, StudentMethod
from kdbench.cli import main
from kdbench.data.loader import DeviceData
from kdbench.engine.loop import autocast
from kdbench.engine.tasks import build_model, build_student_task, cast_teacher_once, dummy_forward
from kdbench.launchers import LAUNCHERS
from kdbench.recipe import RecipeError, expand, load_recipe
from kdbench.registry import Plugin

CPU = torch.device("cpu")


def _data(n=8, size=32, views=None):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return DeviceData(ImageData(images, torch.arange(n) % 4, 4, (0.5,) * 3, (0.25,) * 3), CPU, views)


# ------------------------------------------------------------------------------ views
def test_the_builtin_views_are_plugins(registry):
    views = {p.name: p for p in registry.all("view")}
    assert set(views) == {"second", "strong"} and all(p.dist == "kdbench" for p in views.values())
    makers = registry.view_makers()
    assert makers["second"] is views["second"].factory and makers["kdbench:strong"] is views["strong"].factory
    data = _data(views=makers)
    batch = next(data.train_batches(4, torch.Generator().manual_seed(0), views=("second", "strong")))
    assert set(batch.views) == {"second", "strong"}
    assert batch.views["strong"].shape == batch.x.shape and not torch.equal(batch.views["second"], batch.x)


def test_data_without_a_view_plugin_says_which_views_exist():
    data = _data(views={"second": lambda x, g: x})
    with pytest.raises(ValueError, match=r"no augmentation view named \['strong'\].*\['second'\]"):
        next(data.train_batches(4, torch.Generator().manual_seed(0), views=("strong",)))


class _NeedsAView(StudentMethod):
    views = ("sideways",)  # registered by no plugin


def test_a_method_asking_for_an_unregistered_view_fails_validation(tiny_recipe, registry):
    registry.plugins["student_method"]["sideways_kd"] = [
        Plugin("student_method", "sideways_kd", _NeedsAView, NoParams, "", "tests", "0", __name__)]
    try:
        recipe = tiny_recipe()
        recipe.write_text(recipe.read_text().replace('{ name = "kd", weight = 0.9 }', '{ name = "sideways_kd" }'))
        with pytest.raises(RecipeError) as err:
            load_recipe(recipe, registry)
    finally:
        del registry.plugins["student_method"]["sideways_kd"]
    text = str(err.value)
    assert "method_sets[1].methods[1].name" in text and "'sideways_kd' asks for the augmentation view 'sideways'" in text
    assert "known views: kdbench:second, kdbench:strong, second, strong" in text


# ------------------------------------------------------------------------------ launchers
def test_launchers_come_from_one_registry(tiny_recipe, registry, capsys):
    assert list(LAUNCHERS) == ["inline", "local", "slurm"]
    with pytest.raises(SystemExit):
        main(["run", "x.toml", "--launcher", "nowhere"])
    assert "choose from 'inline', 'local', 'slurm'" in capsys.readouterr().err
    recipe = tiny_recipe()
    recipe.write_text('launcher = "nowhere"\n' + recipe.read_text())
    with pytest.raises(RecipeError, match="unknown launcher 'nowhere'; use one of inline, local, slurm"):
        load_recipe(recipe, registry)


# ------------------------------------------------------------------------------ reference row
def test_the_reference_teacher_row_is_the_one_the_recipe_marks(tiny_recipe, registry):
    marked = load_recipe(tiny_recipe(), registry)
    teachers, _ = expand(marked, registry)
    _, students = expand(marked, registry)
    assert [t.meta.reference_row for t in teachers] == [True]
    assert [s.meta.teacher_reference_row for s in students] == [False, True]  # Student has no teacher
    recipe = tiny_recipe(name="unmarked")
    recipe.write_text(recipe.read_text().replace("ref_teacher = true\n", ""))
    teachers, _ = expand(load_recipe(recipe, registry), registry)
    assert [t.meta.reference_row for t in teachers] == [False]  # a ce objective alone is not it


def test_the_leaderboard_gives_the_paper_teacher_number_only_to_the_marked_row(tiny_recipe, tmp_path):
    """The mark, not the name: here the intra-class objective is marked and ce is not."""
    recipe = tiny_recipe()
    text = recipe.read_text().replace("ref_teacher = true\n", "")
    text = text.replace('[[method_sets]]\nlabel = "Student"',
                        '[[teacher_objectives]]\nname = "intra_class"\nlabel = "intra"\nref_teacher = true\n'
                        '\n[[method_sets]]\nlabel = "Student"', 1)
    assert text.count("ref_teacher = true") == 1
    recipe.write_text(text)
    assert main(["run", str(recipe), "--plain"]) == 0
    assert main(["leaderboard", str(tmp_path / "runs"), "-o", str(tmp_path / "lb")]) == 0
    rows = {line.split("|")[1].strip(): line for line in (tmp_path / "lb" / "leaderboard.md").read_text().splitlines()
            if line.startswith("| Teacher (") and not line.startswith("| Teacher (pair)")}
    assert set(rows) == {"Teacher (ce)", "Teacher (intra)"}
    assert "paper" in rows["Teacher (intra)"] and "paper" not in rows["Teacher (ce)"]


# ------------------------------------------------------------------------------ cast order
def test_the_builder_sizes_methods_before_it_casts_the_teacher(registry):
    """Under bf16 (what precision = auto means on CUDA) the teacher's weights become bf16 after
    the methods were sized: building and one step work, and the task says it was cast."""
    data = _data(views=registry.view_makers())
    torch.manual_seed(0)
    teacher = build_model(registry, {"name": "wrn_16_2", "params": {"width_mult": 0.25}}, 4).eval().requires_grad_(False)
    student = build_model(registry, {"name": "wrn_16_2", "params": {"width_mult": 0.25}}, 4)
    task = build_student_task(registry, [("ce", 0.1, {}), ("kd", 0.9, {}), ("fitnet", 1.0, {})],
                              student, teacher, data, CPU, precision="bf16")
    assert task.teacher_cast_once
    assert all(m.weight.dtype == torch.bfloat16 for m in teacher.modules() if type(m) is nn.Conv2d)
    batch = next(data.train_batches(4, torch.Generator().manual_seed(0)))
    with autocast(CPU, "bf16"):
        terms, _ = task.loss_terms(batch)
    assert set(terms) >= {"ce", "kd", "fitnet"} and all(torch.isfinite(v) for v in terms.values())
    fp32 = build_student_task(registry, [("kd", 0.9, {})], build_model(registry, {"name": "wrn_16_2", "params": {"width_mult": 0.25}}, 4),
                              build_model(registry, {"name": "wrn_16_2", "params": {"width_mult": 0.25}}, 4).eval(),
                              data, CPU, precision="fp32")
    assert not fp32.teacher_cast_once  # nothing to cast without autocast


def test_a_sizing_forward_of_an_already_cast_teacher_runs_in_its_precision(registry):
    """The crash of benchmarks/teacher_cache.py on CUDA: a teacher cast before the sizing
    forward met fp32 images ("Input type (float) and weight type (bfloat16)")."""
    data = _data()
    teacher = build_model(registry, {"name": "wrn_16_2", "params": {"width_mult": 0.25}}, 4).eval()
    expected = dummy_forward(teacher, data)
    assert cast_teacher_once(teacher, data, CPU, "bf16")
    with pytest.raises(RuntimeError, match="should be the same"):
        with torch.no_grad():
            teacher(data.normalize(data.images[:2]))  # what the old sizing forward did
    out = dummy_forward(teacher, data)
    assert out.logits.shape == expected.logits.shape
    assert [f.shape for f in out.feats] == [f.shape for f in expected.feats]
